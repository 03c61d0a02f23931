"""`wanflow bench`: the DiT's speed per performance tier on this machine, with random weights.

A real-size DiT (one A14B expert, or TI2V-5B; `tiny` or `tiny-ti2v` for a CPU check) is built on the meta device and
filled with random weights directly on the device, so no checkpoint is needed. For each tier it
reports seconds per forward (median of `repeats`, after a first call) and per denoising step (two
forwards with classifier-free guidance; for a tier with a step cache, a whole sampling loop run
through the cache), the MFU against a bf16 8192^3 GEMM measured here, peak memory, the card's energy
per forward with mean power and SM clock (NVML, patches.power: at the power cap time follows energy),
and for compiled tiers the compile overhead (first call minus a steady forward) cold (fresh inductor
cache) and warm (a second process finding that cache on disk: this module re-runs itself as a
subprocess).

Both compile figures measure compiling alone: before a compiled tier's first timed call, the process
runs one eager forward at the same shape with the quality tier's patches (same attention backend), so
CUDA context, cuBLAS/cuDNN handles and autotuning, lazy initialisation and the attention kernels' JIT
are paid outside the timing, in the parent (cold) as in the child (warm). The table also says how each
compiled tier obtained its code: cold (compiled, artifact saved) in the parent, and in the child the
precompiled artifact loaded, or torch.compile with an FX-cache hit, or cold (see patches.compile).

    wanflow bench --model t2v-A14B --size 832*480 --frames 81 --tiers quality,balanced
    wanflow bench --model ti2v-5B --tiers quality,balanced,speed --step-cache magcache
    python -m patches.bench --model tiny        # or --model tiny-ti2v
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image

from wan_engine import MODEL_SPECS, TINY_PRESETS, Denoiser, ModelSpec
from wan_engine.dit import DiTConfig
from wan_engine.pipeline import MemoryPlan
from wan_engine.sizes import Size
from wan_engine.ti2v import frame_timesteps
from wan_engine.tiny import TINY_DIT, random_dit

from .power import PowerMeter, PowerReading
from .tiers import TIERS, TierOptions, apply_tier, plan_tier

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
TEXT_TOKENS = 120   # a typical prompt; the DiT pads the context to 512 rows either way
TIMESTEP = 900


@dataclass(frozen=True)
class BenchModel:
    dit: DiTConfig
    spec: ModelSpec
    size: tuple[int, int]   # default (W, H)
    frames: int             # default frame count


BENCH_MODELS = {
    "t2v-A14B": BenchModel(DiTConfig("t2v", 16, 16, 5120, 13824, 40, 40), MODEL_SPECS["t2v-A14B"], (832, 480), 81),
    "i2v-A14B": BenchModel(DiTConfig("i2v", 36, 16, 5120, 13824, 40, 40), MODEL_SPECS["i2v-A14B"], (832, 480), 81),
    "ti2v-5B": BenchModel(DiTConfig("ti2v", 48, 48, 3072, 14336, 24, 30), MODEL_SPECS["ti2v-5B"], (1280, 704), 121),
    "tiny": BenchModel(DiTConfig(model_type="t2v", in_dim=16, out_dim=16, **TINY_DIT), MODEL_SPECS["tiny"],
                       (64, 64), 5),
    "tiny-ti2v": BenchModel(DiTConfig(model_type="ti2v", in_dim=48, out_dim=48, **TINY_DIT),
                            MODEL_SPECS["tiny-ti2v"], (64, 64), 5),
}


@dataclass
class BenchRow:
    tier: str
    forward_s: float              # median seconds of one forward (a computed model call)
    step_s: float                 # seconds per denoising step as a run makes it: one batch-2 forward or two
                                  # forwards (classifier-free guidance); with a step cache, the loop's average
    tflops: float                 # achieved TFLOP/s of a forward
    mfu: float                    # tflops / the measured GEMM rate
    peak_gb: float | None         # peak device memory (None on a CPU)
    compile_cold_s: float | None  # first call minus a steady forward, fresh inductor cache
    compile_warm_s: float | None  # the same in a second process that finds the cache on disk
    calls: str                    # model calls computed / made in the sampling loop ("" without a step cache)
    applied: list[dict] = field(default_factory=list)
    compile_cold_path: str | None = None  # how the compiled code came in the cold process (CompileHandle.warm_start)
    compile_warm_path: str | None = None  # the same in the second process: "precompiled artifact loaded", ...
    joules_per_forward: float | None = None  # the card's energy per steady forward (NVML; None where unmeasured)
    watts: float | None = None               # its mean power over those forwards
    sm_mhz: float | None = None              # mean SM clock over them
    power_capped: float | None = None        # fraction of that time the power cap held the clock down


# ---------------------------------------------------------------- building and timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def measure_gemm_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul: 8192^3 in bf16 on a GPU (its practical peak), 1024^3 on a CPU."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    iters = 20 if device.type == "cuda" else 5
    seconds = timed(lambda: [a @ b for _ in range(iters)], device)
    return 2 * n**3 * iters / seconds


def bench_pipeline(model: str, device: torch.device, dtype: torch.dtype, experts: int = 1) -> Denoiser:
    """The engine's denoiser over random DiT experts (no text encoder or VAE: the bench feeds it random
    text contexts). With experts=1 an A14B denoiser holds one DiT under both expert names."""
    bm = BENCH_MODELS[model]
    if bm.spec.is_moe:
        high = random_dit(bm.dit, device, dtype, seed=1)
        low = random_dit(bm.dit, device, dtype, seed=2) if experts > 1 else high
        dits = {"high_noise": high, "low_noise": low}
    else:
        dits = {"model": random_dit(bm.dit, device, dtype)}
    return Denoiser(bm.spec, dits, device, dtype, MemoryPlan(True, True))


def dit_inputs(pipe: Denoiser, size: tuple[int, int], frames: int, steps: int | None = None) -> dict:
    """Random inputs of one branch at the run's shape, from the engine's plan of that run (TI2V: text+image mode,
    one timestep per latent frame, frame 0 clean), and the random text and conditioning a sampling loop reads
    (TI2V: an image of the run's size, whose latent `first` stands for the VAE's)."""
    cfg = next(iter(pipe.experts.values())).config
    plan = pipe.plan(size=size, frame_num=frames, steps=steps, seed=0)
    gen = torch.Generator(device=pipe.device).manual_seed(0)
    grid, tokens = plan.grid.shape, plan.grid.tokens
    extra = cfg.in_dim - pipe.spec.z_dim
    y = torch.randn(1, extra, *grid, generator=gen, device=pipe.device) if extra else None   # [1, C_y, f, h, w]
    t = torch.full((1,), TIMESTEP, device=pipe.device)
    if cfg.model_type == "ti2v":   # text+image mode: the first latent frame is the image's, at timestep 0
        t = frame_timesteps(t, grid[0])   # [1, f], as the engine's loop passes it
    context = torch.randn(1, TEXT_TOKENS, cfg.text_dim, generator=gen, device=pipe.device).to(pipe.dtype)
    image = first = None
    if cfg.model_type == "ti2v":   # an image of the run's size is fitted to that size: the same grid
        image = Image.new("RGB", tuple(size))
        first = torch.randn(1, pipe.spec.z_dim, 1, *grid[1:], generator=gen, device=pipe.device)   # [1, z, 1, h, w]
    return dict(x=plan.noise[None], t=t, context=context, y=y, tokens=tokens, size=size, frames=frames,
                image=image, first=first)


def both_branches(inputs: dict) -> dict:
    """The batch-2 inputs of a step that runs cond and uncond as one forward (rows cond, uncond)."""
    def two(t):
        return None if t is None else torch.cat([t, t])

    context = torch.cat([inputs["context"], inputs["context"].flip(1)])  # [2, Lc, text_dim]: a second prompt
    return dict(inputs, x=two(inputs["x"]), t=two(inputs["t"]), context=context, y=two(inputs["y"]))


@torch.no_grad()
def sampling_loop(pipe: Denoiser, inputs: dict, steps: int | None, batched: bool) -> float:
    """The engine's own sampling loop over a plan of the run (the tier's hooks see every call, as in a
    real run), with random text contexts. Returns seconds per step."""
    plan = pipe.plan(image=inputs["image"], size=inputs["size"], frame_num=inputs["frames"], steps=steps, seed=0,
                     cfg="batched" if batched else "sequential")
    context = both_branches(inputs)["context"]   # [2, Lc, text_dim]: rows cond, uncond
    y = inputs["y"] if inputs["first"] is None else inputs["first"]
    return timed(lambda: pipe.sample(plan, context, y), pipe.device) / plan.steps.steps


@contextmanager
def inductor_cache(directory: Path) -> Iterator[None]:
    """Compile into `directory` (a fresh one measures a cold compile), then restore the environment."""
    names = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
    old = {n: os.environ.get(n) for n in names}
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)
    os.environ["TRITON_CACHE_DIR"] = str(directory / "triton")
    torch.compiler.reset()
    try:
        yield
    finally:
        torch.compiler.reset()
        for n, v in old.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


def _measure_tier(pipe: Denoiser, tier: str, inputs: dict, repeats: int, options: TierOptions,
                  steps: int | None, per_step: bool = True) -> dict:
    """First call and steady batch-1 forwards of one tier; with `per_step` also a denoising step as
    the run makes it (one batch-2 forward or two forwards; with a step cache the whole sampling loop)
    and peak memory. A compiled tier's first call follows one eager forward of the quality tier at the
    same shape, so that it measures the compile and not the process's warm-up."""
    device = pipe.device
    dit = next(iter(pipe.experts.values()))   # the high-noise expert of an A14B pair: TIMESTEP is in its range

    def forward(a: dict = inputs) -> None:
        with torch.no_grad():
            dit(a["x"], a["t"], a["context"], y=a["y"])

    compiled = _compiles(tier, device, options)
    if compiled:
        with apply_tier(pipe, "quality", options):
            forward()
    handle = apply_tier(pipe, tier, options, steps=steps)
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

        first = timed(forward, device)
        compile_handle = next((h for h in handle.handles if getattr(h, "name", None) == "compile"), None)
        compile_path = getattr(compile_handle, "warm_start", None)
        with PowerMeter(device) as meter:
            times = [timed(forward, device) for _ in range(max(repeats, 1))]
        forward_s = statistics.median(times)
        step_s, calls = 2 * forward_s, ""
        batched = pipe.batch_cfg(inputs["tokens"])
        pair = both_branches(inputs) if per_step and batched else None
        if pair is not None:
            forward(pair)  # a new shape: compiled tiers compile it here, outside the timing
        if per_step and handle.step_cache is not None:
            step_s = sampling_loop(pipe, inputs, steps, batched)
            records = handle.step_cache.calls
            calls = f"{sum(r.computed for r in records)}/{len(records)}"
        elif pair is not None:
            step_s = statistics.median(timed(lambda: forward(pair), device) for _ in range(max(repeats, 1)))
        peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
        return dict(first=first, forward_s=forward_s, step_s=step_s, calls=calls, peak_gb=peak,
                    applied=handle.summary()["patches"], compile_path=compile_path,
                    power=meter.reading, forwards=len(times))
    finally:
        handle.remove()


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dtype_for(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _compiles(tier: str, device: torch.device, options: TierOptions) -> bool:
    return any(p.name == "compile" and p.on for p in plan_tier(tier, device, options=options))


def power_fields(reading: PowerReading, forwards: int) -> dict:
    return dict(joules_per_forward=reading.joules / forwards, watts=reading.watts, sm_mhz=reading.sm_mhz,
                power_capped=reading.power_capped)


# ---------------------------------------------------------------- the bench
def run_bench(model: str = "t2v-A14B", size: tuple[int, int] | None = None, frames: int | None = None,
              tiers: tuple[str, ...] = ("quality", "balanced"), repeats: int = 3, *,
              device: str | torch.device | None = None, options: TierOptions | None = None, steps: int | None = None,
              experts: int = 1, warm: bool = True) -> tuple[dict, list[BenchRow]]:
    """Measure each tier; returns (run facts, one row per tier). `steps` sets the sampling loop of tiers
    with a step cache (None: the model's default); `experts=2` holds both A14B experts (peak memory of a
    real run); `warm=False` skips the second-process compile measurement."""
    bm = BENCH_MODELS[model]
    size, frames = size or bm.size, frames or bm.frames
    device = torch.device(device) if device is not None else _default_device()
    dtype = _dtype_for(device)
    options = options or TierOptions()
    for tier in tiers:
        if tier not in TIERS:
            raise ValueError(f"unknown tier {tier!r}; choose from {TIERS}")

    gemm = measure_gemm_rate(device, dtype)
    pipe = bench_pipeline(model, device, dtype, experts)
    inputs = dit_inputs(pipe, size, frames)
    flops = bm.dit.flops_per_forward(inputs["tokens"])
    facts = dict(model=model, size=list(size), frames=frames, tokens=inputs["tokens"], flops=flops,
                 gemm_tflops=gemm / 1e12, device=_device_name(device), dtype=str(dtype).removeprefix("torch."),
                 torch=torch.__version__)
    cache_root = Path(tempfile.mkdtemp(prefix="wanflow-bench-"))
    rows, cold_dirs = [], {}
    try:
        for tier in tiers:
            compiled = _compiles(tier, device, options)
            log.info("bench: %s tier%s", tier, " (cold compile)" if compiled else "")
            if compiled:
                cold_dirs[tier] = cache_root / tier
                with inductor_cache(cold_dirs[tier]):
                    m = _measure_tier(pipe, tier, inputs, repeats, options, steps)
            else:
                m = _measure_tier(pipe, tier, inputs, repeats, options, steps)
            tflops = flops / m["forward_s"] / 1e12
            power = m["power"]
            rows.append(BenchRow(tier, m["forward_s"], m["step_s"], tflops, tflops * 1e12 / gemm, m["peak_gb"],
                                 m["first"] - m["forward_s"] if compiled else None, None, m["calls"], m["applied"],
                                 compile_cold_path=m["compile_path"] if compiled else None,
                                 **(power_fields(power, m["forwards"]) if power else {})))
        del pipe, inputs   # the second process needs the device memory
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if warm:
            for row in rows:
                if row.tier in cold_dirs:
                    child = _child_measurement(model, size, frames, row.tier, device, options, cold_dirs[row.tier])
                    row.compile_warm_s = child["first"] - child["forward_s"]
                    row.compile_warm_path = child["compile_path"]
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)
    return facts, rows


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return f"CPU ({os.cpu_count()} cores)"


def _child_measurement(model: str, size: tuple[int, int], frames: int, tier: str, device: torch.device,
                       options: TierOptions, cache_dir: Path) -> dict:
    """First call, a steady forward and how the compiled code came, of `tier` in a new process that finds
    `cache_dir` on disk."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache_dir), TRITON_CACHE_DIR=str(cache_dir / "triton"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "patches.bench", "--child", "--model", model, "--size", f"{size[0]}*{size[1]}",
           "--frames", str(frames), "--tiers", tier, "--device", str(device), "--attention", options.attention,
           "--compile-backend", options.compile_backend]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the warm-compile process failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child(args: argparse.Namespace) -> int:
    """Runs in the subprocess: print {"first", "forward_s", "compile_path"} of one tier as one JSON line."""
    device = torch.device(args.device)
    pipe = bench_pipeline(args.model, device, _dtype_for(device))
    inputs = dit_inputs(pipe, Size.parse(args.size), args.frames)
    options = TierOptions(attention=args.attention, compile_backend=args.compile_backend)
    m = _measure_tier(pipe, args.tiers.split(",")[0], inputs, 1, options, None, per_step=False)
    log.info("bench child: %s tier's compiled code: %s", args.tiers, m["compile_path"])
    print(json.dumps({"first": m["first"], "forward_s": m["forward_s"], "compile_path": m["compile_path"]}))
    return 0


# ---------------------------------------------------------------- command line
def format_table(facts: dict, rows: list[BenchRow]) -> str:
    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    w, h = facts["size"]
    lines = [
        f"{facts['device']}, torch {facts['torch']}, {facts['dtype']}",
        f"{facts['model']} DiT (random weights), {w}x{h}, {facts['frames']} frames: {facts['tokens']:,} tokens, "
        f"{facts['flops'] / 1e12:,.4g} TFLOP per forward; measured GEMM rate {facts['gemm_tflops']:,.4g} TFLOP/s",
        "",
        f"{'tier':<9} {'s/forward':>10} {'s/step':>9} {'TFLOP/s':>8} {'MFU':>6} {'peak GB':>8} "
        f"{'compile cold s':>15} {'compile warm s':>15} {'calls':>8} {'J/forward':>10} {'W':>5} {'SM MHz':>7} "
        f"{'capped':>7}",
    ]
    for r in rows:
        lines.append(f"{r.tier:<9} {r.forward_s:>10.4f} {r.step_s:>9.4f} {r.tflops:>8.3g} {r.mfu:>6.1%} "
                     f"{num(r.peak_gb, '.1f'):>8} {num(r.compile_cold_s, '.2f'):>15} "
                     f"{num(r.compile_warm_s, '.2f'):>15} {r.calls or 'all':>8} {num(r.joules_per_forward, '.0f'):>10} "
                     f"{num(r.watts, '.0f'):>5} {num(r.sm_mhz, '.0f'):>7} {num(r.power_capped, '.0%'):>7}")
    lines.append("")
    for r in rows:
        on = [f"{p['name']} ({p['detail']})" for p in r.applied if p["on"] and p["name"] != "resident"]
        lines.append(f"{r.tier}: " + ("; ".join(on) or "nothing applied"))
    if any(r.power_capped for r in rows):
        lines += ["", "capped: share of the timed forwards during which the card's power limit held its SM clock "
                      "down; at the cap, time follows energy (J/forward)"]
    compiled = [r for r in rows if r.compile_cold_s is not None]
    if compiled:
        lines += ["", "compile s: first call minus a steady forward, after one eager forward at the same shape in "
                      "that process (its CUDA/cuBLAS/cuDNN warm-up is not counted); warm: a new process"]
        lines += [f"{r.tier} compiled code: cold process {r.compile_cold_path}; "
                  f"new process {r.compile_warm_path or '-'}" for r in compiled]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench's options, for `wanflow bench` (flows/cli.py) and `python -m patches.bench`."""
    parser.add_argument("--model", choices=sorted(BENCH_MODELS), default="t2v-A14B")
    parser.add_argument("--size", help="W*H (default: the model's usual size)")
    parser.add_argument("--frames", type=int, help="video frames, 4k+1 (default: the model's usual count)")
    parser.add_argument("--tiers", default="quality,balanced", help=f"comma-separated, from {','.join(TIERS)}")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per tier (median)")
    parser.add_argument("--steps", type=int, help="sampling steps of a step-cached tier's loop (default: the model's)")
    parser.add_argument("--experts", type=int, choices=(1, 2), default=1,
                        help="A14B experts held (2: the peak memory of a real run)")
    parser.add_argument("--no-warm", action="store_true", help="skip the second-process compile measurement")
    parser.add_argument("--device", help="cuda, cuda:1, cpu (default: the first GPU, else the CPU)")
    parser.add_argument("--attention", choices=("auto", "sdpa", "fa4"), default="auto")
    parser.add_argument("--compile-backend", default="inductor", help=argparse.SUPPRESS)
    parser.add_argument("--step-cache", choices=("teacache", "magcache"), default="teacache")
    parser.add_argument("--threshold", type=float, help="the speed tier's cache threshold")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)


def refusal(model: str, device: torch.device) -> str | None:
    """Why the bench cannot run `model` on `device`, said before any memory is taken; None when it can."""
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"--device {device}: no CUDA GPU here; for a CPU check run `wanflow bench --model tiny --device cpu`"
    if device.type != "cuda" and model not in TINY_PRESETS:
        return (f"--model {model}: the real-size DiT needs a CUDA GPU (on {device.type} its random weights alone "
                f"take tens of GB and one forward minutes); for a CPU check run `wanflow bench --model tiny`")
    return None


def run_from_args(args: argparse.Namespace) -> int:
    if args.child:
        return _child(args)
    try:
        device = torch.device(args.device) if args.device else _default_device()
    except RuntimeError:
        print(f"bench: --device {args.device!r} is not a device; use cuda, cuda:1 or cpu", file=sys.stderr)
        return 2
    problem = refusal(args.model, device)
    if problem:
        print(f"bench: {problem}", file=sys.stderr)
        return 2
    options = TierOptions(step_cache=args.step_cache, threshold=args.threshold, attention=args.attention,
                          compile_backend=args.compile_backend)
    size = Size.parse(args.size) if args.size else None
    facts, rows = run_bench(args.model, size, args.frames, tuple(args.tiers.split(",")), args.repeats,
                            device=device, options=options, steps=args.steps, experts=args.experts,
                            warm=not args.no_warm)
    print(format_table(facts, rows))
    if args.json:
        args.json.write_text(json.dumps(dict(facts, rows=[asdict(r) for r in rows]), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wanflow bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
