"""A resident engine worker: the long-lived process of one GPU that `wanflow worker` starts
(deployments/supervisor.py), keeping its pipelines, applied tiers and compiled blocks warm between runs.

    python -m tasks.engine_worker --tag gpu-0 --device cuda:0

It listens on its GPU's socket (tasks/engine_channel.py) and runs the GPU phase of the runs holding that GPU
(tasks/gpu_phase.py) in its one `EngineCache`, one job at a time. A job is refused unless the caller holds the
GPU's slot: the `Job` names the caller's lease, whose holder file (tasks/leases.py) must be live, name this
worker's tag and the calling process (SO_PEERCRED). A job stops between two steps when its caller asks or goes
away (a cancelled run's process is killed), and the worker serves the next run; a job still running
CANCEL_GRACE_S after its cancel (a step longer than that) ends the process instead, and `wanflow worker` starts
a fresh one: the GPU is free within that time whatever the step.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import sys
import threading
import traceback
from collections.abc import Callable
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, Listener
from pathlib import Path

from tasks.allocate import NCCL_ENVIRONMENT, apply_gpu_environment
from tasks.engine_channel import EngineRefused, Job, authkey, peer_pid, receive, send, socket_path
from tasks.gpu_phase import run_decode, run_denoise, run_denoise_rank, run_warm_up
from tasks.leases import holder_dir
from tasks.lockfiles import dead_record
from tasks.pipelines import EngineCache
from tasks.processes import die_with_parent
from wan_engine import GenerationCancelled

log = logging.getLogger("wanflow")
JOB_WAIT_S = 60.0  # a job waits this long for the one before it to stop (a cancelled run's last step)
CANCEL_GRACE_S = 10.0  # a cancelled job stops between two steps; one still running after this ends the process
CANCEL_EXIT = 75  # the exit status then
POLL_S = 0.2


def check_lease(job: Job, tag: str, caller: int, leases: Path) -> None:
    """Raise EngineRefused unless the caller process holds a live lease on `tag` under `job.lease_id`."""
    if job.lease_id is None:
        raise EngineRefused(f"refused: the call names no lease on {tag}; only a run holding {tag} may use its engine")
    path = leases / f"{job.lease_id}.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        raise EngineRefused(f"refused: lease {job.lease_id} is not held on this host (no holder file {path})") from None
    with dead_record(path) as dead:
        if dead is not None:
            raise EngineRefused(f"refused: the holder of lease {job.lease_id} died")
    if tag not in record.get("tags", []) or record.get("pid") != caller:
        raise EngineRefused(f"refused: lease {job.lease_id} holds {record.get('tags')} for pid {record.get('pid')}, "
                            f"not {tag} for the calling pid {caller}")


class _JobLog(logging.Handler):
    """Sends the job thread's log lines to its caller, whose run log shows them."""

    def __init__(self, conn: Connection, thread: int):
        super().__init__(logging.INFO)
        self.conn, self.thread = conn, thread

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            try:
                send(self.conn, ("log", record.levelno, record.getMessage()))
            except OSError:
                pass  # the caller is gone; the job stops at its next step


class EngineWorker:
    """Serves one GPU's jobs from one engine cache."""

    def __init__(self, tag: str, device: str, engines: EngineCache | None = None, owner: int | None = None):
        self.tag, self.device = tag, device
        self.engines = engines or EngineCache()
        self.owner = owner  # a run's own rank process serves that run's process only (it holds the GPUs)
        self.busy = threading.Lock()

    def serve(self, listener: Listener) -> None:
        """Accept calls until the process is stopped or the listener closed; each connection is served on its own
        thread."""
        log.info("engine worker %s on %s: serving %s", self.tag, self.device, listener.address)
        while True:
            try:
                conn = listener.accept()
            except (AuthenticationError, EOFError, ConnectionError) as exc:  # a caller that failed the handshake
                log.warning("engine worker %s: refused a connection: %s", self.tag, exc)
                continue
            except OSError:  # the listener was closed: the worker stops
                return
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def handle(self, conn: Connection) -> None:
        """Run the connection's job on a thread of its own while this one reads what the caller sends."""
        with conn:
            try:
                job = receive(conn)
                caller = peer_pid(conn)
            except (EOFError, OSError):
                return
            cancel = threading.Event()
            worker = threading.Thread(target=self.serve_job, args=(job, conn, caller, cancel), daemon=True)
            worker.start()
            self.watch_caller(conn, cancel, worker)

    def watch_caller(self, conn: Connection, cancel: threading.Event, worker: threading.Thread) -> None:
        """Set `cancel` when the caller asks or goes away (a cancelled run's process is killed). A job that has
        not stopped CANCEL_GRACE_S later (a step longer than that) ends this process, so that the GPU is free
        within the time a cancel promises; `wanflow worker` starts a fresh one."""
        while worker.is_alive() and not cancel.is_set():
            try:
                if conn.poll(POLL_S) and receive(conn)[0] == "cancel":
                    cancel.set()
            except (EOFError, OSError):
                cancel.set()
        worker.join(CANCEL_GRACE_S)
        if worker.is_alive():
            log.error("engine worker %s: the cancelled job did not stop within %.0f s: exiting to free the GPU",
                      self.tag, CANCEL_GRACE_S)
            self.exit(CANCEL_EXIT)

    @staticmethod
    def exit(status: int) -> None:
        """End the process now, whatever its threads are doing."""
        logging.shutdown()
        os._exit(status)

    def serve_job(self, job: Job, conn: Connection, caller: int, cancel: threading.Event) -> None:
        handler = _JobLog(conn, threading.get_ident())
        log.addHandler(handler)
        try:
            send(conn, ("done", self.run(job, conn, caller, cancel.is_set)))
        except GenerationCancelled as exc:
            self._send(conn, ("cancelled", str(exc)))
        except Exception as exc:
            log.error("engine worker %s: %s failed: %s", self.tag, job.kind, exc)
            self._send(conn, ("error", _picklable(exc), traceback.format_exc()))
        finally:
            log.removeHandler(handler)

    def run(self, job: Job, conn: Connection, caller: int, cancelled: Callable[[], bool]):
        if job.kind == "status":
            return {"tag": self.tag, "device": self.device, "pid": os.getpid(), "loads": self.engines.loads,
                    "held": self.engines.held(), "busy": self.busy.locked(),
                    "environment": {k: os.environ.get(k) for k in ENGINE_ENVIRONMENT}}
        if self.owner is None:
            check_lease(job, self.tag, caller, holder_dir())
        elif caller != self.owner:
            raise EngineRefused(f"refused: this rank process serves pid {self.owner} only, not {caller}")
        if job.kind != "denoise_rank" and job.run.device != self.device:
            raise EngineRefused(f"refused: the run computes on {job.run.device}; this worker serves {self.device}")
        if not self.busy.acquire(timeout=JOB_WAIT_S):
            raise EngineRefused(f"{self.tag}'s engine is still busy with an earlier job after {JOB_WAIT_S:.0f} s")
        def on_step(info, reused: bool) -> None:
            send(conn, ("step", info, reused))

        try:
            if job.kind == "warm_up":
                return run_warm_up(self.engines, job.run, **job.args)
            if job.kind == "denoise":
                return run_denoise(self.engines, job.run, on_step=on_step, should_cancel=cancelled, resident=True)
            if job.kind == "denoise_rank":  # one rank of a run on several GPUs, this one on this worker's
                return run_denoise_rank(self.engines, job.run, self.device, on_step=on_step,
                                        should_cancel=cancelled, resident=self.owner is None, **job.args)
            if job.kind == "decode":
                return run_decode(self.engines, job.run, **job.args)
            raise ValueError(f"unknown job kind {job.kind!r}")
        finally:
            self.busy.release()

    @staticmethod
    def _send(conn: Connection, message: tuple) -> None:
        try:
            send(conn, message)
        except OSError:
            pass  # the caller is gone


def _picklable(exc: Exception) -> Exception:
    """`exc` if it crosses the channel whole, else a RuntimeError saying what it was."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


# Set in every engine process before its first NCCL group. NVLink multicast stays off on every topology, as in
# the runs' own processes (tasks/allocate.py NCCL_ENVIRONMENT). On a collective that times out NCCL's watchdog
# would end the whole process (its default, 3); 2 aborts the job's communicators and raises instead, so a
# long-lived worker fails that job (wan_engine.parallel's JobGroup.reporting) and serves the next one.
ENGINE_ENVIRONMENT = {**NCCL_ENVIRONMENT, "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", required=True, help="the GPU's concurrency tag, e.g. gpu-0")
    parser.add_argument("--device", required=True, help="where the engine computes: cuda:k, or cpu for tests")
    parser.add_argument("--dir", type=Path, help="the folder of the socket and key (default: PREFECT_HOME's)")
    parser.add_argument("--owner", type=int, help="serve only this process, and die with it: a run's own rank "
                        "process (tasks/rank_processes.py), which checks no lease")
    args = parser.parse_args(argv)
    if args.owner is not None:
        die_with_parent()
        if os.getppid() != args.owner:  # it died before the line above took effect
            return 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    apply_gpu_environment(ENGINE_ENVIRONMENT)  # before CUDA starts
    path = socket_path(args.tag, args.dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # left by a worker that died
    listener = Listener(str(path), family="AF_UNIX", authkey=authkey(args.dir))
    os.chmod(path, 0o600)  # the key guards the calls; the mode keeps other users from even connecting
    try:
        EngineWorker(args.tag, args.device, owner=args.owner).serve(listener)
    except KeyboardInterrupt:  # `wanflow worker` stops its children with SIGINT
        pass
    finally:
        listener.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
