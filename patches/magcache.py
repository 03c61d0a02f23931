"""MagCache for Wan: skip block stacks while the predicted drift of the cached residual stays small.

The published algorithm uses calibrated magnitude ratios r (per model call: the mean over tokens of
|residual_t| / |residual_prev| of the same branch). Per cond/uncond branch, each candidate step does
ratio_acc *= r; steps_acc += 1; err_acc += |1 - ratio_acc|, and reuses the cached residual while
err_acc < threshold and steps_acc <= K; otherwise the step is computed and the accumulators restart.
No skipping inside the retention window. Ratios for another number of steps are resampled by nearest
neighbour, cond and uncond separately. Since the ratios are fixed figures, the schedule is a pure
function of (model, steps, shift, solver, threshold, K, retention) and is computed before sampling.

Retention windows (no skipping). One DiT (TI2V-5B, Wan2.1), as the published code counts them: the
first int(2 * steps * retention_ratio) model calls. The A14B pair, per phase, as ports of the MagCache
Wan2.2 release apply them; with them the published T2V-A14B setting computes 26 of 40 steps, which
fits the speed-up its README reports (27m09s -> 18m10s):
- T2V-A14B: the first int(split * retention_ratio) steps of the high-noise phase (split = its length)
  and the low-noise steps split <= i <= split + (steps - split) * retention_ratio;
- I2V-A14B: never in the high-noise phase, nor in the first retention_ratio of the low-noise phase:
  steps i < int(split + (steps - split) * retention_ratio).
Each expert keeps its own state; the dip of the published A14B curves at the expert switch (0.655 T2V,
0.911 I2V, measured across experts) falls, at 40 steps, on the low-noise phase's first step, which is
computed anyway.
TI2V-5B's ratios follow the run's mode: the published text+image curve when the run's conditioning has an
image, the text-only curve otherwise (a calibration entry likewise only serves runs of its own mode).
A calibration file next to the checkpoint (patches/calibrate.py) is preferred over the published ratios.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from wan_engine import StepPlan

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

THRESHOLD_RANGE = (0.0, 0.5)

# (threshold, K, retention_ratio) of the published runs: E006K2R04 (T2V-A14B), E006K2R01 (I2V-A14B),
# E006K2R02 (TI2V-5B), from the MagCache Wan2.2 README.
PUBLISHED_DEFAULTS = {"t2v-A14B": (0.06, 2, 0.4), "i2v-A14B": (0.06, 2, 0.1), "ti2v-5B": (0.06, 2, 0.2)}


def ratio_set(model: str, image: bool) -> str:
    """The published ratio curve of a released model's run: TI2V-5B has one per mode, "ti2v-5B/i2v" calibrated
    with an image (text+image to video) and "ti2v-5B/t2v" without; each A14B model has one."""
    if model == "ti2v-5B":
        return "ti2v-5B/i2v" if image else "ti2v-5B/t2v"
    return model


@dataclass(frozen=True)
class MagCacheConfig:
    """threshold (accumulated error bound, 0 = compute every step), max_skips (K, consecutive skips)
    and retention_ratio: None takes the published value for the model. figures: a published curve
    of patches/data/magcache_ratios.json ("wan2.2" keys, e.g. "ti2v-5B/i2v") instead of the model's.
    use_calibration: prefer the ratios of a calibration file next to the checkpoint."""

    threshold: float | None = None
    max_skips: int | None = None
    retention_ratio: float | None = None
    figures: str | None = None
    use_calibration: bool = True

    def __post_init__(self):
        lo, hi = THRESHOLD_RANGE
        if self.threshold is not None and not lo <= self.threshold <= hi:
            raise ValueError(f"MagCache threshold must be within {lo}-{hi}, got {self.threshold}")
        if self.max_skips is not None and self.max_skips < 0:
            raise ValueError(f"MagCache max_skips (K) must be 0 or more, got {self.max_skips}")
        if self.retention_ratio is not None and not 0 <= self.retention_ratio <= 1:
            raise ValueError(f"MagCache retention_ratio must be within 0-1, got {self.retention_ratio}")

    def resolve(self, model: str) -> tuple[float, int, float]:
        """(threshold, K, retention_ratio) for a released model, published values filling the gaps."""
        threshold, k, retention = PUBLISHED_DEFAULTS[model]
        return (threshold if self.threshold is None else self.threshold,
                k if self.max_skips is None else self.max_skips,
                retention if self.retention_ratio is None else self.retention_ratio)


def published_ratios(figures: str) -> list[float]:
    """A published ratio curve in the stored layout (interleaved cond/uncond calls from step 1)."""
    curves = load_figures("magcache_ratios")["wan2.2"]
    if figures not in curves:
        raise ValueError(f"no published MagCache ratios {figures!r}; available: {sorted(curves)}")
    return list(curves[figures])


def resample_nearest(values: Sequence[float], length: int) -> list[float]:
    """Nearest-neighbour resampling to `length` points keeping both ends (round half to even, as numpy)."""
    if length == 1:
        return [values[-1]]
    scale = (len(values) - 1) / (length - 1)
    return [values[round(k * scale)] for k in range(length)]


def branch_ratios(ratios: Sequence[float], steps: int) -> dict[str, list[float]]:
    """Per branch, the ratio of each of `steps` steps, from a curve in the stored layout (interleaved
    cond/uncond from step 1; step 0 is padded with 1.0 as upstream does), resampled to `steps`."""
    full = [1.0, 1.0, *ratios]
    return {b: resample_nearest(full[k::2], steps) for k, b in enumerate(BRANCHES)}


def magcache_retained(plan: StepPlan, retention_ratio: float) -> dict[str, list[bool]]:
    """Per branch and step, whether the step lies in a retention window (see the module docstring)."""
    steps, split = plan.steps, plan.split
    if not plan.moe:
        window = int(2 * steps * retention_ratio)  # upstream counts model calls, cond and uncond interleaved
        return {b: [2 * i + k < window for i in range(steps)] for k, b in enumerate(BRANCHES)}
    if plan.task == "i2v":
        flags = [i < int(split + (steps - split) * retention_ratio) for i in range(steps)]
    else:
        flags = [i < int(split * retention_ratio) or split <= i <= split + (steps - split) * retention_ratio
                 for i in range(steps)]
    return dict.fromkeys(BRANCHES, flags)


class _MagRow:
    def __init__(self, ratios: Sequence[float], threshold: float, max_skips: int):
        self.ratios, self.threshold, self.max_skips = ratios, threshold, max_skips
        self.reset()

    def reset(self) -> None:
        self.ratio, self.skips, self.error = 1.0, 0, 0.0

    def advance(self, step: int) -> bool:
        self.ratio *= self.ratios[step]
        self.skips += 1
        self.error += abs(1 - self.ratio)
        return self.error < self.threshold and self.skips <= self.max_skips


def magcache_schedule(plan: StepPlan, ratios: Sequence[float], threshold: float, max_skips: int,
                      retention_ratio: float, batched: bool = False, source: str = "published",
                      branches: tuple[str, ...] = BRANCHES) -> SkipSchedule:
    """The MagCache schedule of a generation for the run's `branches` (("cond",) without guidance);
    `ratios` in the stored layout (any number of steps)."""
    per_branch = branch_ratios(ratios, plan.steps)
    rules = {b: _MagRow(per_branch[b], threshold, max_skips) for b in branches}
    retained = magcache_retained(plan, retention_ratio)
    compute = decide(plan, rules, {b: retained[b] for b in branches}, batched)
    settings = {"threshold": threshold, "max_skips": max_skips, "retention_ratio": retention_ratio,
                "ratios": source}
    return SkipSchedule("magcache", plan, compute, batched, settings)


def _ratios(pipe, cfg: MagCacheConfig, plan: StepPlan, model: str, image: bool) -> tuple[list[float], str]:
    if cfg.use_calibration:
        found = find_calibration(pipe.checkpoint_dir, plan, image)
        if found:
            path, entry = found
            return list(entry["magcache"]["ratios"]), f"calibration {path} ({entry['steps']} steps)"
    figures = cfg.figures or ratio_set(model, image)
    return published_ratios(figures), f"published wan2.2/{figures}"


def apply_magcache(pipe, cfg: MagCacheConfig = MagCacheConfig(), *, steps: int | None = None,
                   shift: float | None = None, solver: str = "unipc") -> StepCacheHandle:
    """Register MagCache on `pipe`: each run takes its schedule from the run's plan; the sampling settings
    (None: the model's defaults) give the schedule shown before a run. Undo with handle.remove()."""
    model = published_model(pipe.spec)
    threshold, max_skips, retention = cfg.resolve(model)

    def build(plan: StepPlan, branches: tuple[str, ...], batched: bool, image: bool) -> SkipSchedule:
        ratios, source = _ratios(pipe, cfg, plan, model, image)
        return magcache_schedule(plan, ratios, threshold, max_skips, retention, batched, source, branches)

    return install_step_cache(pipe, build, "magcache", steps, shift, solver)
