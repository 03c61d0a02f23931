"""The generate flow's own overhead per run: flow wall time minus engine compute, on the embedded server.

Engine compute is what metadata.json records for the engine (pipeline load, conditioning,
text encoding, denoising, VAE decode); the overhead is everything else: Prefect's flow and
six task runs, GPU allocation, artifacts, the MP4 write and the publish. The first run also
pays the embedded server's start and the pipeline load, so it is reported apart.

    python benchmarks/flow_overhead.py --runs 5
    WAN_GPU_INVENTORY='[{}, {}]' python benchmarks/flow_overhead.py   # with GPU slots to allocate

Runs the tiny preset (CPU is fine). Prefect state goes to a throwaway PREFECT_HOME unless
PREFECT_HOME or PREFECT_API_URL is set.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ENGINE_PHASES = ("load", "conditioning", "text", "denoise", "vae_decode")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs after the first")
    parser.add_argument("--frame-count", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", default="64*64")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="wanflow-bench-"))
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_HOME", str(scratch / "prefect-home"))
    for key, value in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                       "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90"}.items():
        os.environ.setdefault(key, value)
    os.environ["WAN_OUTPUTS_DIR"] = str(scratch / "outputs")

    from flows.cli import _quiet_prefect_console
    from flows.generate import generate_video
    from flows.request import GenerationRequest

    _quiet_prefect_console()
    request = GenerationRequest(task="tiny", prompt="benchmark", frame_count=args.frame_count, steps=args.steps,
                                size=args.size, seed=0)
    rows = [_timed_run(generate_video, request, "first (server start, model load)")]
    rows += [_timed_run(generate_video, request, f"run {i + 1}") for i in range(args.runs)]

    print(f"tiny preset, {args.frame_count} frames at {args.size}, {args.steps} steps; seconds")
    print(f"{'run':<34}{'wall':>8}{'engine':>8}{'overhead':>10}")
    for name, wall, engine in rows:
        print(f"{name:<34}{wall:>8.2f}{engine:>8.2f}{wall - engine:>10.2f}")
    overheads = [wall - engine for _, wall, engine in rows[1:]]
    if overheads:
        print(f"{'median overhead per run':<34}{'':>16}{statistics.median(overheads):>10.2f}")


def _timed_run(generate_video, request, name: str) -> tuple[str, float, float]:
    started = time.perf_counter()
    published = generate_video(request)
    wall = time.perf_counter() - started
    timings = json.loads(published.metadata.read_text())["timings_s"]
    return name, wall, sum(timings.get(phase, 0.0) for phase in ENGINE_PHASES)


if __name__ == "__main__":
    main()
