"""Eight tiny generations at once on two (simulated) GPUs, in eight processes, on a local server.

From the task-run timestamps: a GPU never serves two runs at once, all eight complete, and
with the `concurrent` strategy two runs do share the host side by side.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from deployments.processes import free_port

REPO = Path(__file__).resolve().parents[2]
JOBS = 8


@pytest.fixture
def local_server(tmp_path):
    """`prefect server start` on a free port with its own PREFECT_HOME; yields (api_url, env)."""
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([Path(sys.executable).parent / "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{api}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
                time.sleep(0.5)
        yield api, {**env, "PREFECT_API_URL": api}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


@pytest.mark.slow
def test_eight_runs_never_share_a_gpu(local_server, tmp_path):
    api, env = local_server
    outputs = tmp_path / "outputs"
    env.update(WAN_GPU_INVENTORY="[{}, {}]", WAN_GPU_POLL_SECONDS="0.5", WAN_OUTPUTS_DIR=str(outputs),
               WAN_GPU_TAG_PREFIX="gpu", OMP_NUM_THREADS="1")  # one core per run: two runs share two cores
    jobs = []
    for k in range(JOBS):
        # 8 steps: a GPU phase long enough (a second or two) that two of them overlap whatever the start-up jitter
        request = {"task": "tiny", "prompt": f"job {k}", "frame_count": 5, "steps": 8, "strategy": "concurrent",
                   "seed": k}
        log = tmp_path / f"job-{k}.log"
        with open(log, "w") as out:
            jobs.append((log, subprocess.Popen([sys.executable, "-m", "flows.generate", json.dumps(request)],
                                               cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)))
    for log, job in jobs:
        assert job.wait(timeout=500) == 0, log.read_text()[-3000:]

    records = [json.loads(p.read_text()) for p in outputs.glob("*/*/metadata.json")]
    assert len(records) == JOBS
    spans = []  # (gpu tag, start of the GPU phase, end of the GPU phase)
    with SyncPrefectClient(api) as client:
        for record in records:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[record["run_id"]])))
            assert len(runs) == 6 and all(run.state.is_completed() for run in runs)
            gpu_phase = [r for r in runs if r.name.rsplit("-", 1)[0] in ("warm-up-compile", "denoise", "encode")]
            [gpu] = record["gpus"]
            hold = record["gpu_hold"]  # the recorded hold lies inside the GPU phase's bounds
            assert hold["acquired_unix"] <= min(r.start_time for r in gpu_phase).timestamp()
            assert hold["released_unix"] >= max(r.end_time for r in gpu_phase).timestamp() - 0.5
            spans.append((gpu["tag"], min(r.start_time for r in gpu_phase), max(r.end_time for r in gpu_phase)))
            assert client.read_flow_run(record["run_id"]).state.is_completed()

    overlaps = [(a, b) for i, a in enumerate(spans) for b in spans[i + 1:] if a[1] < b[2] and b[1] < a[2]]
    assert all(a[0] != b[0] for a, b in overlaps), f"two runs on one GPU at once: {overlaps}"
    assert overlaps, "with two GPUs and the concurrent strategy, two runs should have run side by side"
    assert {tag for tag, _, _ in spans} == {"gpu-0", "gpu-1"}
