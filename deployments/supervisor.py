"""The process of `wanflow worker`: it owns this host's worker processes, gives back the GPUs of runs
that died, and on SIGTERM or Ctrl-C cancels the runs in flight on this host before it exits.

Children the worker owns (`Supervisor.children`, started in their own sessions so that a Ctrl-C in
the terminal reaches only the supervisor): one resident engine worker per GPU it serves
(tasks/engine_worker.py, `engine-<tag>`), which keeps that GPU's pipelines warm between runs, and the
Prefect worker (deployments/prefect_worker.py), whose flow-run processes are the runs in flight on this
host. An engine worker that dies is started again at the next check (the run it served fails with a
message saying so); the runs wait for it to answer again.

Every REAP_SECONDS, `tasks.allocate.reap_dead_leases` releases the GPU leases whose holder process on
this host is dead (a run killed by the OOM killer or SIGKILL), at once rather than when the lease
expires; a reaped run not yet in a final state is marked Crashed.

On SIGTERM or SIGINT:
1. the Prefect worker takes no new runs;
2. every run in flight here is set Cancelling, "cancelled: worker <name> stopped (SIGTERM)"; the
   Prefect worker cancels it: its process gets SIGTERM, `hold_gpus` gives its GPUs back (under 1 s)
   and the process exits (about 2 s);
3. a run process still alive after CANCEL_GRACE_S gets SIGTERM, KILL_GRACE_S later SIGKILL
   (measured in Prefect 3.9: on a SIGTERM without Prefect's cancel intent the flow engine raises
   TerminationSignal in the run's main thread, so `hold_gpus` still releases, and the run ends Crashed);
4. the Prefect worker is stopped, leases of dead holders reaped, and every run that did not finish
   on its own ends Cancelled with that message; the supervisor exits 0.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.states import Cancelled, Cancelling, Crashed, State

from tasks.allocate import reap_dead_leases
from tasks.processes import PPID, STATE, die_with_parent, processes, stat_fields

log = logging.getLogger(__name__)

REAP_SECONDS = 1.0
CANCEL_GRACE_S = 20.0  # Prefect's cancellation of a run takes ~2 s; then SIGTERM from us
KILL_GRACE_S = 10.0  # after our SIGTERM, then SIGKILL
WORKER_STOP_S = 15.0  # the Prefect worker's own shutdown, then SIGKILL
# An engine worker that ended this long after its start was serving, not failing to start: its next end
# restarts it at once again. Ends sooner than this in a row pause the restart (`restart_delay`).
ENGINE_STABLE_SECONDS = 60.0
RESTART_DELAY_MAX_SECONDS = 60.0
PREFECT_WORKER = "prefect-worker"
ENGINE = "engine-"  # + the GPU's tag


def flow_run_processes(parent: int) -> dict[UUID, int]:
    """The flow-run processes `parent` started, read from /proc: flow run id -> pid."""
    runs = {}
    for pid, fields in processes():
        if int(fields[PPID]) != parent or fields[STATE] == "Z":
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue  # it ended meanwhile
        for entry in environ:
            if entry.startswith(b"PREFECT__FLOW_RUN_ID="):
                runs[UUID(entry.split(b"=", 1)[1].decode())] = pid
    return runs


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not: it only waits for its parent to collect it)."""
    fields = stat_fields(pid)
    return fields is not None and fields[STATE] != "Z"


def signal_process(pid: int, sig: signal.Signals) -> None:
    """Send `sig` to `pid` and, where it leads its own process group (flow runs and our children do),
    to everything in that group."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def restart_delay(quick_ends: int) -> float:
    """Seconds before an engine worker starts again after `quick_ends` ends in a row, each soon after its start:
    at once after the first (a run's crash, the OOM killer), then 2, 4, 8 ... up to a minute, so that a worker
    that cannot start (a broken driver, a bad setting) does not spin a new process every second."""
    return 0.0 if quick_ends <= 1 else min(2.0 ** (quick_ends - 1), RESTART_DELAY_MAX_SECONDS)


class Supervisor:
    """Runs the children this host's worker owns until SIGTERM or SIGINT; see the module docstring."""

    def __init__(self, name: str, worker_command: list[str], env: dict[str, str],
                 engine_commands: dict[str, list[str]] | None = None):
        self.name = name
        self.worker_command = worker_command
        self.env = env
        self.engine_commands = engine_commands or {}  # GPU tag -> the command of its resident engine worker
        self.children: dict[str, subprocess.Popen] = {}
        self.stop_signal: signal.Signals | None = None
        self.engine_started: dict[str, float] = {}   # tag -> time.monotonic() of its engine's last start
        self.quick_ends: dict[str, int] = {}         # tag -> its engine's ends in a row soon after a start
        self.restart_at: dict[str, float] = {}       # tag -> when its dead engine starts again

    def run(self) -> int:
        """Supervise until asked to stop (exit status 0) or until the Prefect worker ends by itself (its status)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._ask_to_stop)
        with get_client(sync_client=True) as client:
            for tag in self.engine_commands:  # before the Prefect worker, so that it is stopped first
                self._start_engine(tag)
            # die_with_parent: a supervisor killed outright (SIGKILL, the OOM killer) must not leave its Prefect
            # worker polling for runs with nobody reaping after it, beside the worker a service manager starts next.
            self.children[PREFECT_WORKER] = subprocess.Popen(self.worker_command, env=self.env,
                                                             start_new_session=True, preexec_fn=die_with_parent)
            log.info("worker %s: Prefect worker pid %d; SIGTERM or Ctrl-C cancels the runs in flight here",
                     self.name, self.children[PREFECT_WORKER].pid)
            try:
                return self._supervise(client)
            finally:
                self._stop_children()  # whatever happened: no child outlives the supervisor

    def _supervise(self, client: SyncPrefectClient) -> int:
        while self.stop_signal is None:
            status = self.children[PREFECT_WORKER].poll()
            if status is not None:
                log.error("the Prefect worker ended by itself (exit status %d)", status)
                self.reap(client)
                return status or 1
            self.reap(client)
            self.restart_dead_engines()
            time.sleep(REAP_SECONDS)
        self._stop(client)
        return 0

    def _start_engine(self, tag: str) -> None:
        child = subprocess.Popen(self.engine_commands[tag], env=self.env, start_new_session=True,
                                 preexec_fn=die_with_parent)
        self.children[ENGINE + tag] = child
        self.engine_started[tag] = time.monotonic()
        log.info("worker %s: resident engine worker for %s pid %d", self.name, tag, child.pid)

    def restart_dead_engines(self) -> None:
        """Start again every resident engine worker that ended (the run it served has failed, saying so), at once
        or, when it keeps ending soon after its start, after `restart_delay`."""
        now = time.monotonic()
        for tag in self.engine_commands:
            child = self.children[ENGINE + tag]
            status = child.poll()
            if status is None:
                continue
            if tag not in self.restart_at:  # found dead just now
                lived = now - self.engine_started[tag]
                quick = self.quick_ends.get(tag, 0) + 1 if lived < ENGINE_STABLE_SECONDS else 1
                self.quick_ends[tag] = quick
                delay = restart_delay(quick)
                self.restart_at[tag] = now + delay
                when = f"in {delay:.0f} s ({quick} ends in a row, each within a minute of its start)" if delay \
                    else "now"
                log.error("the resident engine worker for %s (pid %d) ended with status %d after %.0f s: starting "
                          "it again %s", tag, child.pid, status, lived, when)
            if now >= self.restart_at[tag]:
                del self.restart_at[tag]
                self._start_engine(tag)

    def _ask_to_stop(self, signum: int, frame: object) -> None:
        if self.stop_signal is None:
            self.stop_signal = signal.Signals(signum)

    def reap(self, client: SyncPrefectClient) -> None:
        """Give back the GPU leases of dead holders on this host; a reaped run still going is Crashed."""
        try:
            reaped = reap_dead_leases(client)
        except Exception as exc:  # the server may be restarting: try again next time
            log.warning("could not reap the GPU leases of dead runs: %s", exc)
            return
        for lease in reaped:
            tags = ", ".join(lease.tags)
            log.warning("gave back %s: the process of flow run %s died", tags, lease.flow_run_id)
            if lease.flow_run_id is not None and not self._final(client, lease.flow_run_id):
                self._set_state(client, lease.flow_run_id, Crashed(
                    message=f"the run's process died; its GPU slots ({tags}) were given back at once"))

    def _stop(self, client: SyncPrefectClient) -> None:
        reason = f"cancelled: worker {self.name} stopped ({self.stop_signal.name})"
        worker = self.children[PREFECT_WORKER]
        os.kill(worker.pid, signal.SIGTERM)  # take no new runs (its group holds its helpers: leave them be)
        runs: dict[UUID, int] = {}
        started, escalated = time.monotonic(), None
        while True:
            found = flow_run_processes(worker.pid)
            for run_id in found.keys() - runs.keys():
                log.info("cancelling flow run %s (pid %d)", run_id, found[run_id])
                self._set_state(client, run_id, Cancelling(message=reason))
            runs |= found
            left = [pid for pid in runs.values() if alive(pid)]
            if not left:
                break
            waited = time.monotonic() - started
            if escalated is None and waited > CANCEL_GRACE_S:
                log.warning("runs still going after %.0f s: SIGTERM to pids %s", waited, left)
                for pid in left:
                    signal_process(pid, signal.SIGTERM)
                escalated = time.monotonic()
            elif escalated is not None and time.monotonic() - escalated > KILL_GRACE_S:
                log.warning("SIGKILL to pids %s", left)
                for pid in left:
                    signal_process(pid, signal.SIGKILL)
                break
            time.sleep(0.2)
        self._stop_children()
        self.reap(client)
        for run_id in runs:
            state = self._state(client, run_id)
            if state is None or state.is_completed() or state.is_failed():
                continue  # it finished its work before the cancellation reached it
            if not (state.is_cancelled() and state.message == reason):
                self._set_state(client, run_id, Cancelled(message=reason))
        log.info("worker %s stopped after %.1f s; %d run(s) cancelled", self.name, time.monotonic() - started,
                 len(runs))

    def _stop_children(self) -> None:
        """Stop every child, last started first: SIGINT, then SIGKILL after WORKER_STOP_S."""
        for name, child in reversed(self.children.items()):
            if child.poll() is None:
                child.send_signal(signal.SIGINT)
                try:
                    child.wait(WORKER_STOP_S)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop within %.0f s: SIGKILL", name, WORKER_STOP_S)
                    signal_process(child.pid, signal.SIGKILL)
                    child.wait()

    @staticmethod
    def _state(client: SyncPrefectClient, run_id: UUID) -> State | None:
        try:
            return client.read_flow_run(run_id).state
        except Exception as exc:
            log.warning("could not read flow run %s: %s", run_id, exc)
            return None

    def _final(self, client: SyncPrefectClient, run_id: UUID) -> bool:
        state = self._state(client, run_id)
        return state is not None and state.is_final()

    @staticmethod
    def _set_state(client: SyncPrefectClient, run_id: UUID, state: State) -> None:
        try:
            client.set_flow_run_state(run_id, state, force=True)
        except Exception as exc:
            log.warning("could not set flow run %s %s: %s", run_id, state.name, exc)
