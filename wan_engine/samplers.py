"""Flow-matching samplers for the denoising loop: UniPC, DPM++ 2M and Euler, with Wan's timestep shift.

The model predicts the flow v = noise - x0 on the path x = (1 - sigma)·x0 + sigma·noise, so the
data estimate at noise level sigma is x0 = x - sigma·v. The schedules and the multistep updates
reproduce the official Wan2.2 schedulers as `generate()` configures them (UniPC order 2, bh2,
data prediction, corrector after every step but the first; DPM-Solver++ 2M midpoint), numerically.

Every per-step coefficient is computed on the host when a solver is built and kept as a python
float, so `step` is pure tensor arithmetic with no host syncs. The coefficients are computed in
float32 in the official order of operations, as the official schedulers do it on float32 scalar
tensors: the trajectories then match theirs bit for bit, where float64 coefficients would drift
by 1e-6 relative over 40-100 steps (the UniPC corrector weights cancel badly in float32).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

# "lightning": Euler on the schedule the step-distilled Wan2.2-Lightning LoRAs were trained for (docs/lora.md)
SOLVERS = ("unipc", "dpm++", "euler", "lightning")

NUM_TRAIN_TIMESTEPS = 1000

# The official UniPC schedule starts at the float32 value of 1 - 1/1000 (its training sigma_max,
# read back with .item()), not at 0.999 exactly; the difference decides some truncated timesteps.
_UNIPC_SIGMA_MAX = torch.tensor(1 - 1 / NUM_TRAIN_TIMESTEPS, dtype=torch.float32).item()


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """Wan's timestep shift s·σ / (1 + (s - 1)·σ): spends more steps at high noise for s > 1."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


@dataclass(frozen=True)
class Schedule:
    """The noise levels of one generation and the integer timesteps the model is conditioned on."""

    sigmas: Tensor     # float32 [steps + 1], decreasing, last is 0
    timesteps: Tensor  # int64 [steps], trunc(sigma·1000) of the float64 sigmas (lightning: float32 sigma·1000)

    @property
    def steps(self) -> int:
        return self.timesteps.numel()


def _check(solver: str, steps: int, shift: float) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}: expected one of {', '.join(SOLVERS)}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")


def lightning_schedule(steps: int, shift: float) -> Schedule:
    """Wan2.2-Lightning's Euler schedule: t = linspace(1000, 0, steps + 1) in float32, sigma = shift(t / 1000)
    in float32, and the model is conditioned on the float timesteps sigma * 1000 (1000, 937.5, 833.33, 625 for
    4 steps at shift 5), not on truncated integers."""
    base = torch.from_numpy(np.linspace(NUM_TRAIN_TIMESTEPS, 0, steps + 1, dtype=np.float32)) / NUM_TRAIN_TIMESTEPS
    sigmas = shift_sigmas(base, shift)  # [steps + 1] float32, the last 0
    return Schedule(sigmas=sigmas, timesteps=sigmas[:-1] * NUM_TRAIN_TIMESTEPS)


def make_schedule(solver: str, steps: int, shift: float) -> Schedule:
    """The official schedule: UniPC and Euler start at sigma 0.999 (t = 999), DPM++ at 1.0 (t = 1000);
    "lightning" is `lightning_schedule`."""
    _check(solver, steps, shift)
    if solver == "lightning":
        return lightning_schedule(steps, shift)
    start = 1.0 if solver == "dpm++" else _UNIPC_SIGMA_MAX
    # numpy's linspace(start, 0, steps + 1)[:steps], bit for bit: i·step + start in float64
    base = torch.arange(steps, dtype=torch.float64) * (-start / steps) + start  # [steps]
    sigmas = shift_sigmas(base, shift)  # [steps] float64
    timesteps = (sigmas * NUM_TRAIN_TIMESTEPS).to(torch.int64)  # [steps], truncated like the official
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)]).to(torch.float32)  # [steps + 1]
    return Schedule(sigmas=sigmas, timesteps=timesteps)


class Solver(Protocol):
    """One generation's sampler: call `step` once per schedule step, in order."""

    schedule: Schedule

    def step(self, model_output: Tensor, sample: Tensor) -> Tensor: ...


def _log_snr(sigmas: Tensor) -> Tensor:
    # lambda = log(alpha / sigma) with alpha = 1 - sigma; -inf at sigma 1 and +inf at sigma 0,
    # which the update formulas absorb exactly as the official ones do.
    return torch.log(1 - sigmas) - torch.log(sigmas)  # [steps + 1] float32


class _Multistep:
    """Step counter and the flow -> data conversion shared by the multistep solvers."""

    def __init__(self, schedule: Schedule):
        self.schedule = schedule
        self._sigmas = schedule.sigmas.tolist()
        self._i = 0

    def _next_index(self) -> int:
        i = self._i
        if i >= self.schedule.steps:
            raise RuntimeError(f"solver already ran all {self.schedule.steps} steps; make a new one")
        self._i += 1
        return i

    def _data(self, model_output: Tensor, sample: Tensor, i: int) -> Tensor:
        return sample - self._sigmas[i] * model_output  # x0 estimate


class UniPCSolver(_Multistep):
    """UniPC (bh2, order 2) on data predictions: a predictor to the next sigma, then, once the model
    has been evaluated there, a corrector that redoes that transition with the new prediction."""

    def __init__(self, schedule: Schedule):
        super().__init__(schedule)
        s = schedule.sigmas
        lam = _log_snr(s)
        h = lam[1:] - lam[:-1]  # [steps] log-SNR increment of transition k: sigma_k -> sigma_k+1
        hh = -h
        e = torch.expm1(hh)  # h·phi_1(h) and B(h), equal for bh2
        rk = torch.cat([h.new_full((1,), float("nan")), (lam[:-2] - lam[1:-1]) / h[1:]])  # [steps]
        # corrector weights of an order-2 transition: solve [[1, 1], [rk, 1]] rho = b(h)
        phi1 = e / hh - 1
        b = torch.stack([phi1 / e, (phi1 / hh - 0.5) * 2 / e], dim=-1)  # [steps, 2]
        R = torch.stack([torch.ones_like(rk), torch.ones_like(rk), rk, torch.ones_like(rk)], -1)
        rho = torch.linalg.solve(R.view(-1, 2, 2)[1:], b[1:])  # [steps - 1, 2]
        rho = torch.cat([h.new_full((1, 2), float("nan")), rho])  # [steps, 2]; transition 0 is order 1
        self._a = (s[1:] / s[:-1]).tolist()
        self._b = ((1 - s[1:]) * e).tolist()
        self._rk = rk.tolist()
        self._rho = rho.tolist()
        self._base: Tensor | None = None  # first-order part of the last predictor, reused by the corrector
        self._m0: Tensor | None = None  # data prediction of the previous step
        self._m1: Tensor | None = None  # and of the one before

    def step(self, model_output: Tensor, sample: Tensor) -> Tensor:
        i = self._next_index()
        x0 = self._data(model_output, sample, i)
        if i > 0:
            k = i - 1  # correct transition k with the model evaluated at its end
            if k == 0:
                corr = 0.5 * (x0 - self._m0)
            else:
                r0, r1 = self._rho[k]
                corr = r0 * ((self._m1 - self._m0) / self._rk[k]) + r1 * (x0 - self._m0)
            sample = self._base - self._b[k] * corr
        base = self._a[i] * sample - self._b[i] * x0
        # order 2 except on the first step (no history) and the last one (lower_order_final)
        if 0 < i < self.schedule.steps - 1:
            out = base - self._b[i] * (0.5 * ((self._m0 - x0) / self._rk[i]))
        else:
            out = base
        self._base, self._m1, self._m0 = base, self._m0, x0
        return out.to(sample.dtype)


class DPMSolver(_Multistep):
    """DPM-Solver++ 2M (midpoint) on data predictions; first order on the first and the last step."""

    def __init__(self, schedule: Schedule):
        super().__init__(schedule)
        s = schedule.sigmas
        lam = _log_snr(s)
        h = lam[1:] - lam[:-1]  # [steps]; inf on the first step (sigma 1) and the last (sigma 0)
        c = (1 - s[1:]) * (torch.exp(-h) - 1.0)
        inv_r = 1.0 / torch.cat([h.new_full((1,), float("nan")), h[:-1] / h[1:]])  # [steps]
        self._a = (s[1:] / s[:-1]).tolist()
        self._c = c.tolist()
        self._half_c = (0.5 * c).tolist()
        self._inv_r = inv_r.tolist()  # 0 on step 1: the sigma-1 start carries no slope information
        self._m0: Tensor | None = None

    def step(self, model_output: Tensor, sample: Tensor) -> Tensor:
        i = self._next_index()
        x0 = self._data(model_output, sample, i)
        x = sample.float()  # the official update runs in float32 whatever the latent dtype
        out = self._a[i] * x - self._c[i] * x0
        if 0 < i < self.schedule.steps - 1:
            out = out - self._half_c[i] * (self._inv_r[i] * (x0 - self._m0))
        self._m0 = x0
        return out.to(x0.dtype)


class EulerSolver(_Multistep):
    """Plain Euler on the flow: x_next = x + (sigma_next - sigma)·v, exact for straight paths."""

    def __init__(self, schedule: Schedule):
        super().__init__(schedule)
        self._dsigma = (schedule.sigmas[1:] - schedule.sigmas[:-1]).tolist()

    def step(self, model_output: Tensor, sample: Tensor) -> Tensor:
        i = self._next_index()
        return sample + self._dsigma[i] * model_output


_SOLVER_TYPES = {"unipc": UniPCSolver, "dpm++": DPMSolver, "euler": EulerSolver, "lightning": EulerSolver}


def make_solver(solver: str, steps: int, shift: float) -> Solver:
    """A fresh solver (no history) over `make_schedule(solver, steps, shift)`."""
    return solver_for(solver, make_schedule(solver, steps, shift))  # validates the arguments first


def solver_for(solver: str, schedule: Schedule) -> Solver:
    """A fresh solver (no history) of kind `solver` over a schedule already made (a run's plan)."""
    return _SOLVER_TYPES[solver](schedule)
