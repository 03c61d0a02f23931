"""Load on the GPU slots: many tiny runs on simulated GPUs through the deployment and a worker.

A throwaway Prefect home gets a real server and its deployments from `wanflow setup`, a
`wanflow worker` serves it, and `--runs` generate-video runs of the tiny preset are created
through the API (what the UI's Run button does) with strategies mixed in a fixed pattern:
1-GPU and 2-GPU `concurrent` jobs, 4-GPU `max_speed` jobs and `auto`. The GPUs are simulated
(`WAN_GPU_INVENTORY`), so the slots, leases, queue and worker are real and the engine runs
on the CPU. At the end it reports, from each published metadata.json and the server:

- overlaps: two runs holding one GPU at the same time (from the recorded hold intervals);
- slots left taken on the server once every run has ended;
- lost runs: runs that did not complete, or completed without a published video;
- the longest wait of a `max_speed` run for its GPUs, and the throughput.

    python benchmarks/gpu_slot_load.py --runs 40 --gpus 4 --worker-limit 8
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from local_service import overlaps  # noqa: E402

from deployments.processes import free_port, stop_process_group  # noqa: E402

WANFLOW = [sys.executable, "-m", "flows.cli"]
TINY = {"task": "tiny", "size": "64*64", "frame_count": 5, "steps": 2}
# The pattern the runs cycle through: mostly single-GPU jobs with wide jobs arriving among them.
MIX = [
    {"strategy": "concurrent"},
    {"strategy": "concurrent"},
    {"strategy": "max_speed"},
    {"strategy": "concurrent", "gpus_per_job": 2},
    {"strategy": "concurrent"},
    {"strategy": "auto"},
    {"strategy": "concurrent"},
    {"strategy": "concurrent", "gpus_per_job": 2},
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--gpus", type=int, default=4, help="simulated GPUs")
    parser.add_argument("--worker-limit", type=int, default=8, help="flow-run processes at once (wanflow worker)")
    parser.add_argument("--arrival-s", type=float, default=0.5, help="seconds between two runs' creation")
    parser.add_argument("--timeout-s", type=float, default=1500, help="the whole load must end within this")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (logs, outputs)")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="wanflow-load-"))
    port, home, outputs = free_port(), scratch / "prefect-home", scratch / "outputs"
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "WAN_OUTPUTS_DIR": str(outputs),
           "WAN_GPU_INVENTORY": json.dumps([{}] * args.gpus), "WAN_GPU_POLL_SECONDS": "0.5",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    env.pop("PREFECT_API_URL", None)
    os.environ.update(PREFECT_HOME=str(home), DO_NOT_TRACK="1")  # before this process imports Prefect
    worker = None
    try:
        print(f"scratch {scratch}: wanflow setup on {api}", file=sys.stderr)
        subprocess.run([*WANFLOW, "setup", "--port", str(port)], env=env, cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        with open(scratch / "worker.log", "w") as log:
            worker = subprocess.Popen([*WANFLOW, "worker", "--limit", str(args.worker_limit)], env=env, cwd=ROOT,
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        report = run_load(api, args, outputs)
    finally:
        if worker is not None:
            stop_process_group(worker.pid)
        if (home / "server.pid").is_file():
            stop_process_group(int((home / "server.pid").read_text()))
        if not args.keep:
            subprocess.run(["rm", "-rf", str(scratch)], check=False)
    print_report(report, args)


def run_load(api: str, args: argparse.Namespace, outputs: Path) -> dict:
    from prefect.client.orchestration import SyncPrefectClient

    from tasks.allocate import limit_name

    with SyncPrefectClient(api) as client:
        deployment = client.read_deployment_by_name("generate-video/generate-video")
        started = time.monotonic()
        runs = {}
        for i, mix in zip(range(args.runs), itertools.cycle(MIX), strict=False):
            request = {**TINY, **mix, "prompt": f"load run {i}", "seed": i}
            runs[client.create_flow_run_from_deployment(deployment.id, parameters={"request": request}).id] = request
            time.sleep(args.arrival_s)
        states = {}
        while len(states) < len(runs):
            if time.monotonic() - started > args.timeout_s:
                break
            for run_id in runs.keys() - states.keys():
                state = client.read_flow_run(run_id).state
                if state is not None and state.is_final():
                    states[run_id] = state
            time.sleep(1)
        elapsed = time.monotonic() - started
        time.sleep(2)  # a release logged just before the run's final state reaches the server after it
        left = {f"gpu-{i}": client.read_global_concurrency_limit_by_name(limit_name(f"gpu-{i}")).active_slots
                for i in range(args.gpus)}
    records = [json.loads(p.read_text()) for p in outputs.glob("*/*/metadata.json")]
    records = {record["run_id"]: record for record in records}
    return {"runs": runs, "states": states, "records": records, "elapsed": elapsed, "slots_left": left}


def print_report(report: dict, args: argparse.Namespace) -> None:
    runs, states, records = report["runs"], report["states"], report["records"]
    completed = {str(r) for r, s in states.items() if s.is_completed()}
    published = {r for r in completed if r in records}
    lost = len(runs) - len(published)
    wide = [records[str(r)]["gpu_wait_s"] for r, q in runs.items()
            if q["strategy"] == "max_speed" and str(r) in records]
    by_state: dict[str, int] = {}
    for state in states.values():
        by_state[state.type.value] = by_state.get(state.type.value, 0) + 1
    found = overlaps({r: records[r] for r in published})
    print(f"{len(runs)} tiny runs on {args.gpus} simulated GPUs, worker limit {args.worker_limit}, "
          f"one run created every {args.arrival_s:g} s")
    print(f"{'final states':<34}{', '.join(f'{k} {v}' for k, v in sorted(by_state.items())) or 'none'}"
          f"{f', {len(runs) - len(states)} not final' if len(states) < len(runs) else ''}")
    print(f"{'overlaps (two runs on one GPU)':<34}{len(found)}")
    print(f"{'slots left taken':<34}{sum(report['slots_left'].values())}")
    print(f"{'lost runs':<34}{lost}")
    print(f"{'longest max_speed wait':<34}{max(wide, default=0.0):.1f} s over {len(wide)} runs")
    print(f"{'throughput':<34}{len(published) / report['elapsed'] * 60:.1f} runs/min "
          f"({len(published)} in {report['elapsed']:.0f} s)")
    for tag, a, b in found:
        print(f"  overlap on {tag}: {a} and {b}")


if __name__ == "__main__":
    main()
