"""Fault drill: what each fault does to a run holding a GPU slot, measured on a real local server.

A throwaway Prefect home gets a server and the deployments from `wanflow setup`, with one
simulated GPU (`WAN_GPU_INVENTORY`), and `wanflow worker` serves it. For each fault a long
tiny-preset run is started through the deployment and the fault is applied once it holds
the GPU; the drill then measures the seconds from the fault until the GPU's slot is free
and reads the run's final state and message. docs/reliability.md holds its table.

    python scripts/fault_drill.py [--steps 200] [--only kill-run,cancel-running]

Faults: kill-run (SIGKILL the flow-run process), kill-worker (SIGKILL the worker and every
process under it, runs included, as an OOM kill of the service would; then start the worker
again), sigterm-worker (the way a service manager stops it), restart-server (SIGKILL the
server, then `wanflow setup`; the run holding the GPU should carry on and complete),
cancel-waiting (cancel a run queued behind another), cancel-running (cancel from the UI/API).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deployments.processes import free_port, stop_process_group  # noqa: E402
from tasks.processes import PPID, processes  # noqa: E402

WANFLOW = [sys.executable, "-m", "flows.cli"]
TAG = "gpu-0"
FAULTS = ("kill-run", "kill-worker", "sigterm-worker", "restart-server", "cancel-waiting", "cancel-running")


@dataclass
class Outcome:
    fault: str
    free_after_s: float | None  # None: the slot was never taken by the faulted run (or never came back)
    state: str
    message: str


class Drill:
    """A server prepared by `wanflow setup` and a `wanflow worker`, in a throwaway home."""

    def __init__(self, scratch: Path, steps: int):
        self.scratch, self.steps = scratch, steps
        self.port, self.home = free_port(), scratch / "prefect-home"
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.env = {**os.environ, "PREFECT_HOME": str(self.home), "WAN_OUTPUTS_DIR": str(scratch / "outputs"),
                    "WAN_GPU_INVENTORY": json.dumps([{}]), "WAN_GPU_POLL_SECONDS": "0.5",
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
        self.env.pop("PREFECT_API_URL", None)
        os.environ.update(PREFECT_HOME=str(self.home), DO_NOT_TRACK="1")  # before this process imports Prefect
        self.worker: subprocess.Popen | None = None

    def setup(self) -> None:
        subprocess.run([*WANFLOW, "setup", "--port", str(self.port)], env=self.env, cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL, timeout=600)

    def start_worker(self) -> None:
        log = open(self.scratch / "worker.log", "a")  # noqa: SIM115 - the worker writes it until stopped
        self.worker = subprocess.Popen([*WANFLOW, "worker"], env=self.env, cwd=ROOT, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        if self.worker is not None:
            stop_process_group(self.worker.pid)
        if (self.home / "server.pid").is_file():
            stop_process_group(int((self.home / "server.pid").read_text()))

    def client(self):
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api)

    def submit(self, prompt: str, steps: int | None = None):
        request = {"task": "tiny", "prompt": prompt, "size": "128*128", "frame_count": 33,
                   "steps": steps or self.steps, "seed": 1, "strategy": "concurrent"}
        with self.client() as client:
            deployment = client.read_deployment_by_name("generate-video/generate-video")
            return client.create_flow_run_from_deployment(deployment.id, parameters={"request": request}).id

    def slot_taken(self) -> bool:
        from tasks.allocate import limit_name

        try:
            with self.client() as client:
                return client.read_global_concurrency_limit_by_name(limit_name(TAG)).active_slots > 0
        except Exception:  # the server is down (restart-server): the slot's fate is unknown yet
            return True

    def wait(self, condition, timeout: float, what: str) -> float:
        """Seconds until `condition()` holds; raises after `timeout`."""
        started = time.monotonic()
        while not condition():
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{what}: not within {timeout:.0f} s")
            time.sleep(0.25)
        return time.monotonic() - started

    def state(self, run_id):
        with self.client() as client:
            return client.read_flow_run(run_id)

    def final_state(self, run_id, timeout: float = 240):
        self.wait(lambda: (s := self.state(run_id).state) is not None and s.is_final(), timeout, "final state")
        return self.state(run_id).state

    def holding(self, run_id) -> None:
        """Wait until the run holds the GPU and is denoising (its progress artifact exists)."""
        self.wait(lambda: self.slot_taken() and _denoising(self, run_id), 300, "the run to hold the GPU")

    def cancel(self, run_id) -> None:
        from prefect.states import Cancelling

        with self.client() as client:
            client.set_flow_run_state(run_id, Cancelling(message="cancelled by the fault drill"), force=True)


def _denoising(drill: Drill, run_id) -> bool:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with drill.client() as client:
        only_this_run = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        found = client.read_artifacts(artifact_filter=only_this_run)
    return any(a.type == "progress" for a in found)


def _flow_pid(drill: Drill, run_id) -> int:
    pid = drill.state(run_id).infrastructure_pid
    return int(str(pid).rsplit(":", 1)[-1])


def _descendants(pid: int) -> list[int]:
    """Every process under `pid` (children of children too), from /proc."""
    children: dict[int, list[int]] = {}
    for child, fields in processes():
        children.setdefault(int(fields[PPID]), []).append(child)
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _time_to_free(drill: Drill, timeout: float = 180) -> float | None:
    try:
        return drill.wait(lambda: not drill.slot_taken(), timeout, "the GPU slot to come back")
    except TimeoutError:
        return None


def drill_fault(drill: Drill, fault: str) -> Outcome:
    if fault == "cancel-waiting":
        blocker = drill.submit("blocker")
        drill.holding(blocker)
        waiting = drill.submit("waiting")
        drill.wait(lambda: "waiting" in (drill.state(waiting).state.message or ""), 120, "the run to wait")
        drill.cancel(waiting)
        state = drill.final_state(waiting, timeout=60)
        took = bool(drill.state(waiting).state_name != "Cancelled" or _denoising(drill, waiting))
        drill.cancel(blocker)
        drill.final_state(blocker)
        _time_to_free(drill)
        return Outcome(fault, None, state.name + (" (took the GPU!)" if took else ""), state.message or "")

    run_id = drill.submit(fault)
    drill.holding(run_id)
    faulted, note = time.monotonic(), ""
    if fault == "kill-run":
        os.kill(_flow_pid(drill, run_id), signal.SIGKILL)
    elif fault == "kill-worker":
        for pid in [drill.worker.pid, *_descendants(drill.worker.pid)]:
            os.kill(pid, signal.SIGKILL)
        drill.worker.wait()
        drill.start_worker()  # a service manager restarts it
    elif fault == "sigterm-worker":
        os.killpg(drill.worker.pid, signal.SIGTERM)
        drill.worker.wait(timeout=120)
        drill.start_worker()
    elif fault == "restart-server":
        os.killpg(int((drill.home / "server.pid").read_text()), signal.SIGKILL)
        time.sleep(1)
        drill.setup()
        note = f"server back after {time.monotonic() - faulted:.0f} s; "
    elif fault == "cancel-running":
        drill.cancel(run_id)
    free = _time_to_free(drill)
    free_after = None if free is None else time.monotonic() - faulted - 0.0
    state = drill.final_state(run_id)
    return Outcome(fault, free_after, state.name, note + (state.message or ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="denoising steps of the faulted run (its length)")
    parser.add_argument("--only", help=f"comma-separated faults of {', '.join(FAULTS)}")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (logs)")
    args = parser.parse_args()
    faults = args.only.split(",") if args.only else FAULTS
    scratch = Path(tempfile.mkdtemp(prefix="wanflow-drill-"))
    drill = Drill(scratch, args.steps)
    outcomes = []
    try:
        drill.setup()
        drill.start_worker()
        for fault in faults:
            print(f"drill: {fault}", file=sys.stderr)
            try:
                outcomes.append(drill_fault(drill, fault))
            except TimeoutError as exc:
                outcomes.append(Outcome(fault, None, "(drill timed out)", str(exc)))
            print(f"  {outcomes[-1]}", file=sys.stderr)
    finally:
        drill.stop()
        print(f"logs: {scratch}" if args.keep else "", file=sys.stderr)
        if not args.keep:
            subprocess.run(["rm", "-rf", str(scratch)], check=False)
    print("| fault | GPU free after | final state | message |")
    print("| --- | --- | --- | --- |")
    for o in outcomes:
        free = "never taken" if o.fault == "cancel-waiting" else "not within 180 s" if o.free_after_s is None \
            else f"{o.free_after_s:.1f} s"
        print(f"| {o.fault} | {free} | {o.state} | {o.message.replace('|', '/')[:160]} |")


if __name__ == "__main__":
    main()
