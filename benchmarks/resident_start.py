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
import sys
import tempfile
from pathlib import Path

from local_service import create_run, has_gpu, running_service, service_environment, wait_final


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
    # no GPU: a simulated one, whose engine worker computes on the CPU
    env = service_environment(root, [0], simulated_gpus=0 if has_gpu() else 1)
    request = {"prompt": "a lighthouse at dusk, waves breaking", "steps": args.steps, "tier": args.tier}
    if args.checkpoint:
        checkpoint = args.checkpoint.resolve()
        env["WAN_CHECKPOINT_ROOT"] = str(checkpoint.parent)
        config = json.loads((checkpoint / "high_noise_model" / "config.json").read_text())
        request |= {"task": args.task or f"{config['model_type']}-A14B", "checkpoint": str(checkpoint)}
    else:
        request["task"] = args.task or "tiny"
    request |= {k: v for k, v in (("size", args.size), ("frame_count", args.frames)) if v is not None}

    rows = []
    with running_service(env, logs) as service:
        print(f"wanflow setup: {service.setup_s:.1f} s", flush=True)
        from prefect.client.orchestration import SyncPrefectClient

        with SyncPrefectClient(service.api) as client:
            for k in range(args.runs):
                run = create_run(client, {**request, "seed": k + 1})
                run = wait_final(client, run, args.timeout, logs / "worker.log")
                rows.append(_row(k, run, run.state, service.outputs))
                print(json.dumps(rows[-1]), flush=True)
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


if __name__ == "__main__":
    sys.exit(main())
