"""The channel between a run and the resident engine worker of its GPU (tasks/engine_worker.py).

One Unix socket per GPU, `<PREFECT_HOME>/wanflow-engines/<tag>.sock`, spoken through
`multiprocessing.connection` with a per-host key (`authkey`, a 0600 file beside the sockets): a call is one
connection, on which the run sends a `Job`, the worker streams `("step", StepInfo, reused)` and `("log", level,
message)` back, and ends with `("done", value)`, `("cancelled", message)` or `("error", exception, traceback)`.
While the job runs, the run may send `("cancel", reason)`; the worker stops between two steps.

Which runs use it: `wanflow worker` names the GPU tags it keeps resident engines on in `WAN_ENGINE_TAGS`, which the
flow runs it starts inherit. A run holding one of those GPUs sends its GPU phase there; any other run (a Python
call, `wanflow generate`, the demo) computes in its own process, or, held on several GPUs, on rank processes of
its own (tasks/rank_processes.py) reached through this same channel. A run on k GPUs sends one `denoise_rank`
job to each of their workers (`call_ranks`), which form a process group for that job only.
"""
from __future__ import annotations

import datetime
import logging
import os
import pickle
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Client, Connection
from pathlib import Path
from typing import Any, Literal
from uuid import UUID

import torch.distributed as dist
from prefect.settings import get_current_settings

from tasks.runs import RunDescription
from wan_engine import GenerationCancelled

Kind = Literal["status", "warm_up", "denoise", "denoise_rank", "decode"]
CONNECT_WAIT_S = 60.0  # a worker being restarted by `wanflow worker` is back well within this
POLL_S = 0.2  # how often a waiting caller looks at its cancel check between two messages


class EngineWorkerLost(RuntimeError):
    """The resident engine worker of the run's GPU died or could not be reached; the message says what to do."""


class EngineRefused(RuntimeError):
    """The resident engine worker refused the call (the caller does not hold the GPU's slot)."""


@dataclass(frozen=True)
class Job:
    """One call to a resident engine worker."""

    kind: Kind
    run: RunDescription | None = None
    lease_id: UUID | None = None  # the caller's live lease on the worker's GPU (checked by the worker)
    args: dict[str, Any] = field(default_factory=dict)


def engine_dir() -> Path:
    """The sockets and key of this host's resident engine workers, in PREFECT_HOME."""
    return get_current_settings().home / "wanflow-engines"


def socket_path(tag: str, directory: Path | None = None) -> Path:
    return (directory or engine_dir()) / f"{tag}.sock"


def authkey(directory: Path | None = None) -> bytes:
    """The channel key of the workers in `directory` (default: this host's), created on first use readable by
    this user only."""
    path = (directory or engine_dir()) / "authkey"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process made it meanwhile
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
    for _ in range(50):  # the creator may be between open and write
        if key := path.read_text().strip():
            return key.encode()
        time.sleep(0.01)
    raise RuntimeError(f"{path} is empty")


def send(conn: Connection, message: object) -> None:
    """Send with the standard pickle: `Connection.send` uses multiprocessing's pickler, through which torch
    shares a tensor's storage by file descriptor with a sibling process, which two unrelated processes cannot."""
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def receive(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


def peer_pid(conn: Connection) -> int:
    """The process at the other end of a Unix-socket connection, as the kernel tells it (SO_PEERCRED)."""
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    try:
        pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    finally:
        sock.close()
    return pid


def resident_tags(run: RunDescription, engine_tags: list[str]) -> list[str] | None:
    """The GPU tags whose resident workers compute `run` (one rank each), or None when some of its GPUs have none."""
    if run.allocation.lease_id is None or not run.allocation.tags:
        return None
    return run.allocation.tags if set(run.allocation.tags) <= set(engine_tags) else None


def call_ranks(tags: list[str], run: RunDescription, on_step: Callable | None = None,
               should_cancel: Callable[[], bool] | None = None,
               log: logging.Logger | logging.LoggerAdapter | None = None, directory: Path | None = None) -> Any:
    """Denoise `run` on the workers of `tags` (in `directory`, default this host's), rank r on `tags[r]`, in a
    process group of those workers formed for this job over a TCPStore this process holds (it goes with the
    process: a killed run leaves no group behind). Returns rank 0's value; steps come from rank 0, and a cancel
    reaches every rank (they stop at the same step). When ranks fail, the first error that is not another
    rank's echo of it is raised."""
    store = dist.TCPStore("127.0.0.1", 0, len(tags), is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=60))
    address = ("127.0.0.1", store.port)
    values: dict[int, Any] = {}
    errors: dict[int, BaseException] = {}
    cancelled = threading.Event()  # a rank failed: stop the others now rather than at their collectives' timeout

    def stop() -> bool:
        return cancelled.is_set() or (should_cancel is not None and should_cancel())

    def rank(r: int, tag: str) -> None:
        job = Job("denoise_rank", run, run.allocation.lease_id, {"rank": r, "world_size": len(tags), "store": address})
        try:
            values[r] = call(tag, job, on_step if r == 0 else None, stop if r == 0 else cancelled.is_set, log,
                             directory=directory)
        except BaseException as exc:
            errors[r] = exc
            cancelled.set()  # the other ranks stop too, at the latest when their collectives time out

    threads = [threading.Thread(target=rank, args=(r, tag), daemon=True) for r, tag in enumerate(tags)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        echoes = [e for e in errors.values() if type(e).__name__ in ("RankFailed", "GenerationCancelled")]
        raise next((errors[r] for r in sorted(errors) if errors[r] not in echoes), errors[min(errors)])
    return values[0]


def resident_tag(run: RunDescription, engine_tags: list[str]) -> str | None:
    """The GPU tag of the resident worker that warms up and decodes for `run` (its first GPU's: rank 0's), or None
    when the run computes in its own process."""
    tags = resident_tags(run, engine_tags)
    return tags[0] if tags else None


def connect(tag: str, wait_s: float = CONNECT_WAIT_S, directory: Path | None = None) -> Connection:
    """A connection to `tag`'s worker in `directory` (default: this host's), waiting up to `wait_s` for one being
    started."""
    path, deadline = socket_path(tag, directory), time.monotonic() + wait_s
    while True:
        try:
            return Client(str(path), family="AF_UNIX", authkey=authkey(directory))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            if time.monotonic() >= deadline:
                raise EngineWorkerLost(f"no resident engine worker answers for {tag} at {path} after {wait_s:.0f} s "
                                       f"({exc}): is `wanflow worker` running on this host?") from exc
            time.sleep(0.2)


def call(tag: str, job: Job, on_step: Callable | None = None, should_cancel: Callable[[], bool] | None = None,
         log: logging.Logger | logging.LoggerAdapter | None = None, wait_s: float = CONNECT_WAIT_S,
         directory: Path | None = None) -> Any:
    """Run `job` on `tag`'s worker (in `directory`, default this host's) and return its value.

    Steps go to `on_step(info, reused)`, the worker's log lines to `log`. When `should_cancel()` turns true the
    worker is told to stop; the call then raises wan_engine.GenerationCancelled with the worker's message.
    A worker that dies during the call raises EngineWorkerLost.
    """
    conn = connect(tag, wait_s, directory)
    pid, cancel_sent = peer_pid(conn), False
    try:
        send(conn, job)
        while True:
            if should_cancel is not None and not cancel_sent and should_cancel():
                send(conn, ("cancel", "the run is being cancelled"))
                cancel_sent = True
            if not conn.poll(POLL_S):
                continue
            message = receive(conn)
            if message[0] == "step" and on_step is not None:
                on_step(message[1], message[2])
            elif message[0] == "log" and log is not None:
                log.log(message[1], "engine worker %s: %s", tag, message[2])
            elif message[0] == "done":
                return message[1]
            elif message[0] == "cancelled":
                raise GenerationCancelled(message[1])
            elif message[0] == "error":
                if log is not None:
                    log.debug("engine worker %s traceback:\n%s", tag, message[2])
                raise message[1]
    except (EOFError, ConnectionResetError, BrokenPipeError) as exc:  # its end of the socket closed with the process
        raise EngineWorkerLost(f"the resident engine worker of {tag} (pid {pid}) died during {job.kind}; "
                               f"`wanflow worker` restarts it: run the request again") from exc
    finally:
        conn.close()
