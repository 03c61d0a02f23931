"""One job on 1, 2, 4 and 8 devices: seconds per denoising step of the engine's loop, split by `wan_engine.parallel`.

For each world size asked for, the script starts that many processes (one per GPU, NCCL; or gloo on the CPU),
forms a job group, builds the same random-weight denoiser on every rank (`patches.bench.bench_pipeline`: real
A14B sizes, one DiT under both expert names), plans the run with `choose_parallel_plan` (CFG halves when
guided, the rest Ulysses; --no-cfg-parallel: Ulysses only) and times `Denoiser.sample` over `--steps` steps
after one warm-up step. Rank 0 reports the step time, every rank's denoise seconds and the final latents'
relative difference from the first world size's run (a split changes only roundings). Issue 13 measures it on
2, 4 and 8 H200s; this is the harness.

    python benchmarks/parallel_scaling.py --worlds 1 2 4 8 --size 832*480 --frames 81 --steps 4
    python benchmarks/parallel_scaling.py --model tiny --device cpu --worlds 1 2 --size 48*48 --frames 9
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
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
from wan_engine.parallel import RankGroups, choose_parallel_plan, init_job_group  # noqa: E402
from wan_engine.sizes import Size  # noqa: E402

TIMEOUT = datetime.timedelta(seconds=600)   # a cold first step of a real-size model may compile for minutes


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    else:   # ranks sharing the cores: idle threads spinning beside a collective slow every step down
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=TIMEOUT)
    job = init_job_group(rank, world, store, "nccl" if cuda else "gloo", TIMEOUT)
    try:
        dtype = torch.bfloat16 if cuda else torch.float32
        pipe = bench_pipeline(args.model, device, dtype)
        cfg_mode = "none" if args.guide_scale == 1.0 else "sequential"
        heads = pipe.experts["high_noise"].config.num_heads
        parallel = (choose_parallel_plan(world, heads, cfg_mode) if args.cfg_parallel
                    else choose_parallel_plan(world, heads, "none"))   # Ulysses over every rank
        if parallel.cfg == 1 and cfg_mode != "none":
            cfg_mode = "batched"
        plan = pipe.plan(size=Size.parse(args.size), frame_num=args.frames, steps=args.steps,
                         guide_scale=args.guide_scale, seed=0, cfg=cfg_mode)
        gen = torch.Generator(device=device).manual_seed(0)   # the same random prompt rows on every rank
        context = torch.randn(len(plan.branches), TEXT_TOKENS, 4096, generator=gen, device=device).to(dtype)
        ranks = RankGroups.build(job, parallel)
        with pipe.running(plan):   # warm-up: one step's forwards (kernels chosen, memory pools grown)
            pipe.predict(plan, 0, plan.noise[None], context, None, ranks)
        started = time.perf_counter()
        sampled = pipe.sample(plan, context, None, ranks=ranks)
        seconds = time.perf_counter() - started
        per_rank = torch.tensor([seconds], device=device, dtype=torch.float64)
        gathered = [torch.zeros_like(per_rank) for _ in range(world)]
        dist.all_gather(gathered, per_rank, group=job.group)
        if rank == 0:
            torch.save({"plan": parallel.summary(), "tokens": plan.grid.tokens, "step_s": seconds / plan.steps.steps,
                        "rank_seconds": [t.item() for t in gathered], "latents": sampled.latents.float().cpu()},
                       Path(out) / f"world{world}.pt")
    finally:
        job.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(BENCH_MODELS), default="t2v-A14B")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--size", default="832*480")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--guide-scale", type=float, default=4.0)
    parser.add_argument("--cfg-parallel", action=argparse.BooleanOptionalAction, default=True,
                        help="split the guidance branches over two halves (--no-cfg-parallel: Ulysses only)")
    args = parser.parse_args(argv)
    available = torch.cuda.device_count() if args.device == "cuda" else max(args.worlds)
    rows, base = [], None
    with tempfile.TemporaryDirectory() as out:
        for world in args.worlds:
            if world > available:
                print(f"skipping {world} ranks: {available} devices", file=sys.stderr)
                continue
            mp.start_processes(_rank, args=(world, _free_port(), args, out), nprocs=world, start_method="spawn")
            run = torch.load(Path(out) / f"world{world}.pt")
            base = base or run
            diff = ((run["latents"] - base["latents"]).norm() / base["latents"].norm()).item()
            rows.append({**run["plan"], "tokens": run["tokens"], "step_s": round(run["step_s"], 4),
                         "speedup": round(base["step_s"] / run["step_s"], 3),
                         "rank_seconds": [round(s, 3) for s in run["rank_seconds"]], "rel_diff_vs_first": diff})
    for row in rows:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
