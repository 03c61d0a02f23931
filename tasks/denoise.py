"""The `denoise` task: text encoding and the sampling loop under the run's performance tier, with a
progress artifact per step.

With a step cache (TeaCache in the speed tier, MagCache for I2V in balanced) the schedule of computed
and skipped block stacks is fixed before sampling; the task reports it with what the loop actually
did, per step and per cond/uncond branch.

Stops between steps when the flow run is being cancelled (checked at most every
CANCEL_CHECK_SECONDS), fails there when the run's GPU lease is lost, and turns a CUDA out-of-memory
error into next steps. On a GPU it also reads the card's energy over the sampling (NVML), which the
published metadata reports.
Listeners registered with `listen_to_steps` (the CLI's progress bar) see every step too.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field

import torch
from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.context import FlowRunContext
from prefect.states import Cancelled, State

import wan_engine
from patches.power import PowerMeter, PowerReading
from tasks.allocate import gpu_lease_lost
from tasks.leases import GpuLeaseLost
from tasks.pipelines import EngineCache, out_of_memory_as_advice, process_engines
from tasks.runs import RunDescription

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

    @property
    def model_calls(self) -> dict[str, int]:
        """Model calls (one per step and cond/uncond branch) whose block stack ran or was reused."""
        if self.step_cache is None:
            total = 2 * len(self.step_seconds)
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


class _Progress:
    """Moves the run's progress artifact (in a flow run: outside one there is no page to show it) and logs
    each step."""

    def __init__(self, total: int, step_cache=None):
        self.total = total
        self.step_cache = step_cache
        self.reused = 0
        self.artifact_id = (create_progress_artifact(0.0, description=f"denoising: 0/{total} steps")
                            if FlowRunContext.get() else None)
        self.last_update = time.monotonic()
        self.logger = get_run_logger()

    def __call__(self, info) -> None:
        note = ""
        if self.step_cache is not None:  # the calls of this step were just recorded by the cache
            calls = [c for c in self.step_cache.calls if c.step == info.step]
            if not any(c.computed for c in calls):
                self.reused += 1
                note = ", block stack reused"
        self.logger.info("step %d/%d (t=%d, %s expert): %.2f s%s", info.step + 1, info.total, info.timestep,
                         info.expert, info.seconds, note)
        done = info.step + 1 == info.total
        if self.artifact_id and (done or time.monotonic() - self.last_update >= PROGRESS_UPDATE_SECONDS):
            reused = f", {self.reused} reused the cache" if self.step_cache is not None else ""
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

    `engines`: where the pipeline is found (default: this process's engine cache).
    """
    logger = get_run_logger()
    engines = engines or process_engines()
    with out_of_memory_as_advice(run, engines):
        started = time.perf_counter()
        pipe, handle = engines.tiered(run)
        load_s = time.perf_counter() - started  # ~0 when this process loaded it before
        progress = _Progress(run.steps, handle.step_cache)
        try:
            with PowerMeter(pipe.device) as meter:
                result = pipe.generate(run.prompt, negative_prompt=run.negative_prompt, image=run.image,
                                       size=run.size, frame_num=run.frame_count, steps=run.steps, shift=run.shift,
                                       guide_scale=run.guide_scale, solver=run.solver, seed=run.seed, decode=False,
                                       callback=progress, should_cancel=_CancelWatch())
        except wan_engine.GenerationCancelled as exc:
            if gpu_lease_lost():
                raise GpuLeaseLost(gpu_lease_lost()) from exc
            return Cancelled(message=f"cancelled between denoising steps: {exc}")
    for name, count in result.prompt_tokens.items():
        if count.truncated:
            logger.warning("the %s has %d tokens but the text encoder reads only the first %d: the rest has no "
                           "effect; shorten it", name.replace("_", " "), count.tokens, count.kept)
    logger.info("denoised %d frames at %s in %.1f s (%s)", run.frame_count, run.size, sum(result.step_seconds),
                ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items()))
    cache_record = None
    computed = {"cond": list(range(run.steps)), "uncond": list(range(run.steps))}
    if handle.step_cache is not None:
        cache_record = _step_cache_record(handle.step_cache)
        computed = cache_record["executed_computed_steps"]
        logger.info("tier %s, %s: %d/%d model calls computed, %d skipped; computed steps %s",
                    run.tier, cache_record["method"], cache_record["computed"], cache_record["total"],
                    cache_record["skipped"], cache_record["executed_computed_steps"])
        if not cache_record["matches_schedule"]:
            logger.warning("the model calls computed %s differ from the precomputed schedule %s",
                           cache_record["executed_computed_steps"], cache_record["computed_steps"])
    return Denoised(latents=result.latents, seed=result.seed, settings=dict(result.settings),
                    timings={"load": load_s, **result.timings}, step_seconds=list(result.step_seconds),
                    experts_per_step=list(result.experts_per_step), tier=handle.summary(), step_cache=cache_record,
                    block_stack=_block_stack_per_step(computed, run.steps), energy=energy_record(meter.reading),
                    prompt_tokens={name: asdict(count) for name, count in result.prompt_tokens.items()})


def energy_record(reading: PowerReading | None) -> dict | None:
    """What the GPU drew while the text encoder and the sampler ran (the whole card: other work on it
    counts too); None where NVML could not tell (a CPU run, no driver)."""
    if reading is None:
        return None
    return {"joules": round(reading.joules, 1), "mean_watts": round(reading.watts, 1),
            "mean_sm_mhz": round(reading.sm_mhz), "power_capped": round(reading.power_capped, 3)}
