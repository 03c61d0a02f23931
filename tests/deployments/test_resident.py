"""Resident engine workers behind `wanflow worker`, end to end on a server that `wanflow setup` starts for this
module and one simulated GPU with a CPU-backed engine worker (WAN_RESIDENT_GPUS=[0]): the worker serves runs in a
row with one model load, a cancel mid-run frees the GPU and the worker serves the next run, and a killed engine
worker fails its run at once, saying so, and is started again.
"""
from __future__ import annotations

import json
import os
import signal
import time
from multiprocessing.connection import Client
from pathlib import Path

import pytest
from prefect.client.orchestration import SyncPrefectClient
from prefect.states import Cancelling

from deployments.processes import free_port, stop_process_group
from tasks.engine_channel import Job, receive, send
from tests.deployments.test_end_to_end import TINY, Service, slot_taken, start_long_run_until_denoising, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("resident")
    port, home = free_port(), root / "prefect-home"
    env = {**os.environ, "PREFECT_HOME": str(home), "WAN_OUTPUTS_DIR": str(root / "outputs"),
           "WAN_GPU_INVENTORY": "[{}]", "WAN_GPU_POLL_SECONDS": "0.5", "WAN_RESIDENT_GPUS": "[0]"}
    env.pop("PREFECT_API_URL", None)
    env.pop("WAN_NODE_NAME", None)
    service = Service(f"http://127.0.0.1:{port}/api", env, root, home, root / "outputs")
    try:
        setup = service.setup(port)
        assert setup.returncode == 0, setup.stdout + setup.stderr
        yield service
    finally:
        pid_file = home / "server.pid"
        if pid_file.is_file():
            stop_process_group(int(pid_file.read_text()))


@pytest.fixture(scope="module")
def worker(service):
    process = service.start_worker("worker.log")
    yield process
    stop_process_group(process.pid)


def status(home: Path) -> dict:
    """What the engine worker of gpu-0 says about itself, asked over its channel."""
    engines = home / "wanflow-engines"
    with Client(str(engines / "gpu-0.sock"), family="AF_UNIX", authkey=(engines / "authkey").read_bytes()) as conn:
        send(conn, Job("status"))
        return receive(conn)[1]


def run_to_the_end(client: SyncPrefectClient, worker, service: Service, request: dict, timeout: float = 300):
    deployment = client.read_deployment_by_name("generate-video/generate-video")
    run = client.create_flow_run_from_deployment(deployment.id, parameters={"request": request})

    def final():
        assert worker.poll() is None, service.log("worker.log")
        return (state := client.read_flow_run(run.id).state).is_final() and state

    state = wait_for("finished", final, timeout=timeout, interval=0.5, log=service.log("worker.log"))
    return client.read_flow_run(run.id), state


def metadata(service: Service, run_id) -> dict:
    [path] = service.outputs.glob(f"*/*{str(run_id)[:8]}*/metadata.json")
    return json.loads(path.read_text())


def first_step_s(run, record: dict) -> float:
    """Seconds from the flow run's start to the end of its first denoising step."""
    return record["engine"]["first_step_unix"] - run.start_time.timestamp()


def test_a_resident_worker_serves_runs_in_a_row_with_one_model_load(service, worker):
    wait_for("the engine worker", lambda: (service.home / "wanflow-engines" / "gpu-0.sock").exists(), timeout=60,
             log=service.log("worker.log"))
    with SyncPrefectClient(service.api) as client:
        records, starts = [], []
        for seed in (1, 2, 3):
            run, state = run_to_the_end(client, worker, service, {**TINY, "seed": seed})
            assert state.is_completed(), state.message + service.log("worker.log")
            records.append(metadata(service, run.id))
            starts.append(first_step_s(run, records[-1]))
    engines = [r["engine"] for r in records]
    assert all(e["resident"] for e in engines)
    assert len({e["pid"] for e in engines}) == 1  # one process served all three
    assert [e["loads"] for e in engines] == [1, 1, 1]  # loaded once, by the first run
    assert engines[0]["parallel"] == {"ulysses": 1, "cfg": 1, "gpus": [0], "world_size": 1}
    assert engines[0]["ranks"][0]["pid"] == engines[0]["pid"] and engines[0]["ranks"][0]["denoise_s"] > 0
    assert records[0]["seed"] == 1 and records[2]["seed"] == 3
    calls = []
    for _ in range(20):
        started = time.perf_counter()
        answer = status(service.home)
        calls.append(time.perf_counter() - started)
    assert answer["loads"] == 1 and answer["pid"] == engines[0]["pid"]
    # NCCL set up for a process that outlives a failed job (a timeout aborts the job, not the worker), NVLS off
    assert answer["environment"] == {"NCCL_NVLS_ENABLE": "0", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}
    print(f"\nflow-run start to first denoising step: cold {starts[0]:.2f} s, warm {starts[1]:.2f} s, "
          f"{starts[2]:.2f} s; channel round trip (connect, authenticate, call): "
          f"median {sorted(calls)[10] * 1e3:.2f} ms")


def test_a_cancel_mid_run_frees_the_gpu_and_the_worker_serves_the_next_run(service, worker):
    before = status(service.home)
    with SyncPrefectClient(service.api) as client:
        run, _ = start_long_run_until_denoising(client, worker, service.log("worker.log"))
        client.set_flow_run_state(run.id, Cancelling(message="a user pressed Cancel"), force=True)
        cancelled = time.monotonic()
        wait_for("given back", lambda: not slot_taken(client), timeout=15, interval=0.2, log=service.log("worker.log"))
        wait_for("the engine worker idle", lambda: not status(service.home)["busy"], timeout=15, interval=0.2,
                 log=service.log("worker.log"))  # it stopped that job between two steps
        assert time.monotonic() - cancelled < 15
        wait_for("cancelled", lambda: client.read_flow_run(run.id).state.is_cancelled(), timeout=30)
        after = run_to_the_end(client, worker, service, {**TINY, "seed": 4})  # by the same warm process
    assert after[1].is_completed(), after[1].message
    record = metadata(service, after[0].id)["engine"]
    assert record["pid"] == before["pid"] and record["loads"] == before["loads"]


def test_a_killed_engine_worker_fails_its_run_at_once_and_is_started_again(service, worker):
    killed_pid = status(service.home)["pid"]
    with SyncPrefectClient(service.api) as client:
        run, _ = start_long_run_until_denoising(client, worker, service.log("worker.log"))
        os.kill(killed_pid, signal.SIGKILL)
        killed = time.monotonic()
        state = wait_for("final", lambda: (s := client.read_flow_run(run.id).state).is_final() and s, timeout=60,
                         interval=0.2, log=service.log("worker.log"))
        assert time.monotonic() - killed < 60
        assert state.is_failed(), state
        assert "resident engine worker of gpu-0" in state.message and "died during denoise" in state.message
        wait_for("given back", lambda: not slot_taken(client), timeout=15, interval=0.2)
        wait_for("a new engine worker", lambda: _answers(service.home, killed_pid), timeout=60,
                 log=service.log("worker.log"))
        after = run_to_the_end(client, worker, service, TINY)
    assert after[1].is_completed(), after[1].message
    assert metadata(service, after[0].id)["engine"]["loads"] == 1  # the new process loaded it again


def _answers(home: Path, old_pid: int) -> bool:
    try:
        return status(home)["pid"] != old_pid
    except (FileNotFoundError, ConnectionRefusedError):
        return False
