"""Seconds from a flow run's start to its first denoising step, cold and warm, through `wanflow worker`.

The whole product as a user runs it: `wanflow setup` starts a local Prefect server and registers the
deployments, `wanflow worker` starts the Prefect process worker and one resident engine worker per GPU
(WAN_RESIDENT_GPUS), and `--runs` generate-video runs are created from the deployment one after another, as
the UI's Run button does. The first run finds the engine worker empty (cold: it loads the checkpoint and
applies the tier); the next ones find the pipeline warm. For each run: the flow run's start (the server's
start_time) to the start and to the end of the first denoising step (metadata.json's engine record), the
pipelines the engine worker had loaded, and the run's final state.

    python benchmarks/resident_start.py --task tiny                       # a CPU check: simulated GPU
    python benchmarks/resident_start.py --checkpoint /ckpt/Wan2.2-T2V-A14B --size '832*480' --steps 2

Logs (server, worker) go to `--logs` (default: a temporary folder, printed).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from deployments.processes import free_port, stop_process_group  # noqa: E402

WANFLOW = [sys.executable, "-m", "flows.cli"]


def wait_for(what: str, check, timeout: float, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.25)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"no {what} after {timeout:.0f} s\n{tail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default=None, help="the request's task (default: tiny, or the checkpoint's)")
    parser.add_argument("--checkpoint", type=Path, help="an official-layout folder (benchmarks/random_checkpoint.py)")
    parser.add_argument("--size", default=None)
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--tier", default="quality")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--logs", type=Path, default=None)
    parser.add_argument("--timeout", type=float, default=900, help="seconds one run may take")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="wanflow-resident-"))
    logs = args.logs or root
    logs.mkdir(parents=True, exist_ok=True)
    home, outputs, port = root / "prefect-home", root / "outputs", free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "WAN_OUTPUTS_DIR": str(outputs), "WAN_RESIDENT_GPUS": "[0]",
           "WAN_GPU_POLL_SECONDS": "0.5", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("PREFECT_API_URL", None)
    request = {"prompt": "a lighthouse at dusk, waves breaking", "steps": args.steps, "tier": args.tier}
    if args.checkpoint:
        checkpoint = args.checkpoint.resolve()
        env["WAN_CHECKPOINT_ROOT"] = str(checkpoint.parent)
        config = json.loads((checkpoint / "high_noise_model" / "config.json").read_text())
        request |= {"task": args.task or f"{config['model_type']}-A14B", "checkpoint": str(checkpoint)}
    else:
        request["task"] = args.task or "tiny"
    if not _has_gpu():
        env["WAN_GPU_INVENTORY"] = "[{}]"  # a simulated GPU: the engine worker computes on the CPU
    request |= {k: v for k, v in (("size", args.size), ("frame_count", args.frames)) if v is not None}

    server_pid = worker = None
    rows = []
    try:
        started = time.perf_counter()
        setup = subprocess.run([*WANFLOW, "setup", "--port", str(port)], env=env, cwd=ROOT, text=True,
                               capture_output=True, timeout=600)
        (logs / "setup.log").write_text(setup.stdout + setup.stderr)
        if setup.returncode:
            raise RuntimeError(f"wanflow setup failed:\n{setup.stdout[-2000:]}{setup.stderr[-2000:]}")
        server_pid = int((home / "server.pid").read_text())
        print(f"wanflow setup: {time.perf_counter() - started:.1f} s", flush=True)
        with open(logs / "worker.log", "w") as log:
            worker = subprocess.Popen([*WANFLOW, "worker"], env=env, cwd=ROOT, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        wait_for("engine worker socket", lambda: (home / "wanflow-engines" / "gpu-0.sock").exists(), 120,
                 logs / "worker.log")
        os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"  # this process talks to the same server
        from prefect.client.orchestration import SyncPrefectClient

        with SyncPrefectClient(os.environ["PREFECT_API_URL"]) as client:
            deployment = client.read_deployment_by_name("generate-video/generate-video")
            for k in range(args.runs):
                run = client.create_flow_run_from_deployment(
                    deployment.id, parameters={"request": {**request, "seed": k + 1}})
                state = wait_for("final state", lambda r=run: (s := client.read_flow_run(r.id).state).is_final()
                                 and s, args.timeout, logs / "worker.log")
                run = client.read_flow_run(run.id)
                rows.append(_row(k, run, state, outputs))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        if worker is not None:
            stop_process_group(worker.pid)
        if server_pid is not None:
            stop_process_group(server_pid)
    print(f"\nlogs: {logs}; request: {json.dumps(request)}")
    print("| run | state | flow-run start -> first step starts | -> first step ends | loads | wall |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['run']} ({'cold' if r['run'] == 1 else 'warm'}) | {r['state']} | {r['to_first_step_s']} s | "
              f"{r['to_first_step_end_s']} s | {r['loads']} | {r['wall_s']} s |")
    return 0 if rows and all(r["state"] == "COMPLETED" for r in rows) else 1


def _row(k: int, run, state, outputs: Path) -> dict:
    row = {"run": k + 1, "state": state.type.value, "message": state.message}
    found = list(outputs.glob(f"*/*{str(run.id)[:8]}*/metadata.json"))
    if not found:
        return row
    record = json.loads(found[0].read_text())
    engine, start = record["engine"], run.start_time.timestamp()
    first_end = engine["first_step_unix"]
    first_start = first_end - record["step_seconds"][0]
    return row | {"to_first_step_s": round(first_start - start, 2),
                  "to_first_step_end_s": round(first_end - start, 2), "loads": engine["loads"],
                  "resident": engine["resident"], "wall_s": round(run.total_run_time.total_seconds(), 1)}


def _has_gpu() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
