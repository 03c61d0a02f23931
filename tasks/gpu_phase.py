"""The GPU phase of a run as plain functions over an `EngineCache`: the compile warm-up, denoising and the VAE
decode, and what denoising produced (`Denoised`).

No Prefect task runs here: the same functions run inside the run's own process (a Python call, `wanflow
generate`) or inside a resident engine worker (tasks/engine_worker.py) that the run's tasks call over its
channel (tasks/engine_channel.py). The tasks (tasks/warmup.py, tasks/denoise.py, tasks/encode.py) log, show
progress and decide where these run.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from patches.compile import warm_up
from patches.power import PowerMeter, PowerReading
from tasks.pipelines import EngineCache, out_of_memory_as_advice
from tasks.runs import RunDescription
from wan_engine.parallel import default_parallel_plan, init_job_group, run_rank
from wan_engine.pipeline import StepInfo

JOB_TIMEOUT = datetime.timedelta(seconds=60)  # every collective of a multi-GPU job: a dead rank fails it in this

# Called after every denoising step with the step and whether every branch reused its cached block stack.
StepListener = Callable[[StepInfo, bool], None]


@dataclass
class Denoised:
    """What sampling produced: the clean latents and how long it took."""

    latents: torch.Tensor  # [16, f, h, w] float32 on the CPU
    seed: int
    settings: dict  # the sampling settings the engine resolved (steps, shift, guide scales, ...)
    timings: dict[str, float]
    step_seconds: list[float] = field(default_factory=list)
    experts_per_step: list[str] = field(default_factory=list)
    tier: dict = field(default_factory=dict)      # TierHandle.summary(): the tier and each patch's detail
    step_cache: dict | None = None                # the skip schedule and the calls made (None: no step cache)
    block_stack: list[str] = field(default_factory=list)  # per step: "computed", "reused" or per branch
    energy: dict | None = None                    # energy_record(): the card's energy while denoising
    prompt_tokens: dict = field(default_factory=dict)  # per prompt: tokens, kept, truncated (the encoder's limit)
    engine: dict = field(default_factory=dict)    # engine_record(): where it ran, the parallel plan, per-rank times
    loras: list = field(default_factory=list)     # EngineCache.lora_record(): each LoRA file, its sha256, strength

    @property
    def model_calls(self) -> dict[str, int]:
        """Model calls (one per step and cond/uncond branch) whose block stack ran or was reused."""
        if self.step_cache is None:
            total = (1 if self.settings.get("cfg") == "none" else 2) * len(self.step_seconds)
            return {"computed": total, "skipped": 0, "total": total}
        return {k: self.step_cache[k] for k in ("computed", "skipped", "total")}

    @property
    def skipped_steps(self) -> list[int]:
        """Steps at which no block stack ran (every branch reused its cached residual)."""
        return [i for i, what in enumerate(self.block_stack) if what == "reused"]


def _executed(calls) -> dict[str, list[int]]:
    """Per branch, the steps whose model call ran the block stack, as the loop made them."""
    done: dict[str, list[int]] = {}
    for call in calls:
        for branch in call.branches:
            done.setdefault(branch, [])
            if call.computed:
                done[branch].append(call.step)
    return done


def _block_stack_per_step(computed: dict[str, list[int]], steps: int) -> list[str]:
    labels = []
    for i in range(steps):
        ran = {b: i in s for b, s in computed.items()}
        if all(ran.values()):
            labels.append("computed")
        elif not any(ran.values()):
            labels.append("reused")
        else:
            labels.append(", ".join(f"{b} {'computed' if r else 'reused'}" for b, r in ran.items()))
    return labels


def _step_cache_record(step_cache) -> dict:
    """The schedule fixed before sampling, plus what the loop did and whether the two agree."""
    record = step_cache.metadata()
    record["executed_computed_steps"] = _executed(step_cache.calls)
    record["matches_schedule"] = record["executed_computed_steps"] == record["computed_steps"]
    return record


def energy_record(reading: PowerReading | None) -> dict | None:
    """What the GPU drew while the text encoder and the sampler ran (the whole card: other work on it
    counts too); None where NVML could not tell (a CPU run, no driver)."""
    if reading is None:
        return None
    return {"joules": round(reading.joules, 1), "mean_watts": round(reading.watts, 1),
            "mean_sm_mhz": round(reading.sm_mhz), "power_capped": round(reading.power_capped, 3)}


def engine_record(run: RunDescription, engines: EngineCache, resident: bool, denoise_s: float) -> dict:
    """Where the run computed: the process, the parallel plan (one rank until the engine splits a job over
    several GPUs) and each rank's seconds, and how many pipelines that process has loaded in its life."""
    return {"resident": resident, "pid": os.getpid(), "loads": engines.loads,
            "parallel": {"ulysses": 1, "cfg": 1, "gpus": run.allocation.gpu_ids, "world_size": 1},
            "ranks": [{"rank": 0, "device": run.device, "pid": os.getpid(), "denoise_s": round(denoise_s, 4)}]}


def run_warm_up(engines: EngineCache, run: RunDescription, cache_dir: str) -> tuple[float, float, str]:
    """Apply the run's tier and compile its blocks at the run's shape: (warm-up seconds, load seconds, what was
    warmed)."""
    with out_of_memory_as_advice(run, engines):
        started = time.perf_counter()
        pipe, _ = engines.tiered(run, cache_dir=cache_dir)
        load_s = time.perf_counter() - started
        plan = pipe.plan(**run.sampling)
        seconds = warm_up(pipe, plan)
    grid = plan.grid
    return seconds, load_s, (f"warmed {run.size}, {run.frame_count} frames, latent grid {grid.height}x{grid.width}, "
                             f"CFG {plan.cfg}")


def run_denoise(engines: EngineCache, run: RunDescription, on_step: StepListener | None = None,
                should_cancel: Callable[[], bool] | None = None, resident: bool = False) -> Denoised:
    """Encode the prompt and sample under the run's tier; raises wan_engine.GenerationCancelled when
    `should_cancel()` says so between steps."""
    with out_of_memory_as_advice(run, engines):
        started = time.perf_counter()
        pipe, handle = engines.tiered(run)
        load_s = time.perf_counter() - started  # ~0 when this process loaded it before

        with PowerMeter(pipe.device) as meter:
            result = pipe.generate(run.prompt, negative_prompt=run.negative_prompt, **run.sampling, decode=False,
                                   callback=_step_listener(handle, on_step), should_cancel=should_cancel)
    engine = engine_record(run, engines, resident, sum(result.step_seconds))
    return _denoised(run, result, handle, load_s, energy_record(meter.reading), engine,
                     engines.lora_record(run.checkpoint, run.device))


def _denoised(run: RunDescription, result, handle, load_s: float, energy: dict | None, engine: dict,
              loras: list[dict]) -> Denoised:
    cache_record = None
    branches = ("cond",) if result.settings.get("cfg") == "none" else ("cond", "uncond")   # guide scale 1: cond
    computed = {branch: list(range(run.steps)) for branch in branches}
    if handle.step_cache is not None:
        cache_record = _step_cache_record(handle.step_cache)
        computed = cache_record["executed_computed_steps"]
    return Denoised(latents=result.latents, seed=result.seed, settings=dict(result.settings),
                    timings={"load": load_s, **result.timings}, step_seconds=list(result.step_seconds),
                    experts_per_step=list(result.experts_per_step), tier=handle.summary(), step_cache=cache_record,
                    block_stack=_block_stack_per_step(computed, run.steps), energy=energy,
                    prompt_tokens={name: asdict(count) for name, count in result.prompt_tokens.items()}, engine=engine,
                    loras=loras)


def run_denoise_rank(engines: EngineCache, run: RunDescription, device: str, rank: int, world_size: int,
                     store: tuple[str, int], on_step: StepListener | None = None,
                     should_cancel: Callable[[], bool] | None = None, resident: bool = True) -> Denoised | None:
    """Rank `rank` of a run computed on `world_size` devices, this one on `device`: it joins the job's process
    group over the caller's TCPStore at `store` (host, port), runs wan_engine.parallel.run_rank and dissolves the
    group. Rank 0 returns what was denoised, the others None."""
    run = dataclasses.replace(run, allocation=run.allocation.model_copy(update={"device": device}))
    with out_of_memory_as_advice(run, engines):
        started = time.perf_counter()
        pipe, handle = engines.tiered(run)
        load_s = time.perf_counter() - started
        parallel = default_parallel_plan(pipe, world_size, steps=run.steps, shift=run.shift, solver=run.solver,
                                         guide_scale=run.guide_scale)
        client = dist.TCPStore(store[0], store[1], world_size, is_master=False, timeout=JOB_TIMEOUT)
        job = init_job_group(rank, world_size, client, timeout=JOB_TIMEOUT)
        try:
            with PowerMeter(pipe.device) as meter:
                result = run_rank(pipe, job, parallel, run.prompt, run.negative_prompt, **run.sampling, decode=False,
                                  callback=_step_listener(handle, on_step), should_cancel=should_cancel,
                                  warm_up=functools.partial(warm_up, pipe) if _compiles(handle) else None)
        finally:
            job.close()
    if result is None:
        return None
    seconds = result.parallel["rank_denoise_seconds"]
    engine = {**engine_record(run, engines, resident, seconds[0]),
              "parallel": {"ulysses": parallel.ulysses, "cfg": parallel.cfg, "gpus": run.allocation.gpu_ids,
                           "world_size": world_size},
              "ranks": [{"rank": r, "device": g.device, "denoise_s": round(s, 4)}
                        for r, (g, s) in enumerate(zip(run.allocation.gpus, seconds, strict=True))]}
    return _denoised(run, result, handle, load_s, energy_record(meter.reading), engine,
                     engines.lora_record(run.checkpoint, run.device))


def _compiles(handle) -> bool:
    """Whether the applied tier compiles the blocks (then every rank warms up at its own shapes first)."""
    return any(p["name"] == "compile" and p["on"] for p in handle.summary().get("patches", []))


def _step_listener(handle, on_step: StepListener | None) -> Callable[[StepInfo], None] | None:
    """The engine's per-step callback that tells `on_step` whether the step reused its cached block stack."""
    if on_step is None:
        return None

    def step_done(info: StepInfo) -> None:
        cache = handle.step_cache  # the calls of this step were just recorded by the cache
        calls = [c for c in cache.calls if c.step == info.step] if cache is not None else []
        on_step(info, bool(calls) and not any(c.computed for c in calls))

    return step_done


def run_decode(engines: EngineCache, run: RunDescription, latents: torch.Tensor) -> np.ndarray:
    """VAE-decode the latents with the run's pipeline: uint8 frames [F, H, W, 3]."""
    with out_of_memory_as_advice(run, engines):
        return engines.pipeline(run.checkpoint, run.device).decode(latents)
