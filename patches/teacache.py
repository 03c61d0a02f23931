"""TeaCache for Wan: skip block stacks while the rescaled change of the timestep embedding stays small.

The published algorithm (TeaCache4Wan2.1) measures, per cond/uncond branch, the relative L1 change
mean|x_t - x_prev| / mean|x_prev| of the timestep-modulated input: the time embedding e ('non_ret'
mode) or its projection e0 = time_projection(e) ('ret' mode). It maps that change through a
polynomial fitted on the model (rescaling input change to output change), accumulates it over the
skipped steps and reuses the cached residual while the sum stays below the threshold; a computed step
restarts the sum. 'ret' mode always computes the first 5 steps; 'non_ret' the first and the last.

On Wan, e and e0 depend only on the timestep and the expert's time_embedding / time_projection
weights, never on the prompt or the latents, so `teacache_rel_l1` evaluates them for every scheduled
timestep with the expert's own modules before sampling (two small matmuls per step) and
`teacache_schedule` turns them into the whole schedule.

Coefficients: no official Wan2.2 set exists. T2V-A14B uses the Wan2.1 T2V-14B polynomial: each A14B
expert has the Wan2.1-14B architecture (width 5120, 40 blocks, the same time embedding) it was trained
from; I2V-A14B uses Wan2.1 I2V-14B-720P, as the community wrappers do. TI2V-5B has no published set either (the
figures we hold, patches/data/teacache_coefficients.json from TeaCache4Wan2.1, have none for it), so it
borrows T2V-14B in both its modes, a placeholder: its width (3072, 30 blocks) and its 48-channel latent differ
from the 14B model's. A calibration run (patches/calibrate.py, `wanflow calibrate`) fits the polynomial for any
checkpoint and mode, and `TeaCacheConfig(use_calibration=True)` prefers it.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from wan_engine import StepPlan
from wan_engine.dit import timestep_sinusoid

from .step_cache import (
    BRANCHES,
    SkipSchedule,
    StepCacheHandle,
    decide,
    find_calibration,
    install_step_cache,
    load_figures,
    published_model,
)

log = logging.getLogger(__name__)

THRESHOLD_RANGE = (0.05, 0.5)
RET_STEPS = 5  # 'ret' mode computes the first 5 steps (10 model calls upstream)

# The Wan2.1 polynomial each released Wan2.2 model borrows (see the module docstring).
COEFFICIENT_SETS = {"t2v-A14B": "t2v-14B", "i2v-A14B": "i2v-14B-720p", "ti2v-5B": "t2v-14B"}


@dataclass(frozen=True)
class TeaCacheConfig:
    """threshold: 0 turns skipping off, else 0.05-0.5 (higher skips more). use_ret_steps: the published
    'ret' mode (measure e0, compute the first 5 steps); False is 'non_ret' (measure e, compute the first
    and the last step). coefficients: a polynomial (highest power first) instead of the published set;
    use_calibration: take the polynomial fitted by `calibrate` next to the checkpoint when there is one."""

    threshold: float = 0.25
    use_ret_steps: bool = True
    coefficients: tuple[float, ...] | None = None
    use_calibration: bool = False

    def __post_init__(self):
        lo, hi = THRESHOLD_RANGE
        if self.threshold != 0 and not lo <= self.threshold <= hi:
            raise ValueError(f"TeaCache threshold must be within {lo}-{hi} (or 0 to compute every step), "
                             f"got {self.threshold}")

    @property
    def signal(self) -> str:
        return "e0" if self.use_ret_steps else "e"


def published_coefficients(model: str, signal: str) -> tuple[float, ...]:
    """The published polynomial (highest power first) borrowed by a released model for signal "e0" or "e"."""
    mode = "ret" if signal == "e0" else "non_ret"
    return tuple(load_figures("teacache_coefficients")["wan2.1"][COEFFICIENT_SETS[model]][mode])


def polyval(coefficients: Sequence[float], x: float) -> float:
    """Horner's rule in float64, highest power first (numpy.poly1d's order of operations)."""
    y = 0.0
    for c in coefficients:
        y = y * x + c
    return y


@torch.no_grad()
def teacache_rel_l1(experts: Mapping[str, nn.Module], plan: StepPlan, signal: str = "e0") -> list[float | None]:
    """Per step, the relative L1 change mean|x_i - x_prev| / mean|x_prev| of the step's expert signal
    (signal "e": the time embedding; "e0": its projection) against that expert's previous step; None
    where an expert's phase starts. Computed where the expert's weights are, one host sync in all."""
    if signal not in ("e", "e0"):
        raise ValueError(f"TeaCache signal must be 'e' or 'e0', got {signal!r}")
    rel: list[float | None] = [None] * plan.steps
    for name in dict.fromkeys(plan.experts):
        dit = experts[name]
        idx = [i for i, e in enumerate(plan.experts) if e == name]
        device = dit.time_embedding[0].weight.device
        t = torch.tensor([plan.timesteps[i] for i in idx], device=device)  # [n]
        x = dit.time_embedding(timestep_sinusoid(t, dit.config.freq_dim))  # [n, dim] fp32
        if signal == "e0":
            x = dit.time_projection(x)  # [n, 6 * dim] fp32
        change = (x[1:] - x[:-1]).abs().mean(-1) / x[:-1].abs().mean(-1)  # [n - 1]
        for i, value in zip(idx[1:], change.tolist(), strict=True):
            rel[i] = value
    return rel


class _TeaRow:
    def __init__(self, rel_l1: Sequence[float | None], coefficients: Sequence[float], threshold: float):
        self.rel_l1, self.coefficients, self.threshold = rel_l1, coefficients, threshold
        self.acc = 0.0

    def reset(self) -> None:
        self.acc = 0.0

    def advance(self, step: int) -> bool:
        self.acc += polyval(self.coefficients, self.rel_l1[step])
        # The polynomial can be negative for tiny changes, so threshold 0 must mean "off" explicitly.
        return self.threshold > 0 and self.acc < self.threshold


def teacache_retained(plan: StepPlan, use_ret_steps: bool) -> list[bool]:
    """Steps TeaCache always computes: the published window (first 5 steps, or the first and the last),
    and for I2V-A14B the whole high-noise phase (ANCHORS 4). Phase starts are added by `decide`."""
    never_high = plan.moe and plan.task == "i2v"
    flags = []
    for i in range(plan.steps):
        window = i < RET_STEPS if use_ret_steps else i in (0, plan.steps - 1)
        flags.append(window or (never_high and i < plan.split))
    return flags


def teacache_schedule(plan: StepPlan, rel_l1: Sequence[float | None], threshold: float,
                      coefficients: Sequence[float], use_ret_steps: bool = True, batched: bool = False,
                      source: str = "published", branches: tuple[str, ...] = BRANCHES) -> SkipSchedule:
    """The TeaCache schedule of a generation from its per-step signal change (`teacache_rel_l1`), for
    the run's `branches` (("cond",) without guidance). Both branches see the same timestep, hence the
    same signal: their schedules agree."""
    if len(rel_l1) != plan.steps:
        raise ValueError(f"rel_l1 has {len(rel_l1)} entries for {plan.steps} steps")
    retained = teacache_retained(plan, use_ret_steps)
    rules = {b: _TeaRow(rel_l1, coefficients, threshold) for b in branches}
    compute = decide(plan, rules, dict.fromkeys(branches, retained), batched)
    settings = {"threshold": threshold, "signal": "e0" if use_ret_steps else "e", "coefficients": source}
    return SkipSchedule("teacache", plan, compute, batched, settings)


def _coefficients(pipe, cfg: TeaCacheConfig, plan: StepPlan, image: bool) -> tuple[tuple[float, ...], str]:
    if cfg.coefficients is not None:
        return tuple(cfg.coefficients), "given"
    if cfg.use_calibration:
        found = find_calibration(pipe.checkpoint_dir, plan, image)
        fit = found[1]["teacache"][cfg.signal]["coefficients"] if found else None
        if fit:
            return tuple(fit), f"calibration {found[0]}"
        log.warning("no TeaCache fit in a calibration file next to %s: using the published coefficients",
                    pipe.checkpoint_dir)
    model = published_model(pipe.spec)
    return published_coefficients(model, cfg.signal), f"published wan2.1/{COEFFICIENT_SETS[model]}"


def _warn_outside_fit(rel_l1: Sequence[float | None], coefficients: Sequence[float], source: str) -> None:
    """A negative rescaled change means the polynomial is extrapolating (it was fitted on the changes of
    a trained model); the accumulator then shrinks and those steps look free to skip."""
    values = [x for x in rel_l1 if x is not None]
    negative = sum(polyval(coefficients, x) < 0 for x in values)
    if negative:
        log.warning("TeaCache: the %s polynomial is negative at %d of %d steps (signal changes %.3g-%.3g), "
                    "outside the range it was fitted on: there the sum shrinks and steps get skipped. Calibrate this "
                    "checkpoint (patches.calibrate) for a fitted polynomial", source, negative, len(values),
                    min(values), max(values))


def apply_teacache(pipe, cfg: TeaCacheConfig = TeaCacheConfig(), *, steps: int | None = None,
                   shift: float | None = None, solver: str = "unipc") -> StepCacheHandle:
    """Register TeaCache on `pipe`: each run takes its schedule from the run's plan; the sampling settings
    (None: the model's defaults) give the schedule shown before a run. Undo with handle.remove()."""

    def build(plan: StepPlan, branches: tuple[str, ...], batched: bool, image: bool) -> SkipSchedule:
        coefficients, source = _coefficients(pipe, cfg, plan, image)
        rel = teacache_rel_l1(pipe.experts, plan, cfg.signal)
        _warn_outside_fit(rel, coefficients, source)
        return teacache_schedule(plan, rel, cfg.threshold, coefficients, cfg.use_ret_steps, batched, source, branches)

    return install_step_cache(pipe, build, "teacache", steps, shift, solver)
