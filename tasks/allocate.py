"""The `allocate-gpus` task: pick GPUs by strategy and hold them for the whole GPU phase.

Every GPU is guarded by the Prefect tag concurrency limit of its tag (`gpu-<i>`, stored
by Prefect as the global limit `tag:gpu-<i>`, one slot). Slots are taken with a lease
through the client's lease API, all of a run's GPUs in one atomic request that either
takes them all or answers 423 (taken), so choosing "whatever is free now" never races.
The task returns the lease and `hold_gpus` keeps it renewed until the GPU phase ends.
(`prefect.concurrency.sync.concurrency()` cannot span tasks: a task run releases every
lease taken inside it when it ends.)

A run whose GPUs are busy polls, and says in its logs and in its flow run's state
message which GPUs it waits for.

A holder that dies loses its slots when the lease expires on a real Prefect server. The
embedded (ephemeral) server runs no lease expiry, so a killed process would keep its slots
forever; there, every holder also keeps a shared `flock` on a per-tag file beside the
database, and a slot whose file nobody holds is stale and is given back.
"""
from __future__ import annotations

import fcntl
import json
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal
from uuid import UUID

import httpx
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.context import FlowRunContext
from prefect.exceptions import ObjectNotFound
from prefect.settings import get_current_settings
from prefect.states import Running
from pydantic import BaseModel

from tasks.gpus import GpuInfo, GpuProfile
from tasks.runlog import run_logger

Strategy = Literal["auto", "max_speed", "concurrent"]

WAIT_LOG_SECONDS = 30.0  # how often a waiting run repeats that it is waiting


class Allocation(BaseModel):
    """The GPUs a run holds (none for a CPU run) and the lease that holds them."""

    gpus: list[GpuInfo] = []
    tags: list[str] = []
    lease_id: UUID | None = None
    lease_seconds: float = 60.0
    device: str = "cpu"  # where the engine runs
    waited_s: float = 0.0

    @property
    def gpu_ids(self) -> list[int]:
        return [g.index for g in self.gpus]


def limit_name(tag: str) -> str:
    """The global concurrency limit Prefect keeps for a tag concurrency limit."""
    return f"tag:{tag}"


def choose_gpus(strategy: Strategy, candidates: list[int], free: list[int], gpus_per_job: int | None = None,
                heads: int | None = None) -> list[int]:
    """The GPUs to take now from `free` (a subset of `candidates`), or [] to keep waiting."""
    if strategy == "max_speed":
        return list(candidates) if set(candidates) <= set(free) else []
    if strategy == "concurrent":
        wanted = gpus_per_job or 1
        return free[:wanted] if len(free) >= wanted else []
    usable = len(free)
    while heads and usable > 1 and heads % usable:
        usable -= 1  # Ulysses splits the attention heads evenly over the GPUs
    return free[:usable]


def num_heads(checkpoint: str) -> int | None:
    """Attention heads of a checkpoint folder's DiT (None for presets and unreadable folders)."""
    for config in (Path(checkpoint) / "high_noise_model" / "config.json", Path(checkpoint) / "config.json"):
        if config.is_file():
            return json.loads(config.read_text()).get("num_heads")
    return None


def gpu_environment(gpus: list[GpuInfo], profile: GpuProfile) -> dict[str, str]:
    """Environment for the engine process on these GPUs: allocator and NCCL settings."""
    env = {"NCCL_NVLS_ENABLE": "0"}  # NVLink multicast (NVLS) stays off on every topology
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


def lock_dir() -> Path:
    """Per-tag lock files for the embedded server, beside its database in PREFECT_HOME."""
    return get_current_settings().home / "wanflow-gpu-locks"


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


def try_acquire(client: SyncPrefectClient, tags: list[str], lease_seconds: float,
                holder: ConcurrencyLeaseHolder | None = None) -> UUID | None:
    """Take one slot of every tag at once, or nothing (None) when any of them is taken."""
    try:
        response = client.increment_concurrency_slots_with_lease(
            [limit_name(t) for t in tags], 1, "concurrency", lease_seconds, holder
        )
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code == 423:
            return None
        raise
    body = response.json()
    lease_id = UUID(body["lease_id"])
    if len(body["limits"]) != len(tags):
        client.release_concurrency_slots_with_lease(lease_id)
        raise RuntimeError(f"concurrency limits missing for some of {tags}; they must exist before acquiring")
    return lease_id


def reconcile_stale_slots(client: SyncPrefectClient, tags: list[str], directory: Path) -> list[str]:
    """Give back slots held by processes that died (embedded server only); returns their tags.

    Live holders and acquirers keep a shared lock on the tag's file from before they ask for
    the slot until after they release it, so an exclusive lock that succeeds proves that
    every holder counted in `active_slots` is dead.
    """
    reclaimed = []
    for tag in tags:
        fd = _open_lock(directory, tag)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live process holds or is taking this slot
        else:
            if client.read_global_concurrency_limit_by_name(limit_name(tag)).active_slots > 0:
                client.update_global_concurrency_limit(
                    limit_name(tag), GlobalConcurrencyLimitUpdate(active_slots=0)
                )
                reclaimed.append(tag)
        finally:
            os.close(fd)  # also drops the flock
    return reclaimed


def _open_lock(directory: Path, tag: str) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    return os.open(directory / f"{tag}.lock", os.O_RDWR | os.O_CREAT, 0o644)


def _share_locks(directory: Path, tags: list[str]) -> list[int]:
    fds = [_open_lock(directory, tag) for tag in tags]
    for fd in fds:
        fcntl.flock(fd, fcntl.LOCK_SH)
    return fds


# Shared lock descriptors of the leases this process holds (embedded server only).
_LEASE_LOCKS: dict[UUID, list[int]] = {}


def acquire_gpus(client: SyncPrefectClient, profile: GpuProfile, strategy: Strategy, tag_base: str,
                 gpu_ids: list[int] | None = None, gpus_per_job: int | None = None, heads: int | None = None,
                 poll_seconds: float = 2.0, lease_seconds: float = 60.0,
                 holder: ConcurrencyLeaseHolder | None = None,
                 on_wait: Callable[[str], None] | None = None) -> Allocation:
    """Wait until the strategy's GPUs are free, take them and return the allocation.

    `on_wait(message)` is called when the run starts waiting and every WAIT_LOG_SECONDS after.
    """
    by_index = {g.index: g for g in profile.gpus}
    candidates = [i for i in (gpu_ids or by_index) if i in by_index]
    if not candidates:
        return Allocation(lease_seconds=lease_seconds)
    tag_of = {i: f"{tag_base}-{i}" for i in candidates}
    needed = len(candidates) if strategy == "max_speed" else (gpus_per_job or 1) if strategy == "concurrent" else 1
    if needed > len(candidates):
        raise ValueError(f"gpus_per_job={gpus_per_job} but only {len(candidates)} GPU(s) are selected")
    ensure_limits(client, list(tag_of.values()))
    embedded, started, last_said = embedded_server(), time.monotonic(), None
    while True:
        free = free_tags(client, list(tag_of.values()))
        if embedded and len(free) < len(tag_of):
            busy = [t for t in tag_of.values() if t not in free]
            for tag in reconcile_stale_slots(client, busy, lock_dir()):
                run_logger().warning("%s was held by a process that died: slot given back", tag)
                free.append(tag)
        pick = choose_gpus(strategy, candidates, [i for i in candidates if tag_of[i] in free], gpus_per_job, heads)
        if pick:
            tags = [tag_of[i] for i in pick]
            fds = _share_locks(lock_dir(), tags) if embedded else []
            lease_id = try_acquire(client, tags, lease_seconds, holder)
            if lease_id is not None:
                _LEASE_LOCKS[lease_id] = fds
                return Allocation(gpus=[by_index[i] for i in pick], tags=tags, lease_id=lease_id,
                                  lease_seconds=lease_seconds, device=by_index[pick[0]].device,
                                  waited_s=time.monotonic() - started)
            for fd in fds:
                os.close(fd)
            continue  # another run took one of them first: look again at once
        if on_wait and (last_said is None or time.monotonic() - last_said >= WAIT_LOG_SECONDS):
            on_wait(_wait_message(strategy, [tag_of[i] for i in candidates], needed))
            last_said = time.monotonic()
        time.sleep(poll_seconds * random.uniform(0.75, 1.25))  # jitter: waiters do not poll in step


def _wait_message(strategy: Strategy, tags: list[str], needed: int) -> str:
    if strategy == "max_speed":
        return f"waiting for GPUs {', '.join(tags)} (max_speed takes all of them), held by other runs"
    if strategy == "auto" or needed == 1:
        return f"waiting for the first free GPU of {', '.join(tags)}, all held by other runs"
    return f"waiting for {needed} free GPUs of {', '.join(tags)}, held by other runs"


def release_gpus(allocation: Allocation) -> None:
    """Give the allocation's slots back (idempotent)."""
    if allocation.lease_id is None:
        return
    try:
        with get_client(sync_client=True) as client:
            client.release_concurrency_slots_with_lease(allocation.lease_id)
    finally:
        for fd in _LEASE_LOCKS.pop(allocation.lease_id, []):
            os.close(fd)  # only after the release: see reconcile_stale_slots


@contextmanager
def hold_gpus(allocation: Allocation) -> Iterator[Allocation]:
    """Keep the allocation's lease alive while the block runs; release it however the block ends."""
    if allocation.lease_id is None:
        yield allocation
        return
    stop = threading.Event()
    renewer = threading.Thread(target=_renew_lease, args=(allocation, stop), daemon=True,
                               name=f"wanflow-lease-{allocation.lease_id}")
    renewer.start()
    try:
        yield allocation
    finally:
        stop.set()
        renewer.join(timeout=5)
        try:
            release_gpus(allocation)
            run_logger().info("released %s", ", ".join(allocation.tags))
        except Exception as exc:  # never hide the run's own outcome behind this
            run_logger().warning("could not release %s (%s): the server frees them when the %g s lease ends",
                                 ", ".join(allocation.tags), exc, allocation.lease_seconds)


def _renew_lease(allocation: Allocation, stop: threading.Event) -> None:
    with get_client(sync_client=True) as client:
        while not stop.wait(allocation.lease_seconds / 3):
            try:
                client.renew_concurrency_lease(allocation.lease_id, allocation.lease_seconds)
            except Exception as exc:  # a missed renewal is retried; the lease has slack for two more
                run_logger().warning("renewing the GPU lease failed (%s); retrying", exc)


def _say_waiting(message: str) -> None:
    """Log a wait and make it the flow run's state message (what the UI lists for the run)."""
    get_run_logger().info("%s", message)
    _set_flow_run_message(message)


def _set_flow_run_message(message: str) -> None:
    # Only the flow run: task runs reach the server through events, so this task's own run
    # may not exist there yet. A message is informative, so failing to set it is not fatal.
    flow_run = FlowRunContext.get()
    if flow_run is None:
        return
    try:
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(flow_run.flow_run.id, Running(message=message), force=True)
    except Exception as exc:
        run_logger().warning("could not set the run's state message: %s", exc)


@task(name="allocate-gpus", retries=0, cache_policy=NO_CACHE)
def allocate_gpus(profile: GpuProfile, strategy: Strategy, tag_base: str, gpu_ids: list[int] | None = None,
                  gpus_per_job: int | None = None, checkpoint: str | None = None, poll_seconds: float = 2.0,
                  lease_seconds: float = 60.0) -> Allocation:
    """Take this run's GPUs by `strategy`, waiting while they are busy; none on a host without GPUs."""
    logger = get_run_logger()
    flow_run = FlowRunContext.get()
    holder = ConcurrencyLeaseHolder(type="flow_run", id=flow_run.flow_run.id) if flow_run else None
    heads = num_heads(checkpoint) if checkpoint else None
    said: list[str] = []

    def say_waiting(message: str) -> None:
        said.append(message)
        _say_waiting(message)

    with get_client(sync_client=True) as client:
        allocation = acquire_gpus(client, profile, strategy, tag_base, gpu_ids, gpus_per_job, heads,
                                  poll_seconds, lease_seconds, holder, on_wait=say_waiting)
    if not allocation.gpus:
        logger.info("no GPU on this host: the engine runs on the CPU")
        return allocation
    try:
        logger.info("strategy %s: holding %s after waiting %.1f s", strategy, ", ".join(allocation.tags),
                    allocation.waited_s)
        if said:
            _set_flow_run_message(f"running on {', '.join(allocation.tags)}")
        if not profile.simulated:
            apply_gpu_environment(gpu_environment(allocation.gpus, profile))
    except BaseException:
        release_gpus(allocation)
        raise
    return allocation
