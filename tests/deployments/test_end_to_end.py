"""wanflow as a service, end to end on one server that `wanflow setup` starts for this module: setup
restarts its own server without losing a held GPU lease, `wanflow worker` serves a generate-video run
triggered through the API (what the UI's Run button does), a run with an unknown parameter is refused,
a killed run's GPU comes back within seconds, and SIGTERM to the worker cancels its runs and frees their GPUs.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterType,
)

from deployments.processes import free_port, stop_process_group
from tasks.allocate import limit_name

pytestmark = pytest.mark.slow

WANFLOW = [sys.executable, "-m", "flows.cli"]
TINY = {"task": "tiny", "prompt": "a lighthouse at dusk", "size": "64*64", "frame_count": 5, "steps": 2, "seed": 1}
# ~20 s of denoising on one core: long enough to be caught mid-denoise
LONG = {"task": "tiny", "prompt": "a long swell", "size": "128*128", "frame_count": 161, "steps": 200, "seed": 1}
GPU = "gpu-0"  # the one simulated GPU of this host (WAN_GPU_INVENTORY)


@dataclass
class Service:
    api: str
    env: dict[str, str]
    root: Path
    home: Path
    outputs: Path

    def setup(self, port: int) -> subprocess.CompletedProcess:
        return subprocess.run([*WANFLOW, "setup", "--port", str(port)], env=self.env, cwd=self.root, text=True,
                              capture_output=True, timeout=400)

    def start_worker(self, log_name: str) -> subprocess.Popen:
        with open(self.root / log_name, "w") as log:  # the worker finds the server in the saved profile
            return subprocess.Popen([*WANFLOW, "worker"], env=self.env, cwd=self.root, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def log(self, name: str) -> str:
        return (self.root / name).read_text()[-4000:]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """A server started by `wanflow setup` in a fresh PREFECT_HOME, one simulated GPU."""
    root = tmp_path_factory.mktemp("service")
    port, home = free_port(), root / "prefect-home"
    env = {**os.environ, "PREFECT_HOME": str(home), "WAN_OUTPUTS_DIR": str(root / "outputs"),
           "WAN_GPU_INVENTORY": "[{}]", "WAN_GPU_POLL_SECONDS": "0.5"}
    env.pop("PREFECT_API_URL", None)  # setup starts its own server on 127.0.0.1
    env.pop("WAN_NODE_NAME", None)
    service = Service(f"http://127.0.0.1:{port}/api", env, root, home, root / "outputs")
    try:
        setup = service.setup(port)
        assert setup.returncode == 0, setup.stdout + setup.stderr
        assert f"Prefect API: {service.api} (started)" in setup.stdout
        assert "deployments: batch-generate, generate-video" in setup.stdout
        yield service
    finally:
        pid_file = home / "server.pid"
        if pid_file.is_file():
            stop_process_group(int(pid_file.read_text()))  # what `prefect server stop` would do


@pytest.fixture(scope="module")
def worker(service):
    """`wanflow worker` for the tests that need runs served; the last test stops it with SIGTERM."""
    process = service.start_worker("worker.log")
    yield process
    stop_process_group(process.pid)


def wait_for(what: str, check, timeout: float, interval: float = 0.5, log: str = ""):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"not {what} within {timeout:.0f} s\n{log}"
        time.sleep(interval)
    return result


def slot_taken(client: SyncPrefectClient) -> bool:
    return client.read_global_concurrency_limit_by_name(limit_name(GPU)).active_slots > 0


def start_long_run_until_denoising(client: SyncPrefectClient, worker: subprocess.Popen, log: str):
    """A LONG run, served and holding the GPU, past its first denoising step; returns it and its process id."""
    deployment = client.read_deployment_by_name("generate-video/generate-video")
    run = client.create_flow_run_from_deployment(deployment.id, parameters={"request": LONG})
    progress = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]),
                              type=ArtifactFilterType(any_=["progress"]))

    def denoising() -> bool:
        assert worker.poll() is None, "the worker ended"
        return any(a.data for a in client.read_artifacts(artifact_filter=progress)) and slot_taken(client)

    wait_for("denoising", denoising, timeout=180, log=log)
    run = client.read_flow_run(run.id)
    return run, int(run.infrastructure_pid)


def test_setup_restarts_the_server_it_started_and_a_lease_held_across_the_restart_survives(service):
    with SyncPrefectClient(service.api) as client:
        response = client.increment_concurrency_slots_with_lease([limit_name(GPU)], 1, "concurrency", 300)
        lease_id = response.json()["lease_id"]
    stop_process_group(int((service.home / "server.pid").read_text()), grace_s=0)  # the server dies

    again = service.setup(free_port())  # the saved profile names the dead server: setup brings it back
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"Prefect API: {service.api} (restarted)" in again.stdout
    with SyncPrefectClient(service.api) as client:
        assert slot_taken(client)  # still held, and by a lease the server knows:
        client.release_concurrency_slots_with_lease(lease_id)
        assert not slot_taken(client)


def test_a_triggered_generation_completes(service, worker):
    with SyncPrefectClient(service.api) as client:
        deployment = client.read_deployment_by_name("generate-video/generate-video")
        fields = deployment.parameter_openapi_schema["definitions"]["GenerationRequest"]["properties"]
        enums = {name: fields[name]["anyOf"][0]["enum"] for name in ("task", "size", "tier", "strategy")}
        assert "tiny" in enums["task"] and "832*480" in enums["size"]
        assert enums["tier"] == ["quality", "balanced", "speed"]
        assert enums["strategy"] == ["auto", "max_speed", "concurrent"]
        assert fields["steps"]["anyOf"][0]["maximum"] == 200  # bounded number fields

        run = client.create_flow_run_from_deployment(deployment.id, parameters={"request": TINY})

        def final():
            assert worker.poll() is None, service.log("worker.log")
            return (state := client.read_flow_run(run.id).state).is_final() and state

        state = wait_for("finished", final, timeout=400, interval=1, log=service.log("worker.log"))
    assert state.is_completed(), state.message + service.log("worker.log")
    [metadata] = service.outputs.glob("*/*/metadata.json")
    record = json.loads(metadata.read_text())
    assert record["run_id"] == str(run.id) and record["request"]["prompt"] == TINY["prompt"]
    assert (metadata.parent / "video.mp4").stat().st_size > 0


def test_a_run_with_an_unknown_parameter_is_refused_when_created(service):
    with SyncPrefectClient(service.api) as client:
        deployment = client.read_deployment_by_name("generate-video/generate-video")
        with pytest.raises(httpx.HTTPStatusError) as refused:
            client.create_flow_run_from_deployment(deployment.id, parameters={"request": TINY, "colour": "red"})
    assert refused.value.response.status_code == 409
    assert "Additional properties are not allowed ('colour' was unexpected)" in refused.value.response.text


def test_a_killed_runs_gpu_comes_back_within_seconds(service, worker):
    with SyncPrefectClient(service.api) as client:
        run, pid = start_long_run_until_denoising(client, worker, service.log("worker.log"))
        os.kill(pid, signal.SIGKILL)  # as the OOM killer would
        killed = time.monotonic()
        wait_for("given back", lambda: not slot_taken(client), timeout=10, interval=0.2,
                 log=service.log("worker.log"))
        assert time.monotonic() - killed < 5  # not after the lease (60 s) and the reclaim interval
        state = wait_for("final", lambda: (s := client.read_flow_run(run.id).state).is_final() and s, timeout=30)
    assert state.is_crashed(), state


def test_sigterm_to_the_worker_cancels_its_runs_and_frees_their_gpus(service, worker):
    with SyncPrefectClient(service.api) as client:
        run, pid = start_long_run_until_denoising(client, worker, service.log("worker.log"))
        worker.send_signal(signal.SIGTERM)  # what docs/deploy.md and systemd do
        stopped = time.monotonic()
        wait_for("given back", lambda: not slot_taken(client), timeout=10, interval=0.2,
                 log=service.log("worker.log"))
        assert time.monotonic() - stopped < 5
        assert worker.wait(timeout=60) == 0, service.log("worker.log")
        state = client.read_flow_run(run.id).state
    assert state.is_cancelled(), state
    assert state.message.startswith("cancelled: worker wanflow-") and state.message.endswith(" stopped (SIGTERM)")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # nothing of the run is left
    assert not list(service.outputs.glob(f"*/*{str(run.id)[:8]}*"))  # and no output of it
