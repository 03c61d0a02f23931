"""One generation on several devices: the parallel plan, the rank's groups, and `run_rank`.

A job over W ranks is split two ways, combinable (`ParallelPlan`):
- CFG parallelism (degree 1 or 2): the conditional branch on the first half of the ranks, the unconditional on
  the second; one exchange of the prediction per step (an all-gather over the pair that shares a token slice),
  no attention traffic. Only for guided runs (the plan's CFG mode is not "none").
- Ulysses sequence parallelism (degree U, dividing the model's heads): within each half the tokens are split
  over U ranks (`wan_engine.ulysses`).
Rank r computes branch r // U on token slice r % U: 8 ranks = 2 CFG x 4 Ulysses.

`run_rank(pipe, job, parallel, ...)` runs one rank of a job (every rank calls it with the same arguments) in a
process group the caller formed with `init_job_group`. Rank 0 encodes the prompt and the I2V image once per job
and broadcasts them (the text encoder runs once, and every rank conditions on the very same tensors whatever its
device's kernels); rank 0's noise is broadcast too. Every rank then runs the pipeline's own loop on its share:
step caches hook in as in a single-process run and take their skip schedule from the plan, which is the same on
every rank, so every rank computes or skips the same calls and the collectives stay matched. Every rank ends with
the same latents; rank 0 decodes them and returns the result, the others None. Decoding on one rank is what the
measurements favour: the bf16 decode of 81 frames at 480p takes 1.23 s on an H200 (docs/benchmarks.md, issue 4)
against about 225 s of denoising on one GPU (40 steps of two 2.81 s forwards), so even on 8 GPUs a split decode
could save under 1 s of about 30; and the VAE's causal convolutions carry state from frame to frame, so a split
over frames would need overlapping chunks to stay exact.

Failure: every collective is bounded by the job group's timeout (`init_job_group`, 45 s by default, so that a
job with a dead rank has failed within a minute). A rank that raises records its error in the job's store and
aborts its group; each other rank's pending collective then fails at the timeout at the latest (on gloo at once
when the failing process exits and its connections close), and it raises `RankFailed` naming the first failing
rank and its error. A rank that dies without a word (killed) breaks its peers' collectives the same way (on gloo
at once). Nothing waits forever. On NCCL the
watchdog's default on a timeout is to end the process (TORCH_NCCL_ASYNC_ERROR_HANDLING=3); a long-lived worker
that should outlive a failed job sets it to 2 (abort the job's communicators and raise) before its first group.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from .pipeline import GenerationCancelled, GenerationResult, PromptContext, StepInfo, WanPipeline
from .plan import CFG_MODES, RunPlan, plan_steps
from .ulysses import Ulysses, all_gather

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = datetime.timedelta(seconds=45)
ERROR_PREFIX = "wanflow-errors/"


@dataclass(frozen=True)
class ParallelPlan:
    """How a job's ranks share it: `cfg` (1 or 2) halves for the guidance branches, `ulysses` ranks per half."""

    ulysses: int = 1
    cfg: int = 1

    def __post_init__(self):
        if self.ulysses < 1:
            raise ValueError(f"Ulysses degree must be at least 1, got {self.ulysses}")
        if self.cfg not in (1, 2):
            raise ValueError(f"CFG-parallel degree must be 1 or 2 (one rank group per branch), got {self.cfg}")

    @property
    def world(self) -> int:
        return self.ulysses * self.cfg

    def check(self, num_heads: int, cfg_mode: str) -> None:
        """Raise ValueError when this plan cannot run a model of `num_heads` heads in CFG mode `cfg_mode`."""
        if num_heads % self.ulysses:
            raise ValueError(f"Ulysses degree {self.ulysses} does not divide the model's {num_heads} heads")
        if cfg_mode not in CFG_MODES:
            raise ValueError(f"cfg_mode must be one of {CFG_MODES}, got {cfg_mode!r}")
        if self.cfg == 2 and cfg_mode == "none":
            raise ValueError("CFG parallelism needs a guided run: at guide scale 1 there is no uncond branch")

    def summary(self) -> dict:
        """For a run's metadata."""
        return {"world": self.world, "ulysses": self.ulysses, "cfg": self.cfg}


def choose_parallel_plan(world_size: int, num_heads: int, cfg_mode: str) -> ParallelPlan:
    """The plan for `world_size` ranks: the two CFG branches on two halves when the run is guided and the world
    is even, the rest Ulysses. ValueError when the Ulysses degree left would not divide the heads."""
    if world_size < 1:
        raise ValueError(f"a job needs at least one rank, got {world_size}")
    cfg = 2 if cfg_mode != "none" and world_size % 2 == 0 else 1
    plan = ParallelPlan(world_size // cfg, cfg)
    try:
        plan.check(num_heads, cfg_mode)
    except ValueError as exc:
        usable = usable_world_sizes(world_size, num_heads, cfg_mode)
        raise ValueError(f"{world_size} ranks cannot share one job: {exc} (usable: {usable})") from None
    return plan


def default_parallel_plan(pipe: WanPipeline, world_size: int, *, steps: int | None = None,
                          shift: float | None = None, solver: str = "unipc",
                          guide_scale: float | tuple[float, float] | None = None) -> ParallelPlan:
    """`choose_parallel_plan` for `pipe`'s model and a run with these settings (read without planning the run)."""
    return choose_parallel_plan(world_size, _heads(pipe), _cfg_mode(pipe, steps, shift, solver, guide_scale))


def _heads(pipe: WanPipeline) -> int:
    return next(iter(pipe.experts.values())).config.num_heads


def _cfg_mode(pipe: WanPipeline, steps, shift, solver, guide_scale) -> str:
    """"none" for a run that is unguided at every step, else "sequential" (what the parallel plan needs to know)."""
    unguided = all(g == 1.0 for g in plan_steps(pipe.spec, steps, shift, solver, guide_scale).guide_scales)
    return "none" if unguided else "sequential"


def usable_world_sizes(max_world: int, num_heads: int, cfg_mode: str) -> list[int]:
    """The rank counts up to `max_world` that `choose_parallel_plan` accepts (for taking the largest free set)."""
    usable = []
    for world in range(1, max_world + 1):
        cfg = 2 if cfg_mode != "none" and world % 2 == 0 else 1
        if num_heads % (world // cfg) == 0:
            usable.append(world)
    return usable


class RankFailed(RuntimeError):
    """Another rank of the job failed; `rank` and `error` say which and how."""

    def __init__(self, rank: int, error: str):
        super().__init__(f"rank {rank} of the job failed: {error}")
        self.rank = rank
        self.error = error


@dataclass
class JobGroup:
    """The process group of one job (this process's rank in it) and the store its ranks report errors in."""

    group: dist.ProcessGroup
    store: dist.Store
    rank: int
    size: int
    timeout: datetime.timedelta
    closed: bool = False

    def close(self, abort: bool = False) -> None:
        """Dissolve the job's process group (idempotent). `abort`: end this rank's pending work on it first (a
        failed rank's NCCL kernels would otherwise wait on peers that never come)."""
        if not self.closed:
            self.closed = True
            if abort:
                self.group.abort()
            dist.destroy_process_group()

    @contextmanager
    def reporting(self) -> Iterator[None]:
        """Errors inside: the first rank to fail records its error and aborts the group (re-raising it); a rank
        that fails after (its collective broken by the first) raises `RankFailed` with the first one's error.
        A cancellation passes through: the ranks agreed on it and the group can serve on."""
        try:
            yield
        except GenerationCancelled:   # every rank stopped at the same agreed step: the group is still sound
            raise
        except BaseException as exc:
            try:
                order = self.store.add(ERROR_PREFIX + "count", 1)
                self.store.set(f"{ERROR_PREFIX}{order}", f"{self.rank}\t{type(exc).__name__}: {exc}")
                first = self.store.get(f"{ERROR_PREFIX}1").decode() if order > 1 else None
            except Exception:   # the store went with a dead rank: this rank's own error is all there is
                first = None
            finally:
                self.close(abort=True)
            if first is None:
                raise
            first_rank, first_error = first.split("\t", 1)
            raise RankFailed(int(first_rank), first_error) from exc


def init_job_group(rank: int, world_size: int, store: dist.Store, backend: str | None = None,
                   timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> JobGroup:
    """Form the process group of one job (this process is `rank`) over `store`, which the job's ranks share
    (a TCPStore whose server rank 0 hosts, or a PrefixStore of its own per job over a longer-lived one: the
    job's error records live there too); `timeout` bounds every collective of the job. The backend defaults to
    NCCL on CUDA and gloo on CPUs. The group is the process's default one, so a process serves one job at a
    time; with CUDA, set the rank's device (`torch.cuda.set_device`) first. Dissolve it with `JobGroup.close()`
    (a long-lived worker can form the next job's group after)."""
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    return JobGroup(dist.group.WORLD, store, rank, world_size, timeout)


@dataclass(frozen=True)
class RankGroups:
    """One rank's part in a job: its CFG branch and the groups it exchanges with (what the loop needs)."""

    job: dist.ProcessGroup
    plan: ParallelPlan
    branch: int                        # index of this rank's branch in the plan's ("cond", "uncond"); 0 without CFG
    ulysses: Ulysses | None            # the ranks that split this branch's tokens (None: ulysses degree 1)
    cfg_group: dist.ProcessGroup | None   # the pair that computes the two branches of one token slice

    @classmethod
    def build(cls, job: JobGroup, plan: ParallelPlan) -> RankGroups:
        """Every rank calls this in the same order (sub-groups are formed collectively, with the job's timeout)."""
        if plan.world != job.size:
            raise ValueError(f"the parallel plan needs {plan.world} ranks, the job has {job.size}")
        u = plan.ulysses
        if plan.cfg == 1 or u == 1:   # one dimension: the job's group is that dimension's group
            sp_group, cfg_group = job.group if u > 1 else None, job.group if plan.cfg == 2 else None
        else:
            sp_group = cfg_group = None
            for branch in range(plan.cfg):   # new_group is collective over the job: all ranks form every group
                ranks = list(range(branch * u, (branch + 1) * u))
                g = dist.new_group(ranks, timeout=job.timeout)
                sp_group = g if job.rank in ranks else sp_group
            for slot in range(u):
                ranks = [slot + b * u for b in range(plan.cfg)]
                g = dist.new_group(ranks, timeout=job.timeout)
                cfg_group = g if job.rank in ranks else cfg_group
        return cls(job.group, plan, job.rank // u if plan.cfg == 2 else 0,
                   None if sp_group is None else Ulysses.of(sp_group), cfg_group)

    def close(self) -> None:
        """Destroy the sub-groups `build` formed (the job's own group stays with the job)."""
        for group in {self.ulysses.group if self.ulysses else None, self.cfg_group} - {None, self.job}:
            dist.destroy_process_group(group)

    def exchange_branches(self, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's branch prediction [1, C, f, h, w] -> (cond, uncond), both on every rank of the pair."""
        both = all_gather(pred, self.cfg_group)  # [2, C, f, h, w]
        return both[0:1], both[1:2]

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether `flag` is true on any rank of the job (so that every rank takes the same decision)."""
        t = torch.tensor([int(flag)], device=device)
        return bool(funcol.wait_tensor(funcol.all_reduce(t, "max", self.job)).item())


def _broadcast(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Rank 0's `t` on every rank (same shape and dtype everywhere)."""
    return funcol.wait_tensor(funcol.broadcast(t.contiguous(), 0, group))


def _max(value: int, group: dist.ProcessGroup, device: torch.device) -> int:
    t = torch.tensor([value], device=device)
    return int(funcol.wait_tensor(funcol.all_reduce(t, "max", group)).item())


@torch.no_grad()
def run_rank(pipe: WanPipeline, job: JobGroup, parallel: ParallelPlan, prompt: str, negative_prompt: str = "",
             *, image=None, size: tuple[int, int] = (832, 480), frame_num: int = 81, steps: int | None = None,
             shift: float | None = None, guide_scale: float | tuple[float, float] | None = None,
             solver: str = "unipc", seed: int = 0, decode: bool = True,
             callback: Callable[[StepInfo], None] | None = None,
             should_cancel: Callable[[], bool] | None = None,
             warm_up: Callable[[RunPlan, RankGroups], object] | None = None) -> GenerationResult | None:
    """This rank's part of one generation (arguments as `WanPipeline.generate`, the same on every rank).
    Returns the result on rank 0 (with `parallel`: the plan and every rank's denoise seconds), None elsewhere.
    `callback` is called on rank 0; `should_cancel` is asked on every rank and any rank's yes stops them all
    at the same step (GenerationCancelled). `warm_up(plan, ranks)` runs on every rank before the first step
    (the compile patch's `functools.partial(warm_up, pipe)`: compiled at the rank's own shapes; timed as
    "warm_up"). A failure on any rank fails every rank (see the module docstring)."""
    # Argument errors, the same on every rank, are raised before the job's group is touched.
    if parallel.world != job.size:
        raise ValueError(f"the parallel plan needs {parallel.world} ranks, the job has {job.size}")
    parallel.check(_heads(pipe), _cfg_mode(pipe, steps, shift, solver, guide_scale))
    with job.reporting():
        return _run_rank(pipe, job, parallel, prompt, negative_prompt, decode=decode, callback=callback,
                         should_cancel=should_cancel, warm_up=warm_up, image=image, size=size, frame_num=frame_num,
                         steps=steps, shift=shift, guide_scale=guide_scale, solver=solver, seed=seed)


def _run_rank(pipe: WanPipeline, job: JobGroup, parallel: ParallelPlan, prompt: str, negative_prompt: str, *,
              decode: bool, callback, should_cancel, warm_up, **plan_args) -> GenerationResult | None:
    t0 = time.perf_counter()
    plan = _agreed_plan(pipe, job, parallel, **plan_args)
    text, context, y = _shared_inputs(pipe, job, plan, prompt, negative_prompt)
    timings = {"conditioning_and_text": time.perf_counter() - t0}
    ranks = RankGroups.build(job, parallel)
    if job.rank == 0:
        log.info("one job on %d ranks: %d CFG x %d Ulysses, %d tokens, CFG %s", parallel.world, parallel.cfg,
                 parallel.ulysses, plan.grid.tokens, plan.cfg)
    try:
        if warm_up is not None:
            t0 = time.perf_counter()
            warm_up(plan, ranks)
            timings["warm_up"] = time.perf_counter() - t0
        sampled = pipe.sample(plan, context, y, callback=callback if job.rank == 0 else None,
                              should_cancel=should_cancel, ranks=ranks)
    finally:
        if not job.closed:   # a failure closed the job's group, sub-groups included
            ranks.close()
    timings["denoise"] = sampled.seconds
    seconds = torch.tensor([sampled.seconds], device=pipe.device, dtype=torch.float64)
    rank_seconds = all_gather(seconds, job.group).tolist()
    if job.rank != 0:
        return None
    result = pipe.result(plan, sampled, text, negative_prompt, timings, decode)
    result.parallel = {**parallel.summary(), "rank_denoise_seconds": rank_seconds}
    return result


def _agreed_plan(pipe: WanPipeline, job: JobGroup, parallel: ParallelPlan, **plan_args) -> RunPlan:
    """The same plan on every rank, with rank 0's noise. The CFG mode is agreed: none when unguided, one branch
    per forward with CFG parallelism, else one batch-2 forward only when every rank has the memory for it."""
    plan = pipe.plan(**plan_args, cfg="sequential")
    unguided = all(g == 1.0 for g in plan.steps.guide_scales)
    cfg_mode = "none" if unguided else "sequential" if parallel.cfg == 2 else "batched"
    if cfg_mode == "batched":
        unbatched = not pipe.batch_cfg(math.ceil(plan.grid.tokens / parallel.ulysses))
        cfg_mode = "sequential" if _max(int(unbatched), job.group, pipe.device) else "batched"
    return dataclasses.replace(plan, cfg=cfg_mode, noise=_broadcast(plan.noise, job.group))


def _shared_inputs(pipe: WanPipeline, job: JobGroup, plan: RunPlan, prompt: str,
                   negative_prompt: str) -> tuple[PromptContext | None, torch.Tensor, torch.Tensor | None]:
    """The prompt and the image, encoded once on rank 0 and sent to every rank: (rank 0's PromptContext, else
    None; the context rows [rows, Lc, 4096]; I2V's y [1, C_y, f, h, w], TI2V's [1, 48, 1, h, w] or None)."""
    lead, device = job.rank == 0, pipe.device
    dit_config = next(iter(pipe.experts.values())).config
    text = pipe.encode_prompt(plan, prompt, negative_prompt) if lead else None
    context_len = _max(text.context.shape[1] if lead else 0, job.group, device)
    context = _broadcast(text.context if lead else torch.zeros(len(plan.branches), context_len, dit_config.text_dim,
                                                               device=device, dtype=pipe.dtype), job.group)
    y = None
    if plan.conditioning.image is not None:
        if plan.conditioning.task == "ti2v":   # the image's latent, the first latent frame
            y_shape = (1, pipe.spec.z_dim, 1, *plan.grid.shape[1:])
        else:                                  # I2V's extra input channels over the whole grid
            y_shape = (1, dit_config.in_dim - pipe.spec.z_dim, *plan.grid.shape)
        y = _broadcast(pipe.encode_conditioning(plan) if lead else torch.zeros(y_shape, device=device), job.group)
    pipe._sync()
    return text, context, y
