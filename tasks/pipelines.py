"""Engine pipelines loaded in this process, the performance tier applied to each, and what a GPU
out-of-memory error turns into.

A plain module (no Prefect tasks here): loading an A14B pair reads over 100 GB, so every
long-lived process keeps what it loaded. A pipeline is found by checkpoint, device, dtype and
tier: the weights are loaded once per checkpoint, device and dtype, and the tier is applied to
them in place. Asking for another tier (or other tier options) removes the applied one, which
the patch contract makes exact, and applies the new one: two tiers never hold two copies of the
weights, and compiled blocks are re-wrapped without re-tracing (torch.compile's cache is per
code object and backend). A reused pipeline starts each run clean: its step cache is prepared
for the run's settings and drops every cached residual at the run's first step.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

import wan_engine
from patches.compile import CACHE_ENV, chosen_cache_dir
from patches.tiers import TierHandle, TierOptions, apply_tier
from tasks.runlog import run_logger

# torch.compile backend of the balanced and speed tiers; "eager" traces without generating kernels
# (CPU tests of the compile path).
COMPILE_BACKEND = "inductor"

_PIPELINES: dict[tuple[str, str, torch.dtype], object] = {}


@dataclass(frozen=True)
class _AppliedTier:
    tier: str
    options: TierOptions
    handle: TierHandle


_TIERS: dict[tuple[str, str, torch.dtype], _AppliedTier] = {}


def engine_dtype(device: str) -> torch.dtype:
    """bf16 weights on a GPU; float32 on the CPU, where bf16 matmuls are slow."""
    return torch.float32 if device == "cpu" else torch.bfloat16


def get_pipeline(checkpoint: str, device: str):
    """The engine pipeline for a checkpoint (preset name or folder) on `device`, loaded once."""
    key = (checkpoint, device, engine_dtype(device))
    if key not in _PIPELINES:
        run_logger().info("loading %s on %s (%s)", checkpoint, device, key[2])
        _PIPELINES[key] = wan_engine.load_pipeline(checkpoint, device=device, dtype=key[2])
    return _PIPELINES[key]


def tier_options(tier: str, teacache_threshold: float | None = None, step_cache: str = "teacache") -> TierOptions:
    """The options a request's tier runs with: the step-cache choice and the TeaCache threshold matter to the
    speed tier only, so other tiers ignore them (and changing them does not re-apply those tiers). MagCache
    runs its published (or calibrated) schedule: the TeaCache threshold does not apply to it."""
    if tier != "speed":
        return TierOptions(compile_backend=COMPILE_BACKEND)
    threshold = teacache_threshold if step_cache == "teacache" else None
    return TierOptions(step_cache=step_cache, threshold=threshold, compile_backend=COMPILE_BACKEND)


def get_tiered_pipeline(checkpoint: str, device: str, tier: str, teacache_threshold: float | None = None, *,
                        steps: int | None = None, shift: float | None = None, solver: str = "unipc",
                        step_cache: str = "teacache", cache_dir: str | Path | None = None,
                        ) -> tuple[object, TierHandle]:
    """The pipeline of `get_pipeline` with `tier` applied, its step cache (if any) prepared for a run with
    these sampling settings. `cache_dir`: where compiled kernels persist (`<cache_dir>/inductor`) unless
    TORCHINDUCTOR_CACHE_DIR is set; it stays set for the process, whose compiled blocks keep using it."""
    pipe = get_pipeline(checkpoint, device)
    key = (checkpoint, device, engine_dtype(device))
    options = tier_options(tier, teacache_threshold, step_cache)
    applied = _TIERS.get(key)
    if applied is not None and (applied.tier, applied.options) == (tier, options):
        if applied.handle.step_cache is not None:
            applied.handle.step_cache.prepare(steps, shift, solver)
        return pipe, applied.handle
    if applied is not None:
        run_logger().info("removing tier %s from %s on %s before applying %s", applied.tier, checkpoint, device, tier)
        del _TIERS[key]
        applied.handle.remove()
    # Not setdefault: importing torch._dynamo writes torch's own default dir into the variable.
    if cache_dir is not None and options.compile_backend == "inductor" and chosen_cache_dir() is None:
        os.environ[CACHE_ENV] = str(Path(cache_dir) / "inductor")
    handle = apply_tier(pipe, tier, options, steps=steps, shift=shift, solver=solver)
    _TIERS[key] = _AppliedTier(tier, options, handle)
    return pipe, handle


def evict_pipelines(device: str) -> None:
    """Drop the pipelines held on `device` (and their tiers) and give their memory back to the driver."""
    for key in [k for k in _TIERS if k[1] == device]:
        applied = _TIERS.pop(key)
        try:  # puts process-wide settings back (TF32, ...); must not hide why the pipelines go
            applied.handle.remove()
        except Exception:
            run_logger().exception("removing tier %s from %s failed", applied.tier, key[0])
    for key in [k for k in _PIPELINES if k[1] == device]:
        del _PIPELINES[key]
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


class GpuOutOfMemory(RuntimeError):
    """The GPU ran out of memory; the message says what to change."""


def out_of_memory_advice(device: str, frames: int, size: str, gpus: int) -> str:
    w, h = (int(v) for v in size.split("*"))
    shorter = max(5, 4 * ((frames - 1) // 8) + 1)
    return (
        f"CUDA ran out of memory on {device} generating {frames} frames at {size} on {gpus} GPU(s). "
        f"Next steps: a shorter video (frame_count={shorter} or a smaller duration_s); a lower resolution "
        f"({'832*480' if w * h > 832 * 480 else 'the smallest size of the task'}); more GPUs (strategy "
        f"max_speed, or gpus_per_job={gpus + 1} with concurrent); or offload: free the GPU of other "
        f"processes so the engine keeps the experts resident, or run on a card with more memory. "
        f"The GPU(s) have been released."
    )


@contextmanager
def out_of_memory_as_advice(device: str, frames: int, size: str, gpus: int) -> Iterator[None]:
    """Turn a CUDA OOM into `GpuOutOfMemory` with next steps, freeing the device's memory first."""
    try:
        yield
        return
    except torch.OutOfMemoryError:
        pass
    # Out here the OOM and its traceback are gone, and with them the frames that still
    # referenced activations: only now can the memory really go back.
    evict_pipelines(device)
    raise GpuOutOfMemory(out_of_memory_advice(device, frames, size, gpus))
