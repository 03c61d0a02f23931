"""`wanflow setup` starts a local server and prepares it, `wanflow worker` serves it, and a
generate-video run triggered through the API (what the UI's Run button does) completes with its video.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from prefect.client.orchestration import SyncPrefectClient

from deployments.processes import free_port, stop_process_group

WANFLOW = [sys.executable, "-m", "flows.cli"]
TINY = {"task": "tiny", "prompt": "a lighthouse at dusk", "size": "64*64", "frame_count": 5, "steps": 2, "seed": 1}


@pytest.mark.slow
def test_setup_then_worker_then_a_triggered_generation_completes(tmp_path):
    port, home, outputs = free_port(), tmp_path / "prefect-home", tmp_path / "outputs"
    env = {**os.environ, "PREFECT_HOME": str(home), "WAN_OUTPUTS_DIR": str(outputs)}
    env.pop("PREFECT_API_URL", None)  # setup starts its own server on 127.0.0.1
    env.pop("WAN_GPU_INVENTORY", None)
    api, worker = f"http://127.0.0.1:{port}/api", None
    try:
        setup = subprocess.run([*WANFLOW, "setup", "--port", str(port)], env=env, cwd=tmp_path, text=True,
                               capture_output=True, timeout=400)
        assert setup.returncode == 0, setup.stdout + setup.stderr
        assert f"Prefect API: {api} (started)" in setup.stdout
        assert "deployments: batch-generate, generate-video" in setup.stdout
        with open(tmp_path / "worker.log", "w") as log:  # the worker finds the server in the saved profile
            worker = subprocess.Popen([*WANFLOW, "worker"], env=env, cwd=tmp_path, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)

        with SyncPrefectClient(api) as client:
            deployment = client.read_deployment_by_name("generate-video/generate-video")
            fields = deployment.parameter_openapi_schema["definitions"]["GenerationRequest"]["properties"]
            enums = {name: fields[name]["anyOf"][0]["enum"] for name in ("task", "size", "tier", "strategy")}
            assert "tiny" in enums["task"] and "832*480" in enums["size"]
            assert enums["tier"] == ["quality", "balanced", "speed"]
            assert enums["strategy"] == ["auto", "max_speed", "concurrent"]
            assert fields["steps"]["anyOf"][0]["maximum"] == 200  # bounded number fields

            run = client.create_flow_run_from_deployment(deployment.id, parameters={"request": TINY})
            deadline = time.monotonic() + 400
            while not (state := client.read_flow_run(run.id).state).is_final():
                assert worker.poll() is None and time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
                time.sleep(1)
        assert state.is_completed(), state.message + (tmp_path / "worker.log").read_text()[-3000:]
        [metadata] = outputs.glob("*/*/metadata.json")
        record = json.loads(metadata.read_text())
        assert record["run_id"] == str(run.id) and record["request"]["prompt"] == TINY["prompt"]
        assert (metadata.parent / "video.mp4").stat().st_size > 0
    finally:
        if worker is not None:
            stop_process_group(worker.pid)
        pid_file = home / "server.pid"
        if pid_file.is_file():
            stop_process_group(int(pid_file.read_text()))  # what `prefect server stop` would do
