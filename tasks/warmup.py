"""The `warm-up-compile` task: compile the engine for the run's shape before timing starts.

For the balanced and speed tiers it applies the tier to the run's pipeline (loading it if this
process has not yet), plans the run as the engine will (video size, frame count, the I2V latent grid
the image's aspect ratio gives, the CFG batching) and runs the engine's own step once per resident
expert of that plan. The compiled kernels persist on disk, so a second process at the same shape re-traces but
does not re-compile. The work runs on the resident engine worker of the run's GPU when `wanflow worker` keeps
one (its compiled blocks then stay warm for the next run), else in this process. The quality tier compiles
nothing, and compile is off where it does not pay (no CUDA GPU, no Triton): the task then says why and returns at once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from patches.compile import CACHE_ENV
from patches.tiers import plan_tier
from tasks.engine_channel import Job, call, resident_tag
from tasks.gpu_phase import run_warm_up
from tasks.pipelines import EngineCache, process_engines, tier_options
from tasks.runs import RunDescription
from tasks.settings import get_settings


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
    tier, device = run.tier, run.device
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

    if len(run.allocation.tags) > 1:
        detail = f"a job on {len(run.allocation.tags)} GPUs compiles at each rank's shapes within the job"
        logger.info("warm-up skipped: %s", detail)
        return WarmUp(tier, False, 0.0, 0.0, detail)
    tag = resident_tag(run, get_settings().engine_tags)
    if tag is not None:
        seconds, load_s, warmed = call(tag, Job("warm_up", run, run.allocation.lease_id, {"cache_dir": cache_dir}),
                                       log=logger)
    else:
        seconds, load_s, warmed = run_warm_up(engines or process_engines(), run, cache_dir)
    cache = os.environ.get(CACHE_ENV, "torch's default") if options.compile_backend == "inductor" else "none"
    detail = f"{compile_entry.detail}: {warmed}; kernel cache {cache}"
    logger.info("compile warm-up for tier %s took %.1f s (%s)", tier, seconds, detail)
    return WarmUp(tier, True, seconds, load_s, detail)
