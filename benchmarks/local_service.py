"""A throwaway wanflow service for the benchmarks that drive the whole product, and what they read back.

`running_service` does what a user does on a fresh host, in a scratch folder: `wanflow setup` (a local Prefect
server on a free port, the deployments), then `wanflow worker` (the Prefect process worker and one resident
engine worker per GPU of WAN_RESIDENT_GPUS), and waits for every engine worker's socket. Runs are then created
from the generate-video deployment through the API, as the UI's Run button does (`create_run`, `wait_final`).
Afterwards, `read_records` gathers the published metadata.json files and `overlaps` finds two runs that held
one GPU at the same time. Used by benchmarks/resident_start.py and benchmarks/concurrent_runs.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from deployments.processes import free_port, stop_process_group  # noqa: E402

WANFLOW = [sys.executable, "-m", "flows.cli"]
DEPLOYMENT = "generate-video/generate-video"


def wait_for(what: str, check: Callable[[], object], timeout: float, log: Path | None = None):
    """`check()`'s first true answer, asked every 0.25 s; TimeoutError (with the log's tail) after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.25)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"no {what} after {timeout:.0f} s\n{tail}")


def has_gpu() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def service_environment(root: Path, resident_gpus: list[int], simulated_gpus: int = 0) -> dict[str, str]:
    """The environment of a service whose Prefect home and outputs lie in `root`, with resident engine workers
    on `resident_gpus`; `simulated_gpus` > 0: that many simulated GPUs (WAN_GPU_INVENTORY, computing on the CPU)."""
    env = {**os.environ, "PREFECT_HOME": str(root / "prefect-home"), "WAN_OUTPUTS_DIR": str(root / "outputs"),
           "WAN_RESIDENT_GPUS": json.dumps(resident_gpus), "WAN_GPU_POLL_SECONDS": "0.5",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("PREFECT_API_URL", None)
    if simulated_gpus:
        env["WAN_GPU_INVENTORY"] = json.dumps([{}] * simulated_gpus)
    return env


@dataclass(frozen=True)
class Service:
    api: str          # the server's API URL
    home: Path        # its PREFECT_HOME
    outputs: Path     # where runs publish (WAN_OUTPUTS_DIR)
    setup_s: float    # seconds `wanflow setup` took


@contextmanager
def running_service(env: dict[str, str], logs: Path, limit: int | None = None,
                    start_timeout: float = 120) -> Iterator[Service]:
    """`wanflow setup` then `wanflow worker` (`limit`: flow-run processes at once) in `env`
    (`service_environment`), logs in `logs`; the server and the worker are stopped on leaving, however it ends.
    This process's PREFECT_API_URL points at the server inside (for the client)."""
    home, outputs = Path(env["PREFECT_HOME"]), Path(env["WAN_OUTPUTS_DIR"])
    port = free_port()
    server_pid = worker = None
    try:
        started = time.perf_counter()
        setup = subprocess.run([*WANFLOW, "setup", "--port", str(port)], env=env, cwd=ROOT, text=True,
                               capture_output=True, timeout=600)
        (logs / "setup.log").write_text(setup.stdout + setup.stderr)
        if setup.returncode:
            raise RuntimeError(f"wanflow setup failed:\n{setup.stdout[-2000:]}{setup.stderr[-2000:]}")
        server_pid = int((home / "server.pid").read_text())
        setup_s = time.perf_counter() - started
        command = [*WANFLOW, "worker", *(["--limit", str(limit)] if limit is not None else [])]
        with open(logs / "worker.log", "w") as log:
            worker = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        for gpu in json.loads(env.get("WAN_RESIDENT_GPUS", "[]")):
            wait_for(f"engine worker socket of gpu-{gpu}",
                     lambda g=gpu: (home / "wanflow-engines" / f"gpu-{g}.sock").exists(), start_timeout,
                     logs / "worker.log")
        os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
        yield Service(os.environ["PREFECT_API_URL"], home, outputs, setup_s)
    finally:
        if worker is not None:
            stop_process_group(worker.pid)
        if server_pid is not None:
            stop_process_group(server_pid)


def create_run(client, request: dict):
    """A generate-video flow run of `request`, created from the deployment."""
    deployment = client.read_deployment_by_name(DEPLOYMENT)
    return client.create_flow_run_from_deployment(deployment.id, parameters={"request": request})


def wait_final(client, run, timeout: float, log: Path | None = None):
    """The flow run read back once its state is final."""
    wait_for(f"final state of {run.name}", lambda: client.read_flow_run(run.id).state.is_final(), timeout, log)
    return client.read_flow_run(run.id)


def wait_all_final(client, runs: list, started: float, timeout: float, log: Path | None = None) -> tuple[list, list]:
    """The flow runs read back once every one is final, and the seconds from `started` (perf_counter) to when
    each was seen final."""
    ends: dict = {}

    def all_final() -> bool:
        for run in runs:
            if run.id not in ends and client.read_flow_run(run.id).state.is_final():
                ends[run.id] = time.perf_counter() - started
        return len(ends) == len(runs)

    wait_for(f"final states of {len(runs)} runs", all_final, timeout, log)
    return [client.read_flow_run(run.id) for run in runs], [ends[run.id] for run in runs]


def read_records(outputs: Path) -> dict[str, dict]:
    """Every published metadata.json under `outputs`, by flow-run id."""
    records = (json.loads(p.read_text()) for p in outputs.glob("*/*/metadata.json"))
    return {record["run_id"]: record for record in records}


def overlaps(records: dict[str, dict]) -> list[tuple[str, str, str]]:
    """Pairs of runs whose recorded holds of one GPU intersect: (tag, run a, run b)."""
    holds: dict[str, list[tuple[float, float, str]]] = {}
    for run_id, record in records.items():
        hold = record["gpu_hold"]
        for gpu in record["gpus"]:
            holds.setdefault(gpu["tag"], []).append((hold["acquired_unix"], hold["released_unix"], run_id))
    found = []
    for tag, spans in holds.items():
        spans.sort()
        longest = spans[0]   # of the holds begun so far, the one that ends last
        for span in spans[1:]:
            if span[0] < longest[1]:
                found.append((tag, longest[2], span[2]))
            longest = max(longest, span, key=lambda s: s[1])
    return found
