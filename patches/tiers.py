"""Performance tiers: named compositions of patches, and what each one does on this machine.

| tier     | applies                                                                      |
| quality  | TF32 matmul + cuDNN, cuDNN benchmark; attention backend; everything resident |
| balanced | quality + torch.compile of the repeated blocks, bf16 VAE decode (+ MagCache for I2V) |
| speed    | balanced + TeaCache (threshold, default 0.25) or MagCache                    |

"Everything resident" is the loader's memory plan (decided from free VRAM when the pipeline is
loaded), reported here, not changed. The attention backend (FA4 where it runs, else SDPA) is part of
every tier: both compute exact attention. One planning function decides what is on and why for both
`apply_tier` and `describe_tiers`, so `wanflow patches` shows exactly what a run would apply.

The step caches (patches.teacache / patches.magcache) are imported only when a tier uses them. Only
one step cache can own the block-stack hook, so in the speed tier the chosen cache replaces the
MagCache that balanced applies to I2V.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from wan_engine import WanPipeline

from .attention import AttentionConfig, apply_attention, fa4_status
from .base import Handle, PatchStack
from .compile import CompileConfig, apply_compile, compile_status
from .precision import PrecisionConfig, apply_precision, tf32_status
from .vae_decode import apply_vae_decode, vae_decode_status

log = logging.getLogger(__name__)

TIERS = ("quality", "balanced", "speed")
STEP_CACHES = ("teacache", "magcache")


@dataclass(frozen=True)
class TierOptions:
    step_cache: str = "teacache"        # the speed tier's cache
    threshold: float | None = None      # the speed tier's cache threshold; None: the cache's default
    attention: str = "auto"             # "auto" | "sdpa" | "fa4"
    compile_backend: str = "inductor"   # "eager" / "aot_eager" trace only (CPU tests)
    step_caches: bool = True            # False for distilled runs: 4 steps leave nothing to skip

    def __post_init__(self):
        if self.step_cache not in STEP_CACHES:
            raise ValueError(f"step_cache must be one of {STEP_CACHES}, got {self.step_cache!r}")
        AttentionConfig(self.attention)  # validates the name


@dataclass(frozen=True)
class PlannedPatch:
    """One line of a tier on one machine: a patch (or the memory plan), whether it is on, and what it
    does or why it is off. `apply` installs it on a pipeline (None: nothing to install)."""

    name: str
    on: bool
    detail: str
    apply: Callable[..., Handle] | None = field(default=None, repr=False, compare=False)


def _step_cache(name: str, threshold: float | None, sampling: dict) -> PlannedPatch:
    """The planned step cache `name`, its module imported here (only tiers that use one pay for it)."""
    if name == "teacache":
        from .teacache import TeaCacheConfig as config_cls
        from .teacache import apply_teacache as apply
        title = "TeaCache"
    else:
        from .magcache import MagCacheConfig as config_cls
        from .magcache import apply_magcache as apply
        title = "MagCache"
    cfg = config_cls() if threshold is None else config_cls(threshold=threshold)
    detail = f"{title}, threshold {'published default' if cfg.threshold is None else cfg.threshold}"
    return PlannedPatch(name, True, detail, lambda pipe: apply(pipe, cfg, **sampling))


def _residency(pipe, device: torch.device) -> PlannedPatch:
    if pipe is not None:
        plan = pipe.memory
        parts = ["experts resident" if plan.experts_resident else "experts swapped at the expert boundary",
                 "text encoder resident" if plan.text_encoder_resident else
                 "text encoder encoding on the CPU" if plan.text_encoder_on_cpu else
                 "text encoder on the CPU between uses"]
        return PlannedPatch("resident", plan.experts_resident, ", ".join(parts) + " (decided at load from free memory)")
    if device.type != "cuda":
        return PlannedPatch("resident", True, "CPU: every model in host memory")
    return PlannedPatch("resident", True, "both experts and the text encoder on the GPU when free VRAM allows "
                                          "(decided at load from free memory)")


def plan_tier(tier: str, device: torch.device | str, task: str | None = None, options: TierOptions | None = None,
              pipe=None, sampling: dict | None = None) -> list[PlannedPatch]:
    """What `tier` applies on `device` for `task` ("t2v" | "i2v" | "ti2v"; None: any), in order.
    With `pipe`, entries reflect that pipeline (its memory plan, its dtype for the attention backend)."""
    if tier not in TIERS:
        raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
    options = options or TierOptions()
    sampling = sampling or {}
    device = torch.device(device)
    plan = []
    on, why = tf32_status(device)
    plan.append(PlannedPatch("precision", on, why,
                             (lambda p: apply_precision(p, PrecisionConfig())) if on else None))
    if pipe is None:
        fa4, why = fa4_status(device)
        why = (f"{why}, when the model runs bf16/fp16 and a probe call agrees with SDPA" if fa4
               else f"torch SDPA ({why})") if options.attention == "auto" else f"{options.attention} (requested)"
    else:
        why = "chosen when applied (FA4 where it runs, else torch SDPA)"
    plan.append(PlannedPatch("attention", True, why, lambda p: apply_attention(p, AttentionConfig(options.attention))))
    plan.append(_residency(pipe, device))
    if tier == "quality":
        return plan

    on, why = compile_status(device, options.compile_backend)
    compile_cfg = CompileConfig(backend=options.compile_backend)
    plan.append(PlannedPatch("compile", on, why,
                             (lambda p: apply_compile(p, compile_cfg)) if on else None))
    on, why = vae_decode_status(device)
    if on and pipe is not None and not isinstance(pipe, WanPipeline):   # a bare Denoiser (wanflow bench)
        on, why = False, "this pipeline has no VAE"
    plan.append(PlannedPatch("vae_decode", on, why, apply_vae_decode if on else None))
    if not options.step_caches:
        plan.append(PlannedPatch("step_cache", False, "off in distilled mode (4 steps leave nothing to skip)"))
    elif tier == "speed":
        cache = _step_cache(options.step_cache, options.threshold, sampling)
        if task in ("i2v", None) and options.step_cache != "magcache":
            plan.append(PlannedPatch("magcache", False, "I2V's balanced MagCache is replaced by the speed tier's "
                                                        "step cache (one step cache at a time)"))
        plan.append(cache)
    elif task in ("i2v", None):
        cache = _step_cache("magcache", None, sampling)
        if task is None:
            cache = dataclasses.replace(cache, detail=f"I2V only: {cache.detail}")
        plan.append(cache)
    return plan


class TierHandle(PatchStack):
    """The patches of one tier on one pipeline; `remove()` undoes them last-first."""

    def __init__(self, tier: str, plan: list[PlannedPatch]):
        super().__init__(tier)
        self.tier = tier
        self.plan = plan
        self.step_cache = None   # the StepCacheHandle, when the tier has one (prepare(), metadata())
        self.applied: list[tuple[str, str]] = []

    def summary(self) -> dict:
        """For run metadata: the tier and every entry with what it did here or why it was off (a step cache: the
        schedule of its current or last run, which follows that run's plan)."""
        applied = dict(self.applied)
        if self.step_cache is not None:
            applied[self.step_cache.name] = self.step_cache.detail
        return {"tier": self.tier, "patches": [
            {"name": p.name, "on": p.on, "detail": applied.get(p.name, p.detail)} for p in self.plan]}


def apply_tier(pipe, tier: str, options: TierOptions | None = None, *, steps: int | None = None,
               shift: float | None = None, solver: str = "unipc") -> TierHandle:
    """Apply `tier`'s patches to `pipe` in order (precision, attention, compile, step cache); the
    sampling settings prepare the step cache's schedule (None: the model's defaults)."""
    sampling = dict(steps=steps, shift=shift, solver=solver)
    plan = plan_tier(tier, pipe.device, pipe.spec.task, options, pipe=pipe, sampling=sampling)
    handle = TierHandle(tier, plan)
    try:
        for entry in plan:
            if entry.apply is None:
                continue
            patch = handle.push(entry.apply(pipe))
            handle.applied.append((entry.name, getattr(patch, "detail", entry.detail)))
            if entry.name in STEP_CACHES:
                handle.step_cache = patch
    except Exception:
        handle.remove()
        raise
    handle.detail = "; ".join(f"{name}: {detail}" for name, detail in handle.applied) or "nothing to apply"
    log.info("tier %s on %s: %s", tier, pipe.device, handle.detail)
    return handle


def describe_tiers(device: torch.device | str | None = None, task: str | None = None,
                   options: TierOptions | None = None) -> dict[str, list[PlannedPatch]]:
    """Per tier, what it applies on `device` (default: the first GPU, else the CPU) and why anything is
    off. `task` None describes the task-dependent entries with their condition."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return {tier: plan_tier(tier, device, task, options) for tier in TIERS}


def format_tiers(described: dict[str, list[PlannedPatch]]) -> str:
    """A plain-text table of `describe_tiers` (for `wanflow patches`)."""
    width = max(len(p.name) for plan in described.values() for p in plan)
    lines = []
    for tier, plan in described.items():
        lines.append(f"{tier}:")
        lines += [f"  {p.name:<{width}}  {'on ' if p.on else 'off'}  {p.detail}" for p in plan]
    return "\n".join(lines)
