"""Four generate-video runs side by side on 4 GPUs against the same four one at a time (issue 13).

The whole product, as benchmarks/resident_start.py drives it (benchmarks/local_service.py): `wanflow setup`, then
`wanflow worker` with a resident engine worker on each of the 4 GPUs (WAN_RESIDENT_GPUS), and runs created
from the generate-video deployment through the API with strategy `concurrent`, one GPU per job. The four runs
are three of the tiny preset and one real-size run from a checkpoint folder written by
benchmarks/random_checkpoint.py (`--real-runs` changes how many are real-size). Run k names GPU k
(`gpu_ids`), so that each run meets its own GPU's engine warm in both measured phases:

1. warm-up: the four at once (each engine worker loads its run's pipeline; not timed);
2. one at a time: each run created when the one before has ended;
3. side by side: the four created together.

The throughput ratio is phase 2's wall time over phase 3's (goal >= 3.8x). Four runs of unequal length cannot
reach 4x: side by side they take as long as the longest, so the table also gives the ideal ratio for the mix
(the sum of the runs' one-at-a-time walls over the longest) and how much of it was reached; with three tiny runs
beside one real-size run the ideal is close to 1x, and `--real-runs 4` measures the 3.8x goal itself. Every
published metadata.json's `gpu_hold` interval is checked: no two runs may have held one GPU at the same time.

    python benchmarks/random_checkpoint.py --out /tmp/ckpt/Wan2.2-T2V-A14B --share-experts
    python benchmarks/concurrent_runs.py --checkpoint /tmp/ckpt/Wan2.2-T2V-A14B --size 832*480 --frames 81
    python benchmarks/concurrent_runs.py --checkpoint /tmp/ckpt/Wan2.2-T2V-A14B --real-runs 4 --steps 4
    python benchmarks/concurrent_runs.py                 # CPU check: 4 simulated GPUs, four tiny runs

Logs (setup, worker) go to `--logs` (default: a temporary folder, printed).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from local_service import (
    create_run,
    has_gpu,
    overlaps,
    read_records,
    running_service,
    service_environment,
    wait_all_final,
)

GPUS = 4
GOAL = 3.8
TINY = {"task": "tiny", "size": "64*64", "frame_count": 5}


def requests(args: argparse.Namespace) -> list[dict]:
    """The four runs' requests: tiny first, the real-size ones last; run k on GPU k."""
    real = {"size": args.size, "frame_count": args.frames}
    if args.checkpoint:
        config = json.loads((args.checkpoint / "high_noise_model" / "config.json").read_text())
        real |= {"task": f"{config['model_type']}-A14B", "checkpoint": str(args.checkpoint)}
    kinds = [TINY] * (GPUS - args.real_runs) + [{k: v for k, v in real.items() if v is not None}] * args.real_runs
    return [{**kind, "prompt": "a lighthouse at dusk, waves breaking", "steps": args.steps, "tier": "quality",
             "strategy": "concurrent", "gpus_per_job": 1, "gpu_ids": [k], "seed": k + 1}
            for k, kind in enumerate(kinds)]


def run_phase(client, name: str, batch: list[dict], together: bool, args: argparse.Namespace,
              log: Path) -> dict:
    """The phase's runs, created together or each once the one before is final: its wall seconds, its runs and
    each run's seconds from its creation to its final state."""
    started, runs, seconds = time.perf_counter(), [], []
    if together:
        runs, seconds = wait_all_final(client, [create_run(client, request) for request in batch], started,
                                       args.timeout, log)
    else:
        for request in batch:
            created = time.perf_counter()
            (run,), (s,) = wait_all_final(client, [create_run(client, request)], created, args.timeout, log)
            runs.append(run)
            seconds.append(s)
    wall = time.perf_counter() - started
    print(f"{name}: {wall:.1f} s, {', '.join(r.state.type.value for r in runs)}", file=sys.stderr, flush=True)
    return {"name": name, "wall_s": wall, "runs": runs, "run_s": seconds}


def run_row(phase: dict, k: int, request: dict, records: dict) -> dict:
    run = phase["runs"][k]
    record = records.get(str(run.id), {})
    engine = record.get("engine") or {}
    return {"phase": phase["name"], "run": k, "task": request["task"], "state": run.state.type.value,
            "gpus": [g["tag"] for g in record.get("gpus", [])], "created_to_final_s": round(phase["run_s"][k], 2),
            "flow_run_s": round(run.total_run_time.total_seconds(), 2),
            "denoise_s": round(sum(record.get("step_seconds", [])), 2) if record else None,
            "loads": engine.get("loads"), "resident": engine.get("resident"),
            "message": None if run.state.is_completed() else run.state.message}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a real-size folder (benchmarks/random_checkpoint.py); "
                        "without it: four tiny runs")
    parser.add_argument("--real-runs", type=int, default=None, help="how many of the four are real-size "
                        "(default: 1 with --checkpoint)")
    parser.add_argument("--size", default=None, help="the real-size runs' W*H (default: the task's first)")
    parser.add_argument("--frames", type=int, default=None, help="the real-size runs' frame count")
    parser.add_argument("--steps", type=int, default=2, help="sampling steps of every run")
    parser.add_argument("--warm-up", action=argparse.BooleanOptionalAction, default=True,
                        help="run the four once first, untimed, so both phases find warm engines")
    parser.add_argument("--logs", type=Path, default=None)
    parser.add_argument("--timeout", type=float, default=1200, help="seconds one run may take")
    args = parser.parse_args()
    gpu = has_gpu()
    if args.checkpoint:
        if not gpu:
            parser.error("--checkpoint: a real-size run needs GPUs; without them the check runs tiny runs only")
        args.checkpoint = args.checkpoint.resolve()
        if not (args.checkpoint / "high_noise_model" / "config.json").is_file():
            parser.error(f"--checkpoint {args.checkpoint}: no high_noise_model/config.json (an A14B folder)")
    args.real_runs = (1 if args.checkpoint else 0) if args.real_runs is None else args.real_runs
    if not 0 <= args.real_runs <= GPUS or (args.real_runs and not args.checkpoint):
        parser.error(f"--real-runs must be 0-{GPUS}, and above 0 only with --checkpoint; got {args.real_runs}")

    root = Path(tempfile.mkdtemp(prefix="wanflow-concurrent-"))
    logs = args.logs or root
    logs.mkdir(parents=True, exist_ok=True)
    env = service_environment(root, list(range(GPUS)), simulated_gpus=0 if gpu else GPUS)
    if args.checkpoint:
        env["WAN_CHECKPOINT_ROOT"] = str(args.checkpoint.parent)
    batch = requests(args)
    phases = []
    with running_service(env, logs, limit=2 * GPUS) as service:
        from prefect.client.orchestration import SyncPrefectClient

        with SyncPrefectClient(service.api) as client:
            if args.warm_up:
                phases.append(run_phase(client, "warm-up", batch, True, args, logs / "worker.log"))
            phases.append(run_phase(client, "one at a time", batch, False, args, logs / "worker.log"))
            phases.append(run_phase(client, "side by side", batch, True, args, logs / "worker.log"))
        time.sleep(1)   # the last run's metadata.json is published before its final state; be sure it is read
        records = read_records(service.outputs)
    report(phases, batch, records, args, logs)
    done = all(r.state.is_completed() for p in phases for r in p["runs"])
    return 0 if done and not overlaps(records) else 1


def report(phases: list[dict], batch: list[dict], records: dict, args: argparse.Namespace, logs: Path) -> None:
    rows = [run_row(p, k, batch[k], records) for p in phases for k in range(len(p["runs"]))]
    for row in rows:
        print(json.dumps(row))
    sequential, together = phases[-2], phases[-1]
    ratio = sequential["wall_s"] / together["wall_s"]
    ideal = sum(sequential["run_s"]) / max(sequential["run_s"])
    found = overlaps(records)
    missing = sum(str(run.id) not in records for p in phases for run in p["runs"])
    print(f"\nlogs: {logs}; {GPUS - args.real_runs} tiny + {args.real_runs} real-size runs, {args.steps} steps, "
          f"{'GPUs' if has_gpu() else 'simulated GPUs (CPU)'}")
    print("| phase | run | task | state | GPU | created -> final s | flow run s (server) | denoise s "
          "| pipelines loaded there |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['phase']} | {r['run']} | {r['task']} | {r['state']} | {', '.join(r['gpus']) or '—'} "
              f"| {r['created_to_final_s']} | {r['flow_run_s']} | {r['denoise_s']} | {r['loads']} |")
    print()
    print("| one at a time | side by side | throughput ratio | goal | ideal for this mix | of the ideal "
          "| GPU holds overlapping | runs without metadata |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {sequential['wall_s']:.1f} s | {together['wall_s']:.1f} s | {ratio:.2f}x | >= {GOAL}x "
          f"({'yes' if ratio >= GOAL else 'NO'}) | {ideal:.2f}x | {ratio / ideal:.0%} | {len(found)} | {missing} |")
    for tag, a, b in found:
        print(f"- overlap on {tag}: {a} and {b}")


if __name__ == "__main__":
    sys.exit(main())
