"""Regenerate docs/ui-run.png: the Prefect UI's page of a completed generate-video run.

Everything happens in a throwaway Prefect home: `wanflow setup` starts a server on a free
127.0.0.1 port and prepares it, `wanflow worker` serves it, a tiny-preset generation is
triggered through the API (what the UI's Run button does), and once it has completed its
run page is photographed by headless Chromium (Debian: `apt-get install -y chromium`).
The worker and the server are stopped at the end.

    python scripts/screenshot_ui.py [--output docs/ui-run.png]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from deployments.processes import free_port, stop_process_group

REPO = Path(__file__).resolve().parents[1]
WANFLOW = [sys.executable, "-m", "flows.cli"]
REQUEST = {"task": "tiny", "prompt": "a lighthouse at dusk, waves breaking on the rocks", "size": "128*128",
           "frame_count": 9, "steps": 6, "seed": 7}
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
    "--virtual-time-budget=20000",  # let the single-page app fetch the run, its task runs and logs
]
WINDOW = "1600,1000"

log = logging.getLogger("screenshot_ui")


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if found := shutil.which(name):
            return found
    raise SystemExit("headless Chromium is needed: apt-get update && apt-get install -y chromium")


def _run_generation(api: str, timeout: float = 600) -> str:
    """Trigger generate-video through the API and wait until it ends; returns the run id."""
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(api) as client:
        deployment = client.read_deployment_by_name("generate-video/generate-video")
        run = client.create_flow_run_from_deployment(deployment.id, parameters={"request": REQUEST})
        deadline = time.monotonic() + timeout
        while not (state := client.read_flow_run(run.id).state).is_final():
            if time.monotonic() > deadline:
                raise SystemExit(f"the run did not finish within {timeout:.0f} s")
            time.sleep(1)
    if not state.is_completed():
        raise SystemExit(f"the run ended {state.type.value}: {state.message}")
    return str(run.id)


def screenshot(output: Path, workdir: Path) -> None:
    chromium = _chromium()
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    home = workdir / "prefect-home"
    env = {**os.environ, "PREFECT_HOME": str(home), "WAN_OUTPUTS_DIR": str(workdir / "outputs"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    env.pop("PREFECT_API_URL", None)
    env.pop("WAN_GPU_INVENTORY", None)
    os.environ.update(PREFECT_HOME=str(home), DO_NOT_TRACK="1")  # before this process imports Prefect
    worker = None
    try:
        log.info("wanflow setup (server on %s)", api)
        subprocess.run([*WANFLOW, "setup", "--port", str(port)], env=env, cwd=REPO, check=True)
        with open(workdir / "worker.log", "w") as worker_log:
            worker = subprocess.Popen([*WANFLOW, "worker"], env=env, cwd=REPO, stdout=worker_log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        log.info("generating %s", json.dumps(REQUEST))
        run_id = _run_generation(api)
        time.sleep(3)  # the last task-run events reach the server a moment after the run ends
        url = f"http://127.0.0.1:{port}/runs/flow-run/{run_id}"
        log.info("photographing %s", url)
        output.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={workdir / 'chromium'}",
                        f"--screenshot={output.resolve()}", f"--window-size={WINDOW}", url],
                       check=True, capture_output=True, timeout=180)
    finally:
        if worker is not None:
            stop_process_group(worker.pid)
        if (home / "server.pid").is_file():
            stop_process_group(int((home / "server.pid").read_text()))  # what `prefect server stop` does
    log.info("wrote %s (%d bytes)", output, output.stat().st_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "ui-run.png")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per status poll otherwise
    with tempfile.TemporaryDirectory(prefix="wanflow-screenshot-") as workdir:
        screenshot(args.output, Path(workdir))


if __name__ == "__main__":
    main()
