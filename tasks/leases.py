"""GPU slot leases on the Prefect server: take them, give them back, and free those of holders that died.

Every GPU is guarded by the Prefect tag concurrency limit of its tag (`gpu-<i>`, stored by Prefect
as the global limit `tag:gpu-<i>`, one slot). Slots are taken with a lease through the client's
lease API, all of a run's GPUs in one atomic request that either takes them all or answers 423.

A holder that dies loses its slots only when the lease expires (about a minute on a real server).
To give them back as soon as the death is known, the holder of a lease keeps a holder file
`<lock_dir>/leases/<lease id>.json` locked (tasks/lockfiles.py) until after the release;
`reap_dead_leases` releases the lease of every file whose holder died.

The embedded (ephemeral) server runs no lease expiry at all, and each process's server keeps its
own leases in memory, so a lease id means nothing to another process there: every holder keeps a
shared `flock` on a per-tag file instead, and a slot whose file nobody holds is stale and is given back.
"""
from __future__ import annotations

import fcntl
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.settings import get_current_settings

from tasks.lockfiles import dead_record, write_locked

LEASE_GONE = (404, 410)  # how the server answers for a lease it does not know (expired or released)
PROBE_LEASE_SECONDS = 60.0  # the shortest lease the server accepts


class GpuLeaseLost(RuntimeError):
    """The server no longer holds this run's GPU slots, and they could not be taken again."""


def limit_name(tag: str) -> str:
    """The global concurrency limit Prefect keeps for a tag concurrency limit."""
    return f"tag:{tag}"


def lock_dir() -> Path:
    """Lock, holder and queue files of this host's GPU slots, in PREFECT_HOME."""
    return get_current_settings().home / "wanflow-gpu-locks"


def holder_dir() -> Path:
    """Where the holder file of every lease this host's runs hold lives: `<holder_dir>/<lease id>.json`."""
    return lock_dir() / "leases"


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


def lease_gone(exc: Exception) -> bool:
    """Whether an API error says the server does not know the lease."""
    return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code in LEASE_GONE


def release_lease(client: SyncPrefectClient, lease_id: UUID) -> bool:
    """Give the lease's slots back; False when the server no longer knew the lease (nothing was given back)."""
    # The release answers 204 for a lease it does not know, and Prefect 3.9's API has no call that
    # reads a lease: a renewal is the one that says whether it exists (410 when it does not).
    try:
        client.renew_concurrency_lease(lease_id, PROBE_LEASE_SECONDS)
    except httpx.HTTPStatusError as exc:
        if lease_gone(exc):
            return False
        raise
    client.release_concurrency_slots_with_lease(lease_id)
    return True


@dataclass
class LeaseFiles:
    """What the holder of a lease keeps locked until after the release: per-tag locks or its holder file."""

    fds: list[int] = field(default_factory=list)
    holder_file: Path | None = None

    def close(self) -> None:
        if self.holder_file is not None:
            self.holder_file.unlink(missing_ok=True)  # before its lock goes: see tasks/lockfiles.py
        for fd in self.fds:
            os.close(fd)


def take_lease(client: SyncPrefectClient, tags: list[str], lease_seconds: float, embedded: bool,
               holder: ConcurrencyLeaseHolder | None = None) -> tuple[UUID, LeaseFiles] | None:
    """`try_acquire` plus the files that let others see when this process dies holding the lease."""
    if embedded:
        files = LeaseFiles(fds=share_locks(lock_dir(), tags))  # before asking: see reconcile_stale_slots
        lease_id = try_acquire(client, tags, lease_seconds, holder)
        if lease_id is None:
            files.close()
            return None
        return lease_id, files
    lease_id = try_acquire(client, tags, lease_seconds, holder)
    if lease_id is None:
        return None
    path = holder_dir() / f"{lease_id}.json"
    try:
        fd = write_locked(path, {"lease_id": str(lease_id), "tags": tags, "api_url": str(client.api_url),
                                 "flow_run_id": str(holder.id) if holder else None, "pid": os.getpid(),
                                 "host": socket.gethostname()})
    except BaseException:
        client.release_concurrency_slots_with_lease(lease_id)
        raise
    return lease_id, LeaseFiles(fds=[fd], holder_file=path)


@dataclass(frozen=True)
class Reaped:
    """A lease given back because its holder died."""

    lease_id: UUID
    tags: list[str]
    flow_run_id: UUID | None


def reap_dead_leases(client: SyncPrefectClient, directory: Path | None = None) -> list[Reaped]:
    """Release the lease of every holder file in `directory` whose process died; returns the leases freed.

    Files of leases on another server are left to that server's reapers; files of leases the server
    had already let go are removed without a release.
    """
    directory = directory or holder_dir()
    reaped = []
    for path in sorted(directory.glob("*.json")):
        with dead_record(path) as record:
            if record is None or record.get("api_url") != str(client.api_url):
                continue
            lease_id = UUID(record["lease_id"])
            if release_lease(client, lease_id):
                flow_run_id = record.get("flow_run_id")
                reaped.append(Reaped(lease_id, record["tags"], UUID(flow_run_id) if flow_run_id else None))
            path.unlink()
    return reaped


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


def share_locks(directory: Path, tags: list[str]) -> list[int]:
    """Shared locks on the tags' files (embedded server only), held while taking and holding their slots."""
    fds = [_open_lock(directory, tag) for tag in tags]
    for fd in fds:
        fcntl.flock(fd, fcntl.LOCK_SH)
    return fds


def _open_lock(directory: Path, tag: str) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    return os.open(directory / f"{tag}.lock", os.O_RDWR | os.O_CREAT, 0o644)
