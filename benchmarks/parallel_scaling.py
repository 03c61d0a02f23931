"""One denoising step on 1, 2, 4 and 8 GPUs: Ulysses, CFG parallel and both, against one GPU (issue 13).

A real-size A14B expert with random bf16 weights (`patches.bench.bench_pipeline`) runs one denoising step with
both guidance branches (the engine's `Denoiser.predict` at the schedule's first step: the forwards, the exchange
of a split job, the guided velocity) at every size asked for, 81 frames, on each world size in one run. Each
world size is one set of processes (one per GPU, NCCL with NVLink multicast off, NCCL_NVLS_ENABLE=0 in every
rank; gloo on the CPU) that forms a job group (`wan_engine.parallel`), builds the expert once and measures, per
size, each way that world can split a step:

- 1 GPU: the engine's own choice for the guidance branches (one batch-2 forward when memory holds it);
- Ulysses only: the tokens over every rank, both branches on each (batched when every rank has the memory);
- CFG parallel only: one branch per GPU, 2 GPUs only (the CFG degree is at most 2);
- both: two halves of W / 2 Ulysses ranks, one branch per half (4 and 8 GPUs).

A combination a world size cannot form is skipped, and the report says why. Each measurement is the median of
`--repeats` (3) steps after one warm-up step, every rank lined up before each step; it reports every rank's
median, the peak memory every GPU held (the expert's weights included), and the relative error of the step's
velocity against the 1-GPU velocity (same weights, noise and prompt rows; a split changes roundings only).
The table printed last gives the speed-up against 1 GPU per size and mode next to the issue's bars (2 GPUs >=
1.9x with CFG parallel, 4 >= 3.6x, 8 >= 6.8x) and the official code's published 720p T2V-A14B times on H800s
(1041.5 s on 1 GPU, 288.7 s on 4: 3.6x, 155.1 s on 8: 6.7x).

Cost: every world size that fits the machine (default: 1, 2, 4, 8, those visible) at 1280x720 and 832x480.
On one H200 about 4 minutes (start, the expert drawn, 4 steps per size). On 8 GPUs, from the 1-GPU step times
(about 20 s at 720p and 6 s at 480p) and 7 measurements per size whose steps shrink with the world, about
8 minutes: roughly 4 for the 720p steps, 1 for the 480p ones and 3 for starting 4 sets of processes and drawing
the expert in each.

    python benchmarks/parallel_scaling.py                                  # every visible GPU, both sizes
    python benchmarks/parallel_scaling.py --worlds 1 2 --sizes 832*480     # a shorter run
    python benchmarks/parallel_scaling.py --model tiny --device cpu        # CPU check: 1 and 2 gloo processes
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from patches.bench import BENCH_MODELS, TEXT_TOKENS, bench_pipeline  # noqa: E402
from wan_engine.parallel import ParallelPlan, RankGroups, init_job_group  # noqa: E402
from wan_engine.sizes import Size  # noqa: E402

TIMEOUT = datetime.timedelta(seconds=600)   # a cold first step of a real-size model may take minutes
WORLDS = (1, 2, 4, 8)
MODES = ("ulysses", "cfg", "both")
MODE_NAMES = {"single": "1 GPU", "ulysses": "Ulysses only", "cfg": "CFG parallel only", "both": "CFG + Ulysses"}
SIZES = {"t2v-A14B": ("1280*720", "832*480"), "tiny": ("96*48", "64*32")}
BARS = {2: 1.9, 4: 3.6, 8: 6.8}                        # the speed-up bars, with CFG parallel at 2
OFFICIAL_720P = {1: 1041.5, 4: 288.7, 8: 155.1}        # seconds, official T2V-A14B at 720p on H800s


def _official(row: dict, seconds: bool = False) -> str:
    """The official code's published speed-up at this GPU count, for the 720p rows (the anchor is 720p only)."""
    world = row["world"]
    if row["size"] != "1280*720" or world not in OFFICIAL_720P:
        return "—"
    ratio = f"{OFFICIAL_720P[1] / OFFICIAL_720P[world]:.1f}x"
    return f"{ratio} ({OFFICIAL_720P[world]} s)" if seconds else ratio
MAX_REL_ERROR = 2e-2


def world_plans(world: int, heads: int) -> tuple[dict[str, ParallelPlan], dict[str, str]]:
    """The splits one world size can form for a model of `heads` heads: ({mode: plan}, {mode: why not})."""
    if world == 1:
        return {"single": ParallelPlan(1, 1)}, {}
    wanted = {"ulysses": (world, 1), "cfg": (1, 2), "both": (world // 2, 2)}
    plans, skipped = {}, {}
    for mode, (ulysses, cfg) in wanted.items():
        if mode == "cfg" and world != 2:
            skipped[mode] = f"CFG parallel alone spreads over 2 GPUs (one per branch), not {world}"
        elif mode == "both" and (world % 2 or world < 4):
            skipped[mode] = f"two branch halves of 2+ Ulysses ranks need 4+ GPUs (an even count), not {world}"
        elif heads % ulysses:
            skipped[mode] = f"Ulysses degree {ulysses} does not divide the model's {heads} heads"
        else:
            plans[mode] = ParallelPlan(ulysses, cfg)
    return plans, skipped


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _line_up(job, device: torch.device) -> None:
    """Every rank of the job here, its queued work done (so that each rank's clock starts with the others')."""
    _sync(device)
    dist.all_reduce(torch.zeros(1, device=device), group=job.group)
    _sync(device)


def _measure(pipe, job, parallel: ParallelPlan, size: str, args: argparse.Namespace) -> dict:
    """One split of one step at `size` on this rank: the medians and peaks of every rank, rank 0's velocity."""
    device = pipe.device
    ranks = RankGroups.build(job, parallel)
    try:
        plan = pipe.plan(size=Size.parse(size), frame_num=args.frames, seed=0, cfg="sequential")
        if parallel.cfg == 1:   # as a job agrees it: one batch-2 forward when every rank holds its memory
            short = not pipe.batch_cfg(math.ceil(plan.grid.tokens / parallel.ulysses))
            plan = dataclasses.replace(plan, cfg="sequential" if ranks.any(short, device) else "batched")
        gen = torch.Generator(device=device).manual_seed(0)   # the same prompt rows on every rank and world
        context = torch.randn(2, TEXT_TOKENS, 4096, generator=gen, device=device).to(pipe.dtype)
        latents = plan.noise[None]                               # [1, 16, f, h, w]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = []
        with pipe.running(plan):
            for _ in range(1 + args.repeats):
                _line_up(job, device)
                started = time.perf_counter()
                velocity = pipe.predict(plan, 0, latents, context, None, ranks)   # [1, 16, f, h, w]
                _sync(device)
                seconds.append(time.perf_counter() - started)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        mine = torch.tensor([statistics.median(seconds[1:]), seconds[0], peak], device=device, dtype=torch.float64)
        every = [torch.zeros_like(mine) for _ in range(job.size)]
        dist.all_gather(every, mine, group=job.group)
    finally:
        ranks.close()
    every = [t.tolist() for t in every]
    return {"size": size, "tokens": plan.grid.tokens, "cfg_mode": plan.cfg, **parallel.summary(),
            "step_s": max(r[0] for r in every), "rank_s": [r[0] for r in every], "warmup_s": every[0][1],
            "peak_gb": [r[2] / 1e9 for r in every] if device.type == "cuda" else None,
            "velocity": velocity.float().cpu()}


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ["NCCL_NVLS_ENABLE"] = "0"   # NVLink multicast off, as on every lent machine (before NCCL starts)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    else:   # ranks sharing the cores: idle threads spinning beside a collective slow every step down
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=TIMEOUT)
    job = init_job_group(rank, world, store, "nccl" if cuda else "gloo", TIMEOUT)
    try:
        pipe = bench_pipeline(args.model, device, torch.bfloat16 if cuda else torch.float32)
        plans, _ = world_plans(world, pipe.experts["high_noise"].config.num_heads)
        for size in args.sizes:
            for mode, parallel in plans.items():
                row = _measure(pipe, job, parallel, size, args)
                if rank == 0:
                    torch.save({"mode": mode, **row}, Path(out) / f"{size}-{mode}-{world}.pt")
    finally:
        job.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def run(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """Every world size in turn: the rows measured (rank 0's) and the lines saying what was not measured."""
    available = torch.cuda.device_count() if args.device == "cuda" else max(args.worlds)
    heads = BENCH_MODELS[args.model].dit.num_heads
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as out:
        for world in args.worlds:
            if world > available:
                notes.append(f"{world} GPUs: not run, the machine has {available}")
                continue
            plans, skipped = world_plans(world, heads)
            notes += [f"{world} GPUs, {MODE_NAMES[mode]}: not formed ({why})" for mode, why in skipped.items()]
            started = time.perf_counter()
            mp.start_processes(_rank, args=(world, _free_port(), args, out), nprocs=world, start_method="spawn")
            print(f"{world} GPU(s): {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
            for size in args.sizes:
                for mode in plans:
                    rows.append(torch.load(Path(out) / f"{size}-{mode}-{world}.pt"))
    base = {r["size"]: r for r in rows if r["world"] == 1}
    for row in rows:
        ref = base.get(row["size"])
        row["speedup"] = ref["step_s"] / row["step_s"] if ref else None
        row["rel_error"] = _rel_error(row["velocity"], ref["velocity"]) if ref else None
    order = [*args.sizes], ["single", *MODES]
    rows.sort(key=lambda r: (order[0].index(r["size"]), r["world"], order[1].index(r["mode"])))
    return [{k: v for k, v in row.items() if k != "velocity"} for row in rows], notes


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "—" if value is None else format(value, spec) + unit


def _rounded(value):
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return round(value, 6) if isinstance(value, float) else value


def _bar(row: dict) -> float | None:
    """The issue's bar for this row: at 2 GPUs for CFG parallel, at 4 and 8 for any split."""
    return None if row["world"] == 2 and row["mode"] != "cfg" else BARS.get(row["world"])


def _best(rows: list[dict]) -> list[dict]:
    """The fastest split per size and world size (the one a deployment would pick)."""
    best: dict[tuple[str, int], dict] = {}
    for r in rows:
        key = (r["size"], r["world"])
        if r["world"] > 1 and (key not in best or r["step_s"] < best[key]["step_s"]):
            best[key] = r
    return list(best.values())


def print_report(rows: list[dict], notes: list[str], args: argparse.Namespace) -> None:
    for row in rows:
        print(json.dumps({k: _rounded(v) for k, v in row.items()}))
    print(f"\n{args.model}, {args.frames} frames, {args.device}: one denoising step (both guidance branches), "
          f"median of {args.repeats} after a warm-up; speed-up against 1 GPU at the same size")
    print("| size | GPUs | mode | CFG x Ulysses | branches | step s | speed-up | bar | meets | official 720p H800 "
          "| rank s | peak GB per GPU | rel. error vs 1 GPU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        world, bar = r["world"], _bar(r)
        meets = "—" if bar is None or r["speedup"] is None else "yes" if r["speedup"] >= bar else "NO"
        official = _official(r, seconds=True)
        error = _fmt(r["rel_error"], ".1e") if world > 1 else "ref."
        if world > 1 and r["rel_error"] is not None and r["rel_error"] > MAX_REL_ERROR:
            error += f" (over {MAX_REL_ERROR:g})"
        peaks = "—" if r["peak_gb"] is None else " / ".join(f"{p:.1f}" for p in r["peak_gb"])
        print(f"| {r['size']} | {world} | {MODE_NAMES[r['mode']]} | {r['cfg']} x {r['ulysses']} | {r['cfg_mode']} "
              f"| {r['step_s']:.3f} | {_fmt(r['speedup'], '.2f', 'x')} | {_fmt(bar, '.1f', 'x')} | {meets} "
              f"| {official} | {' / '.join(f'{s:.3f}' for s in r['rank_s'])} | {peaks} | {error} |")
    print("\n| size | GPUs | fastest split | speed-up | issue's bar | meets | official 720p H800 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in _best(rows):
        bar, world = BARS.get(r["world"]), r["world"]
        meets = "—" if bar is None or r["speedup"] is None else "yes" if r["speedup"] >= bar else "NO"
        official = _official(r)
        print(f"| {r['size']} | {world} | {MODE_NAMES[r['mode']]} | {_fmt(r['speedup'], '.2f', 'x')} "
              f"| {_fmt(bar, '.1f', 'x')} | {meets} | {official} |")
    for note in notes:
        print(f"- {note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SIZES), default="t2v-A14B")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--worlds", type=int, nargs="+", default=None,
                        help="GPU counts (default: 1, 2, 4, 8 up to the GPUs visible; 1 and 2 on the CPU)")
    parser.add_argument("--sizes", nargs="+", default=None, help="W*H (default: 1280*720 832*480 for A14B)")
    parser.add_argument("--frames", type=int, default=None, help="default: 81 for A14B")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per measurement, after one warm-up")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible (--device cpu runs gloo processes)")
    limit = torch.cuda.device_count() if args.device == "cuda" else 2
    args.worlds = args.worlds or [w for w in WORLDS if w <= limit]
    if any(w < 1 for w in args.worlds):
        parser.error(f"--worlds must be positive GPU counts, got {args.worlds}")
    args.sizes = args.sizes or list(SIZES[args.model])
    args.frames = args.frames or BENCH_MODELS[args.model].frames
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    for size in args.sizes:
        try:
            Size.parse(size)
        except ValueError as exc:
            parser.error(f"--sizes: {exc}")
    if 1 not in args.worlds:
        print("no 1-GPU run among --worlds: no speed-up or error against it", file=sys.stderr)
    rows, notes = run(args)
    print_report(rows, notes, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
