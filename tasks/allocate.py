"""The `allocate-gpus` task: pick GPUs by strategy and hold them for the whole GPU phase.

A run's GPUs are one-slot tag concurrency limits taken with a lease (tasks/leases.py), in the
arrival order of the host's waiting runs (tasks/gpu_queue.py). The task returns the lease and
`hold_gpus` keeps it renewed until the GPU phase ends. (`prefect.concurrency.sync.concurrency()`
cannot span tasks: a task run releases every lease taken inside it when it ends.)

A waiting run polls, says in its logs and in its flow run's state message which GPUs it waits
for and its place in line, and stops waiting when its run is being cancelled. The state message
is never forced onto the run, so a run being cancelled stays cancelled.

A lease the server forgets (expired while the holder could not reach it, or the server restarted)
is taken again at once if its GPUs are still free; otherwise the run has lost them:
`gpu_lease_lost()` tells the GPU work, which stops at its next check, and the run fails.
"""
from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from uuid import UUID

import httpx
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import ConcurrencyLeaseHolder, StateType
from prefect.client.schemas.responses import SetStateStatus
from prefect.context import FlowRunContext
from prefect.exceptions import ObjectNotFound
from prefect.settings import get_current_settings
from prefect.states import Cancelled, Running, State
from pydantic import BaseModel

from tasks.gpu_queue import GpuQueue, Strategy, Turn, ordinal, turn
from tasks.gpus import GpuInfo, GpuProfile
from tasks.leases import (
    GpuLeaseLost,
    LeaseFiles,
    lease_gone,
    limit_name,
    lock_dir,
    reap_dead_leases,
    reconcile_stale_slots,
    release_lease,
    take_lease,
)
from tasks.runlog import run_logger
from wan_engine.configs import TINY_PRESETS, ModelSpec
from wan_engine.parallel import usable_world_sizes
from wan_engine.plan import plan_steps
from wan_engine.tiny import TINY_DIT

WAIT_LOG_SECONDS = 30.0  # how often a waiting run repeats that it is waiting
RENEW_FRACTION = 1 / 3  # renew once this share of the lease has passed: two renewals may fail before it ends


class Allocation(BaseModel):
    """The GPUs a run holds (none for a CPU run) and the lease that holds them."""

    gpus: list[GpuInfo] = []
    tags: list[str] = []
    lease_id: UUID | None = None
    lease_seconds: float = 60.0
    device: str = "cpu"  # where the engine runs
    waited_s: float = 0.0
    # Wall-clock seconds (time.time()) when the slots were taken and given back: the hold that metadata.json
    # records, so that runs of several processes can be checked for two holders of one GPU.
    acquired_unix: float | None = None
    released_unix: float | None = None

    @property
    def gpu_ids(self) -> list[int]:
        return [g.index for g in self.gpus]


def num_heads(checkpoint: str) -> int | None:
    """Attention heads of a checkpoint folder's DiT, or of a preset's (None for unreadable folders)."""
    if checkpoint in TINY_PRESETS:
        return TINY_DIT["num_heads"]
    for config in (Path(checkpoint) / "high_noise_model" / "config.json", Path(checkpoint) / "config.json"):
        if config.is_file():
            return json.loads(config.read_text()).get("num_heads")
    return None


def job_world_sizes(spec: ModelSpec, checkpoint: str | None, guide_scale: float | None, max_world: int) -> list[int]:
    """The GPU counts up to `max_world` that one job of `checkpoint` can compute on, by the engine's parallel plan:
    Ulysses divides the DiT's heads, a guided run puts its two CFG branches on two halves. [1] when the heads
    cannot be read (a run never holds a GPU it does not compute on)."""
    heads = num_heads(checkpoint) if checkpoint else None
    if heads is None:
        return [1]
    guided = any(g != 1.0 for g in plan_steps(spec, guide_scale=guide_scale).guide_scales)
    return usable_world_sizes(max_world, heads, "sequential" if guided else "none")


# NVLink multicast (NVLS) stays off on every topology, in every process that may form an NCCL group.
NCCL_ENVIRONMENT = {"NCCL_NVLS_ENABLE": "0"}


def gpu_environment(gpus: list[GpuInfo], profile: GpuProfile) -> dict[str, str]:
    """Environment for the engine process on these GPUs: allocator and NCCL settings."""
    env = dict(NCCL_ENVIRONMENT)
    ids = {g.index for g in gpus}
    if any(not link.p2p for link in profile.links if link.a in ids and link.b in ids):
        env["NCCL_P2P_DISABLE"] = "1"  # some pair has no peer path: NCCL must not try one
    return env


def apply_gpu_environment(env: dict[str, str]) -> None:
    """Set the GPU process environment (before CUDA starts; a user's allocator setting wins)."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # cuda:k follows NVML's order
    os.environ.update(env)


def embedded_server() -> bool:
    """Whether this process talks to an ephemeral server it starts itself (no PREFECT_API_URL)."""
    return get_current_settings().api.url is None


def ensure_limits(client: SyncPrefectClient, tags: list[str]) -> None:
    """Create the one-slot limit of every tag that has none yet."""
    for tag in tags:
        try:
            client.read_global_concurrency_limit_by_name(limit_name(tag))
        except ObjectNotFound:
            client.create_concurrency_limit(tag=tag, concurrency_limit=1)
            run_logger().info("created concurrency limit %s (1 slot)", tag)


def free_tags(client: SyncPrefectClient, tags: list[str]) -> list[str]:
    """The tags with a free slot right now."""
    limits = [client.read_global_concurrency_limit_by_name(limit_name(t)) for t in tags]
    return [t for t, limit in zip(tags, limits, strict=True) if limit.active_slots < limit.limit]


class AllocationCancelled(Exception):
    """The run was cancelled while it waited for its GPUs."""


def acquire_gpus(client: SyncPrefectClient, profile: GpuProfile, strategy: Strategy, tag_base: str,
                 gpu_ids: list[int] | None = None, gpus_per_job: int | None = None,
                 world_sizes: list[int] | None = None, poll_seconds: float = 2.0, lease_seconds: float = 60.0,
                 holder: ConcurrencyLeaseHolder | None = None,
                 on_wait: Callable[[str], None] | None = None,
                 cancelled: Callable[[], bool] | None = None) -> Allocation:
    """Wait for this run's turn at the strategy's GPUs, take them and return the allocation.

    `world_sizes`: the GPU counts the run's job can compute on (`job_world_sizes`), of which `auto` takes the
    largest free; None: any.

    `on_wait(message)` is called when the run starts waiting, when its place in line changes and
    every WAIT_LOG_SECONDS; `cancelled()` is asked at every poll and raises AllocationCancelled when true.
    """
    by_index = {g.index: g for g in profile.gpus}
    candidates = [i for i in (gpu_ids or by_index) if i in by_index]
    if not candidates:
        return Allocation(lease_seconds=lease_seconds)
    index_of = {f"{tag_base}-{i}": i for i in candidates}
    tags = list(index_of)
    needed = len(candidates) if strategy == "max_speed" else (gpus_per_job or 1) if strategy == "concurrent" else 1
    if needed > len(candidates):
        raise ValueError(f"gpus_per_job={gpus_per_job} but only {len(candidates)} GPU(s) are selected")
    ensure_limits(client, tags)
    embedded, started, said, said_at = embedded_server(), time.monotonic(), None, 0.0
    queue = GpuQueue(lock_dir() / "queue")
    with queue.waiting(strategy, tags, gpus_per_job, world_sizes, str(holder.id) if holder else None) as ticket:
        while True:
            if cancelled is not None and cancelled():
                raise AllocationCancelled(f"cancelled while waiting for {_describe(tag_base, candidates)}")
            tickets = queue.tickets()
            # An older run's pick depends on its other GPUs too, so read every GPU a rival waits for.
            watched = sorted({t for k in tickets if set(k.candidates) & set(tags) for t in k.candidates} | set(tags))
            free = free_tags(client, watched)
            if len(free) < len(watched):
                free += _free_dead_holders(client, [t for t in watched if t not in free], embedded)
            now = turn(tickets, ticket, free)
            if now.pick:
                taken = take_lease(client, now.pick, lease_seconds, embedded, holder)
                if taken is None:
                    continue  # another run took one of them first: look again at once
                lease_id, files = taken
                _FILES[lease_id] = files
                gpus = [by_index[index_of[t]] for t in now.pick]
                return Allocation(gpus=gpus, tags=now.pick, lease_id=lease_id, lease_seconds=lease_seconds,
                                  device=gpus[0].device, waited_s=time.monotonic() - started,
                                  acquired_unix=time.time())
            message = _wait_message(strategy, tag_base, candidates, needed, now)
            if on_wait and (message != said or time.monotonic() - said_at >= WAIT_LOG_SECONDS):
                on_wait(message)
                said, said_at = message, time.monotonic()
            time.sleep(poll_seconds * random.uniform(0.75, 1.25))  # jitter: waiters do not poll in step


def _free_dead_holders(client: SyncPrefectClient, busy: list[str], embedded: bool) -> list[str]:
    """Give back the slots among `busy` whose holders died; returns their tags."""
    if embedded:
        freed = reconcile_stale_slots(client, busy, lock_dir())
        for tag in freed:
            run_logger().warning("%s was held by a process that died: slot given back", tag)
        return freed
    freed = []
    for reaped in reap_dead_leases(client):
        run_logger().warning("%s held by run %s whose process died: lease released", ", ".join(reaped.tags),
                             reaped.flow_run_id)
        freed += [t for t in reaped.tags if t in busy]
    return freed


def _describe(tag_base: str, indices: list[int]) -> str:
    """`gpu-0..gpu-3` for three or more consecutive GPUs, else their tags."""
    if len(indices) >= 3 and indices == list(range(indices[0], indices[-1] + 1)):
        return f"{tag_base}-{indices[0]}..{tag_base}-{indices[-1]}"
    return ", ".join(f"{tag_base}-{i}" for i in indices)


def _wait_message(strategy: Strategy, tag_base: str, candidates: list[int], needed: int, now: Turn) -> str:
    wanted = "the first free GPU" if strategy == "auto" else f"{needed} GPU{'s' if needed > 1 else ''}"
    return (f"waiting for {wanted} of {_describe(tag_base, candidates)} ({strategy}), "
            f"{ordinal(now.place)} in line of {now.waiting}")


# What the leases this process holds keep locked until after their release (see tasks/leases.py).
_FILES: dict[UUID, LeaseFiles] = {}


def release_gpus(allocation: Allocation) -> bool:
    """Give the allocation's slots back; False when the server no longer held them (nothing to give back)."""
    if allocation.lease_id is None:
        return False
    try:
        with get_client(sync_client=True) as client:
            return release_lease(client, allocation.lease_id)
    finally:
        files = _FILES.pop(allocation.lease_id, None)
        if files is not None:
            files.close()  # only after the release: see tasks/leases.py


_HELD: ContextVar[_LeaseKeeper | None] = ContextVar("wanflow_held_lease", default=None)


def gpu_lease_lost() -> str | None:
    """Why the GPUs held around this code (by `hold_gpus`) were lost, None while they are held."""
    keeper = _HELD.get()
    return keeper.lost if keeper else None


@contextmanager
def hold_gpus(allocation: Allocation) -> Iterator[Allocation]:
    """Keep the allocation's lease alive while the block runs; release it however the block ends.

    Raises GpuLeaseLost after a block that completed while its GPUs were lost.
    """
    if allocation.lease_id is None:
        yield allocation
        return
    keeper = _LeaseKeeper(allocation)
    keeper.start()
    token = _HELD.set(keeper)
    try:
        yield allocation
    finally:
        _HELD.reset(token)
        keeper.halt.set()
        keeper.join(timeout=10)
        tags = ", ".join(allocation.tags)
        allocation.released_unix = time.time()  # before the release: the recorded hold lies within the real one
        try:
            if release_gpus(allocation):
                keeper.logger.info("released %s", tags)
            elif not keeper.lost:
                keeper.logger.warning("%s: the server no longer held this run's lease; nothing to release", tags)
        except Exception as exc:  # never hide the run's own outcome behind this
            keeper.logger.warning("could not release %s (%s): the server frees them when the %g s lease ends",
                                  tags, exc, allocation.lease_seconds)
    if keeper.lost:
        raise GpuLeaseLost(keeper.lost)


class _LeaseKeeper(threading.Thread):
    """Renews the allocation's lease; takes its GPUs again under a new lease when the server forgot it."""

    def __init__(self, allocation: Allocation):
        super().__init__(daemon=True, name=f"wanflow-lease-{allocation.lease_id}")
        self.allocation = allocation
        self.halt = threading.Event()
        self.lost: str | None = None
        self.logger = run_logger()  # the run's logger, so that this thread's lines reach the run's log
        run = FlowRunContext.get()
        self.holder = ConcurrencyLeaseHolder(type="flow_run", id=run.flow_run.id) if run else None

    def run(self) -> None:
        with get_client(sync_client=True) as client:
            while not self.lost and not self.halt.wait(self.allocation.lease_seconds * RENEW_FRACTION):
                try:
                    client.renew_concurrency_lease(self.allocation.lease_id, self.allocation.lease_seconds)
                except Exception as exc:
                    if lease_gone(exc):
                        self._take_again(client, exc)
                    else:  # the lease has slack for two more tries
                        self.logger.warning("renewing the GPU lease failed (%s); retrying", exc)

    def _take_again(self, client: SyncPrefectClient, gone: httpx.HTTPStatusError) -> None:
        allocation, tags = self.allocation, ", ".join(self.allocation.tags)
        why = f"the server no longer held this run's lease on {tags} (it answered {gone.response.status_code})"
        try:
            taken = take_lease(client, allocation.tags, allocation.lease_seconds, embedded_server(), self.holder)
            failure = "another run holds some of them now"
        except Exception as exc:
            taken, failure = None, f"taking them again failed: {exc}"
        old = _FILES.pop(allocation.lease_id, None)
        if taken is not None:
            allocation.lease_id, files = taken
            _FILES[allocation.lease_id] = files
            self.logger.warning("%s; took them again under a new lease", why)
        else:
            self.lost = f"lost GPU {tags}: {why}, and {failure}"
            self.logger.error("%s; the GPU work stops", self.lost)
        if old is not None:
            old.close()


def _cancelling(client: SyncPrefectClient, flow_run_id: UUID) -> bool:
    state = client.read_flow_run(flow_run_id).state
    return state is not None and state.type in (StateType.CANCELLING, StateType.CANCELLED)


def _set_flow_run_message(flow_run_id: UUID | None, message: str) -> bool:
    """Make `message` the run's state message; False when the run is no longer Running (left as it is).

    Only the flow run: task runs reach the server through events, so this task's own run may not
    exist there yet. Never forced: a run being cancelled must stay so. A message is informative,
    so failing to set it is not fatal.
    """
    if flow_run_id is None:
        return False
    try:
        with get_client(sync_client=True) as client:
            result = client.set_flow_run_state(flow_run_id, Running(message=message))
    except Exception as exc:
        run_logger().warning("could not set the run's state message: %s", exc)
        return False
    return result.status == SetStateStatus.ACCEPT


@task(name="allocate-gpus", retries=0, cache_policy=NO_CACHE)
def allocate_gpus(profile: GpuProfile, strategy: Strategy, tag_base: str, gpu_ids: list[int] | None = None,
                  gpus_per_job: int | None = None, world_sizes: list[int] | None = None, poll_seconds: float = 2.0,
                  lease_seconds: float = 60.0) -> Allocation | State:
    """Take this run's GPUs by `strategy`, waiting for its turn; none on a host without GPUs.

    Returns a Cancelled state, holding nothing, when the run is cancelled before it has its GPUs.
    """
    logger = get_run_logger()
    if not profile.select(gpu_ids).gpus:  # nothing to hold: nothing to ask the server
        logger.info("no GPU on this host: the engine runs on the CPU")
        return Allocation(lease_seconds=lease_seconds)
    flow_run = FlowRunContext.get()
    flow_run_id = flow_run.flow_run.id if flow_run else None
    holder = ConcurrencyLeaseHolder(type="flow_run", id=flow_run_id) if flow_run_id else None
    said: list[str] = []

    def say_waiting(message: str) -> None:
        said.append(message)
        logger.info("%s", message)
        _set_flow_run_message(flow_run_id, message)

    with get_client(sync_client=True) as client:
        cancelled = (lambda: _cancelling(client, flow_run_id)) if flow_run_id else None
        try:
            allocation = acquire_gpus(client, profile, strategy, tag_base, gpu_ids, gpus_per_job, world_sizes,
                                      poll_seconds, lease_seconds, holder, on_wait=say_waiting, cancelled=cancelled)
        except AllocationCancelled as exc:
            logger.info("%s: no GPU taken", exc)
            return Cancelled(message=f"{exc}: no GPU taken")
        try:
            logger.info("strategy %s: holding %s after waiting %.1f s", strategy, ", ".join(allocation.tags),
                        allocation.waited_s)
            if said:
                _set_flow_run_message(flow_run_id, f"running on {', '.join(allocation.tags)}")
            if cancelled is not None and cancelled():  # a cancel that landed while the slots were taken
                release_gpus(allocation)
                message = f"cancelled before its GPU work: {', '.join(allocation.tags)} given back"
                logger.info("%s", message)
                return Cancelled(message=message)
            if not profile.simulated:
                apply_gpu_environment(gpu_environment(allocation.gpus, profile))
        except BaseException:
            release_gpus(allocation)
            raise
    return allocation
