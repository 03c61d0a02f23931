"""The `warm-up-compile` task: compile the engine for the run's shape before timing starts.

For the balanced and speed tiers it applies the tier to the run's pipeline (loading it if this
process has not yet), plans the run as the engine will (video size, frame count, the I2V latent grid
the image's aspect ratio gives, the CFG batching) and runs the engine's own step once per resident
expert of that plan. The compiled kernels persist on disk, so a second process at the same shape re-traces but
does not re-compile. The quality tier compiles nothing, and compile is off where it does not pay
(no CUDA GPU, no Triton): the task then says why and returns at once.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from patches.compile import CACHE_ENV, warm_up
from patches.tiers import plan_tier
from tasks.pipelines import EngineCache, out_of_memory_as_advice, process_engines, tier_options
from tasks.runs import RunDescription


@dataclass(frozen=True)
class WarmUp:
    """What the warm-up did: the compile warm-up's seconds, or why there was none."""

    tier: str
    compiled: bool
    seconds: float  # the warm-up forwards, compilation included (0 when nothing was compiled)
    load_s: float   # loading the pipeline, when the warm-up was the first to need it
    detail: str     # what was compiled, or why nothing was

    def record(self) -> dict:
        return {"compiled": self.compiled, "seconds": round(self.seconds, 3), "detail": self.detail}


@task(name="warm-up-compile", retries=0, cache_policy=NO_CACHE)
def warm_up_compile(run: RunDescription, cache_dir: str, engines: EngineCache | None = None) -> WarmUp:
    """Compile the run's tier's blocks at the run's shape; returns what it did and the seconds it took.

    `cache_dir` holds the compiled kernels (`<cache_dir>/inductor`) unless TORCHINDUCTOR_CACHE_DIR is set;
    `engines`: where the pipeline is found (default: this process's engine cache).
    """
    logger = get_run_logger()
    tier, device, size, frame_count = run.tier, run.device, run.size, run.frame_count
    if tier == "quality":
        detail = "the quality tier runs eager: nothing to compile"
        logger.info("warm-up skipped: %s", detail)
        return WarmUp(tier, False, 0.0, 0.0, detail)
    options = tier_options(tier, run.teacache_threshold, run.step_cache)
    compile_entry = next(p for p in plan_tier(tier, device, options=options) if p.name == "compile")
    if not compile_entry.on:
        detail = f"compile is off on {device}: {compile_entry.detail}"
        logger.info("warm-up skipped for tier %s: %s; the run goes on eager", tier, detail)
        return WarmUp(tier, False, 0.0, 0.0, detail)

    w, h = size
    engines = engines or process_engines()
    with out_of_memory_as_advice(run, engines):
        started = time.perf_counter()
        pipe, _ = engines.tiered(run, cache_dir=cache_dir)
        load_s = time.perf_counter() - started
        plan = pipe.plan(image=run.image, size=(w, h), frame_num=frame_count, steps=run.steps, shift=run.shift,
                         solver=run.solver)
        seconds = warm_up(pipe, plan)
    cache = os.environ.get(CACHE_ENV, "torch's default") if options.compile_backend == "inductor" else "none"
    grid = plan.grid
    detail = (f"{compile_entry.detail}: warmed {size}, {frame_count} frames, latent grid {grid.height}x{grid.width}, "
              f"CFG {plan.cfg}; kernel cache {cache}")
    logger.info("compile warm-up for tier %s took %.1f s (%s)", tier, seconds, detail)
    return WarmUp(tier, True, seconds, load_s, detail)
