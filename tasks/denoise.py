"""The `denoise` task: text encoding and the sampling loop under the run's performance tier, with a
progress artifact per step.

With a step cache (TeaCache in the speed tier, MagCache for I2V in balanced) the schedule of computed
and skipped block stacks is fixed before sampling; the task reports it with what the loop actually
did, per step and per cond/uncond branch.

The work itself (tasks/gpu_phase.py) runs on the resident engine worker of the run's GPU when `wanflow worker`
keeps one, else in this process; either way its steps move this task's progress artifact. It stops between
steps when the flow run is being cancelled (checked at most every CANCEL_CHECK_SECONDS), fails there when the
run's GPU lease is lost, and turns a CUDA out-of-memory error into next steps. On a GPU it also reads the
card's energy over the sampling (NVML), which the published metadata reports.
Listeners registered with `listen_to_steps` (the CLI's progress bar) see every step too.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.context import FlowRunContext
from prefect.states import Cancelled, State

import wan_engine
from tasks.allocate import gpu_lease_lost
from tasks.engine_channel import Job, call, call_ranks, resident_tags
from tasks.gpu_phase import Denoised, run_denoise
from tasks.leases import GpuLeaseLost
from tasks.pipelines import EngineCache, process_engines
from tasks.rank_processes import rank_processes
from tasks.runs import RunDescription
from tasks.settings import get_settings

CANCEL_CHECK_SECONDS = 2.0
PROGRESS_UPDATE_SECONDS = 0.5  # the artifact moves at most this often (each update is an API call)

_STEP_LISTENERS: ContextVar[tuple[Callable, ...]] = ContextVar("wanflow_step_listeners", default=())


@contextmanager
def listen_to_steps(listener: Callable) -> Iterator[None]:
    """Call `listener(step_info)` after every denoising step run in this context."""
    token = _STEP_LISTENERS.set((*_STEP_LISTENERS.get(), listener))
    try:
        yield
    finally:
        _STEP_LISTENERS.reset(token)


class _Progress:
    """Moves the run's progress artifact (in a flow run: outside one there is no page to show it) and logs
    each step."""

    def __init__(self, total: int):
        self.total = total
        self.reused = 0
        self.first_step_unix: float | None = None  # when the first step ended (time.time())
        self.artifact_id = (create_progress_artifact(0.0, description=f"denoising: 0/{total} steps")
                            if FlowRunContext.get() else None)
        self.last_update = time.monotonic()
        self.logger = get_run_logger()

    def __call__(self, info: wan_engine.StepInfo, reused: bool) -> None:
        self.first_step_unix = self.first_step_unix or time.time()
        note = ""
        if reused:
            self.reused += 1
            note = ", block stack reused"
        self.logger.info("step %d/%d (t=%d, %s expert): %.2f s%s", info.step + 1, info.total, info.timestep,
                         info.expert, info.seconds, note)
        done = info.step + 1 == info.total
        if self.artifact_id and (done or time.monotonic() - self.last_update >= PROGRESS_UPDATE_SECONDS):
            reused = f", {self.reused} reused the cache" if self.reused else ""
            update_progress_artifact(self.artifact_id, 100.0 * (info.step + 1) / info.total,
                                     description=f"denoising: {info.step + 1}/{info.total} steps{reused}")
            self.last_update = time.monotonic()
        for listener in _STEP_LISTENERS.get():
            listener(info)


class _CancelWatch:
    """True once the flow run is cancelling (the server is asked at most every CANCEL_CHECK_SECONDS) or its GPUs
    are lost (tasks/allocate.py `gpu_lease_lost`)."""

    def __init__(self):
        run = FlowRunContext.get()
        self.flow_run_id = run.flow_run.id if run else None
        self.last_check = time.monotonic()

    def __call__(self) -> bool:
        if gpu_lease_lost():
            return True
        if self.flow_run_id is None or time.monotonic() - self.last_check < CANCEL_CHECK_SECONDS:
            return False
        self.last_check = time.monotonic()
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(self.flow_run_id).state
        return state is not None and state.type in (StateType.CANCELLING, StateType.CANCELLED)


@task(name="denoise", retries=0, cache_policy=NO_CACHE)
def denoise(run: RunDescription, engines: EngineCache | None = None) -> Denoised | State:
    """Encode the prompt and run the sampler under the run's tier; returns the clean latents (no VAE decode here).

    On the resident engine worker of the run's GPU when `wanflow worker` keeps one (tasks/engine_channel.py),
    else in this process. `engines`: where the pipeline is found in this process (default: its engine cache).
    """
    logger = get_run_logger()
    progress = _Progress(run.steps)
    tags = resident_tags(run, get_settings().engine_tags)
    tag = tags[0] if tags else None
    try:
        if tags is not None and len(tags) > 1:
            denoised = call_ranks(tags, run, on_step=progress, should_cancel=_CancelWatch(), log=logger)
        elif len(run.allocation.tags) > 1:  # no resident workers: the run's own rank processes
            with rank_processes(run) as directory:
                denoised = call_ranks(run.allocation.tags, run, on_step=progress, should_cancel=_CancelWatch(),
                                      log=logger, directory=directory)
        elif tag is not None:
            denoised = call(tag, Job("denoise", run, run.allocation.lease_id), on_step=progress,
                            should_cancel=_CancelWatch(), log=logger)
        else:
            denoised = run_denoise(engines or process_engines(), run, on_step=progress, should_cancel=_CancelWatch())
    except wan_engine.GenerationCancelled as exc:
        if gpu_lease_lost():
            raise GpuLeaseLost(gpu_lease_lost()) from exc
        return Cancelled(message=f"cancelled between denoising steps: {exc}")
    denoised.engine["first_step_unix"] = progress.first_step_unix  # against the flow run's start: cold or warm
    for name, count in denoised.prompt_tokens.items():
        if count["truncated"]:
            logger.warning("the %s has %d tokens but the text encoder reads only the first %d: the rest has no "
                           "effect; shorten it", name.replace("_", " "), count["tokens"], count["kept"])
    timings = {k: v for k, v in denoised.timings.items() if k != "load"}
    where = f"resident engine worker(s) {', '.join(tags)} (pid {denoised.engine['pid']})" if tags else "this process"
    logger.info("denoised %d frames at %s in %.1f s on %s (%s; pipelines loaded there so far: %d)",
                run.frame_count, run.size, sum(denoised.step_seconds), where,
                ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()), denoised.engine["loads"])
    cache = denoised.step_cache
    if cache is not None:
        logger.info("tier %s, %s: %d/%d model calls computed, %d skipped; computed steps %s", run.tier,
                    cache["method"], cache["computed"], cache["total"], cache["skipped"],
                    cache["executed_computed_steps"])
        if not cache["matches_schedule"]:
            logger.warning("the model calls computed %s differ from the precomputed schedule %s",
                           cache["executed_computed_steps"], cache["computed_steps"])
    return denoised
