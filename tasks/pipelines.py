"""The engine cache: the pipelines one process loaded, the performance tier applied to each, and what a GPU
out-of-memory error turns into.

A plain module (no Prefect tasks here): loading an A14B pair reads over 100 GB, so every
long-lived process keeps what it loaded, in one `EngineCache` (`process_engines()`). A pipeline is
found by checkpoint, device, dtype and tier: the weights are loaded once per checkpoint, device and
dtype, and the tier is applied to them in place. Asking for another tier (or other tier options)
removes the applied one, which the patch contract makes exact, and applies the new one: two tiers
never hold two copies of the weights, and compiled blocks are re-wrapped without re-tracing
(torch.compile's cache is per code object and backend). A reused pipeline starts each run clean:
its step cache is prepared for the run's settings and drops every cached residual at the run's
first step. It also carries exactly the run's LoRAs (patches/lora.py), in the mode `WAN_LORA_MODE` says (merged,
the default, or unmerged): a run with other LoRAs removes the applied ones bit-exactly and applies the new ones in
place, with no reload of the base weights; unmerged LoRAs of the same modules are swapped inside their hooks.
"""
from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

import wan_engine
from patches.compile import CACHE_ENV, chosen_cache_dir
from patches.lora import LoraConfig, LoraHandle, apply_loras, read_and_check
from patches.tiers import TierHandle, TierOptions, apply_tier
from tasks.runlog import run_logger
from tasks.runs import RunDescription
from tasks.settings import get_settings
from wan_engine.lora import LoraChoice

# torch.compile backend of the balanced and speed tiers; "eager" traces without generating kernels
# (CPU tests of the compile path).
COMPILE_BACKEND = "inductor"


def engine_dtype(device: str) -> torch.dtype:
    """bf16 weights on a GPU; float32 on the CPU, where bf16 matmuls are slow."""
    return torch.float32 if device == "cpu" else torch.bfloat16


def tier_options(tier: str, teacache_threshold: float | None = None, step_cache: str = "teacache",
                 distilled: bool = False) -> TierOptions:
    """The options a request's tier runs with: the step-cache choice and the TeaCache threshold matter to the
    speed tier only, so other tiers ignore them (and changing them does not re-apply those tiers). MagCache
    runs its published (or calibrated) schedule: the TeaCache threshold does not apply to it. Distilled runs
    have no step cache."""
    if distilled:
        return TierOptions(compile_backend=COMPILE_BACKEND, step_caches=False)
    if tier != "speed":
        return TierOptions(compile_backend=COMPILE_BACKEND)
    threshold = teacache_threshold if step_cache == "teacache" else None
    return TierOptions(step_cache=step_cache, threshold=threshold, compile_backend=COMPILE_BACKEND)


@dataclass(frozen=True)
class _AppliedTier:
    tier: str
    options: TierOptions
    handle: TierHandle


class EngineCache:
    """The pipelines loaded in a process, each with at most one tier applied in place.

    `load_pipeline` is how a pipeline is loaded (default: wan_engine.load_pipeline; a test gives a stand-in).
    `loads` counts the pipelines loaded in the cache's life (a resident worker reports it: warm runs load none).
    Before a load on a device that holds other pipelines, the least recently used of them are evicted until the
    device's free memory (`free_bytes(device)`, None on the CPU) holds the new one whole
    (`resident_bytes(checkpoint, dtype)`): a load adapts to what is free by offloading, so an idle pipeline
    left on the card would make the new one run offloaded for good. When a load still runs out of memory, the
    least recently used pipeline left on that device is evicted and the load tried again, until none is left.
    """

    def __init__(self, load_pipeline: Callable | None = None,
                 free_bytes: Callable[[str], int | None] | None = None,
                 resident_bytes: Callable[[str, torch.dtype], int] | None = None):
        self._load = load_pipeline
        self._free_bytes = free_bytes or _free_device_bytes
        self._resident_bytes = resident_bytes or wan_engine.resident_bytes
        self._pipelines: OrderedDict[tuple[str, str, torch.dtype], object] = OrderedDict()  # least recent first
        self._tiers: dict[tuple[str, str, torch.dtype], _AppliedTier] = {}
        self._loras: dict[tuple[str, str, torch.dtype], LoraHandle] = {}
        self.loads = 0
        self.lora_switches = 0

    def held(self) -> list[tuple[str, str]]:
        """(checkpoint, device) of every pipeline held, least recently used first."""
        return [(checkpoint, device) for checkpoint, device, _ in self._pipelines]

    def holds(self, checkpoint: str, device: str) -> bool:
        """Whether a pipeline of this checkpoint is loaded on `device`."""
        return (checkpoint, device, engine_dtype(device)) in self._pipelines

    def pipeline(self, checkpoint: str, device: str):
        """The engine pipeline for a checkpoint (preset name or folder) on `device`, loaded once."""
        key = (checkpoint, device, engine_dtype(device))
        if key in self._pipelines:
            self._pipelines.move_to_end(key)
            return self._pipelines[key]
        load = self._load or wan_engine.load_pipeline
        self._make_room(checkpoint, device, key[2])
        while True:
            run_logger().info("loading %s on %s (%s)", checkpoint, device, key[2])
            try:
                pipe = load(checkpoint, device=device, dtype=key[2])
                break
            except torch.OutOfMemoryError:
                others = [k for k in self._pipelines if k[1] == device]
                if not others:
                    raise
            # Outside the except block: the failed load's tensors are unreachable only now.
            run_logger().warning("out of memory loading %s on %s: evicting %s, the least recently used", checkpoint,
                                 device, others[0][0])
            self._drop(others[0])
        self.loads += 1
        self._pipelines[key] = pipe
        return pipe

    def tiered(self, run: RunDescription, cache_dir: str | Path | None = None) -> tuple[object, TierHandle]:
        """The run's pipeline with its tier applied, the step cache (if any) prepared for the run's sampling
        settings. `cache_dir`: where compiled kernels persist (`<cache_dir>/inductor`) unless
        TORCHINDUCTOR_CACHE_DIR is set; it stays set for the process, whose compiled blocks keep using it."""
        pipe = self.pipeline(run.checkpoint, run.device)
        key = (run.checkpoint, run.device, engine_dtype(run.device))
        options = tier_options(run.tier, run.teacache_threshold, run.step_cache, run.distilled)
        applied = self._tiers.get(key)
        if applied is not None and (applied.tier, applied.options) == (run.tier, options):
            if applied.handle.step_cache is not None:
                applied.handle.step_cache.prepare(run.steps, run.shift, run.solver, image=run.image is not None)
            self._switch_loras(key, pipe, run.loras)
            return pipe, applied.handle
        if applied is not None:
            run_logger().info("removing tier %s from %s on %s before applying %s", applied.tier, run.checkpoint,
                              run.device, run.tier)
            del self._tiers[key]
            applied.handle.remove()
        # Not setdefault: importing torch._dynamo writes torch's own default dir into the variable.
        if cache_dir is not None and options.compile_backend == "inductor" and chosen_cache_dir() is None:
            os.environ[CACHE_ENV] = str(Path(cache_dir) / "inductor")
        handle = apply_tier(pipe, run.tier, options, steps=run.steps, shift=run.shift, solver=run.solver)
        self._tiers[key] = _AppliedTier(run.tier, options, handle)
        self._switch_loras(key, pipe, run.loras)
        return pipe, handle

    def _switch_loras(self, key: tuple[str, str, torch.dtype], pipe, loras: tuple[LoraChoice, ...]) -> None:
        """Give the pipeline exactly the run's LoRAs in the configured mode: the applied ones are removed
        (bit-exact) and the new ones applied in place, or swapped inside the hooks of unmerged ones, with no reload
        of the base weights. The new files are read and checked first, so a bad one leaves the previous LoRAs on."""
        cfg = LoraConfig(loras, merge=get_settings().lora_mode == "merged")
        applied = self._loras.get(key)
        if applied is not None and applied.config == cfg:
            return
        started = time.perf_counter()
        checked = read_and_check(pipe, loras)
        read = time.perf_counter()
        if applied is not None and loras and applied.swap(pipe, cfg, checked):
            removed = read
        else:
            if applied is not None:
                del self._loras[key]
                applied.remove()
            removed = time.perf_counter()
            if loras:
                self._loras[key] = apply_loras(pipe, cfg, checked)
        if key[1].startswith("cuda"):
            torch.cuda.synchronize(key[1])
        done = time.perf_counter()
        self.lora_switches += 1
        run_logger().info("LoRAs on %s (%s): %s (switched in %.2f s: read %.2f, remove %.2f, apply %.2f)", key[0],
                          cfg.mode, ", ".join(f"{Path(c.path).name} x{c.strength:g} ({c.expert})" for c in loras)
                          or "none", done - started, read - started, removed - read, done - removed)

    def lora_record(self, checkpoint: str, device: str) -> list[dict]:
        """The LoRAs applied to a pipeline now, each file with its sha256 (metadata.json)."""
        applied = self._loras.get((checkpoint, device, engine_dtype(device)))
        return applied.summary() if applied is not None else []

    def evict(self, device: str) -> None:
        """Drop the pipelines held on `device` (and their tiers) and give their memory back to the driver."""
        for key in [k for k in self._pipelines if k[1] == device]:
            self._drop(key)

    def _make_room(self, checkpoint: str, device: str, dtype: torch.dtype) -> None:
        """Evict this device's least recently used pipelines until it has the room to hold `checkpoint` whole."""
        others = [k for k in self._pipelines if k[1] == device]
        if not others or self._free_bytes(device) is None:
            return
        needed = self._resident_bytes(checkpoint, dtype)
        while others and (free := self._free_bytes(device)) < needed:
            run_logger().info("%s needs %.1f GB on %s to stay whole, %.1f GB are free: evicting %s, the least "
                              "recently used", checkpoint, needed / 1e9, device, free / 1e9, others[0][0])
            self._drop(others.pop(0))

    def _drop(self, key: tuple[str, str, torch.dtype]) -> None:
        self._loras.pop(key, None)   # the weights go with the pipeline: nothing to put back
        applied = self._tiers.pop(key, None)
        if applied is not None:
            try:  # puts process-wide settings back (TF32, ...); must not hide why the pipeline goes
                applied.handle.remove()
            except Exception:
                run_logger().exception("removing tier %s from %s failed", applied.tier, key[0])
        del self._pipelines[key]
        if key[1].startswith("cuda"):
            torch.cuda.empty_cache()


def _free_device_bytes(device: str) -> int | None:
    """Free memory of a CUDA device (what a load plans with); None elsewhere."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    return torch.cuda.mem_get_info(torch.device(device))[0]


@lru_cache(maxsize=1)
def process_engines() -> EngineCache:
    """This process's engine cache: every run in the process (a batch's subflows, a worker's runs) shares what
    was loaded."""
    return EngineCache()


class GpuOutOfMemory(RuntimeError):
    """The GPU ran out of memory; the message says what to change."""


def out_of_memory_advice(run: RunDescription) -> str:
    shorter = max(5, 4 * ((run.frame_count - 1) // 8) + 1)
    return (
        f"CUDA ran out of memory on {run.device} generating {run.frame_count} frames at {run.size} on {run.gpus} "
        f"GPU(s). Next steps: a shorter video (frame_count={shorter} or a smaller duration_s); a lower resolution "
        f"({'832*480' if run.size.pixels > 832 * 480 else 'the smallest size of the task'}); more GPUs (strategy "
        f"max_speed, or gpus_per_job={run.gpus + 1} with concurrent); or offload: free the GPU of other "
        f"processes so the engine keeps the experts resident, or run on a card with more memory. "
        f"The GPU(s) have been released."
    )


@contextmanager
def out_of_memory_as_advice(run: RunDescription, engines: EngineCache) -> Iterator[None]:
    """Turn a CUDA OOM into `GpuOutOfMemory` with next steps, freeing the run's device in `engines` first."""
    try:
        yield
        return
    except torch.OutOfMemoryError:
        pass
    # Out here the OOM and its traceback are gone, and with them the frames that still
    # referenced activations: only now can the memory really go back.
    engines.evict(run.device)
    raise GpuOutOfMemory(out_of_memory_advice(run))
