"""Wan 2.1 VAE decode of 81 frames: ours (float32 and the bfloat16 fast path) against the official code.

Real-size random weights (base width 96, the oracle's `synth_state_dict` recipe) are loaded into both
the official `WanVAE_` and our `WanVAE21`; both decode the same random latent [1, 16, 21, H/8, W/8].
The official model runs as its pipelines run it: `WanVAE_.decode` with its scale under float32
autocast (what `Wan2_1_VAE.decode` does), then clamped to [-1, 1]; cuDNN flags left at their
defaults (TF32 allowed, no autotuning). Each decoder is on the GPU only while it is measured, so the
peak memory is its own weights plus its working memory. Prints the median of the timed decodes after
one warm-up, the peak memory and the relative error of every variant against the official video.

    python benchmarks/vae_vs_official.py --sizes 832*480,1280*720 --json out.json

Needs a CUDA GPU and the oracle package (wan22 2.2.11 + diffusers 0.42.1, see tests/oracle);
`--smoke` runs a tiny width on the CPU to check the script itself.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "oracle"))

from wan_engine.sizes import Size  # noqa: E402
from wan_engine.vae import DEFAULT_DECODE_CHUNK_BYTES, LATENT_MEAN, LATENT_STD, WanVAE21  # noqa: E402

log = logging.getLogger("vae_vs_official")
OFFICIAL_CFG = dict(z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                    temperal_downsample=[False, True, True], dropout=0.0)


@dataclass(frozen=True)
class Variant:
    name: str
    dtype: torch.dtype | None = None       # ours: decode(z, dtype=...); None = float32
    chunk_gib: float | None = None         # ours: decode_chunk_bytes; None = the default
    cudnn_benchmark: bool = False


VARIANTS = {
    "fp32": Variant("ours fp32"),
    "bf16": Variant("ours bf16", torch.bfloat16),
    "bf16-bench": Variant("ours bf16 + cudnn.benchmark", torch.bfloat16, cudnn_benchmark=True),
    "bf16-1frame": Variant("ours bf16, 1 latent frame/chunk", torch.bfloat16, chunk_gib=0),
    "bf16-32g": Variant("ours bf16, 32 GiB chunks", torch.bfloat16, chunk_gib=32),
    "fp16": Variant("ours fp16", torch.float16),
    "fp32-bench": Variant("ours fp32 + cudnn.benchmark", cudnn_benchmark=True),
}


def timed(fn, repeats: int, cuda: bool) -> tuple[float, list[float], torch.Tensor]:
    """(warm-up seconds, timed seconds, last output); the warm-up includes any autotuning."""
    times = []
    out = None
    for _ in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times[0], times[1:], out


def measure(name: str, model: torch.nn.Module, fn, dev: torch.device, repeats: int) -> dict:
    cuda = dev.type == "cuda"
    model.to(dev)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        with torch.no_grad():
            warm, times, out = timed(fn, repeats, cuda)
        peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan")
        result = dict(name=name, seconds=statistics.median(times), all=times, warmup=warm, peak_gb=peak,
                      out=out.float().cpu())
    except torch.OutOfMemoryError as e:  # a variant too big for this card is reported, not fatal
        log.warning("%s: out of memory (%s)", name, str(e).splitlines()[0])
        result = dict(name=name, seconds=float("nan"), peak_gb=float("nan"), out=None)
    model.to("cpu")
    log.info("%s: %.3f s (warm-up %.2f s), peak %.1f GB", name, result["seconds"], result.get("warmup", 0.0),
             result["peak_gb"])
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="832*480,1280*720", help="comma-separated W*H")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default="fp32,bf16,bf16-bench,bf16-1frame,bf16-32g,fp16",
                    help=f"our variants to measure at every size, comma-separated, of {','.join(VARIANTS)}")
    ap.add_argument("--json", default=None, help="write the results here too")
    ap.add_argument("--profile", action="store_true", help="print the top kernels of one bf16 decode per size")
    ap.add_argument("--smoke", action="store_true", help="tiny width on the CPU, to check the script itself")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dev = torch.device("cpu" if args.smoke else "cuda")
    dim = 4 if args.smoke else 96

    from make_fixture import synth_state_dict
    from official import load_official

    W = load_official()
    with torch.device("meta"):
        official = W.WanVAE21_(dim=dim, **OFFICIAL_CFG)
        ours = WanVAE21(dim=dim)
    sd = synth_state_dict([[k, list(v.shape)] for k, v in ours.state_dict().items()], seed=0)
    official.load_state_dict(sd, assign=True, strict=True)
    ours.load_state_dict(sd, assign=True, strict=True)
    official.eval().requires_grad_(False)
    ours.eval().requires_grad_(False)
    mean = torch.tensor(LATENT_MEAN, device=dev)
    scale = [mean, 1.0 / torch.tensor(LATENT_STD, device=dev)]

    card = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (smoke)"
    default_variants = args.variants.split(",")
    report = dict(card=card, torch=torch.__version__, frames=args.frames, sizes={})
    for size in args.sizes.split(","):
        w, h = Size.parse(size)
        if args.smoke:
            w, h = w // 16, h // 16
        lat = (1, 16, (args.frames - 1) // 4 + 1, h // 8, w // 8)
        z = torch.randn(lat, generator=torch.Generator().manual_seed(0)).to(dev)  # [1, 16, f, h/8, w/8]

        def run_official(z=z):
            with torch.autocast(dev.type, dtype=torch.float32, enabled=dev.type == "cuda"):
                return official.decode(z, scale).float().clamp_(-1, 1)

        torch.backends.cudnn.benchmark = False
        results = [measure("official (fp32 autocast)", official, run_official, dev, args.repeats)]
        ref = results[0]["out"]
        for key in default_variants:
            v = VARIANTS[key]
            ours.decode_chunk_bytes = DEFAULT_DECODE_CHUNK_BYTES if v.chunk_gib is None else int(v.chunk_gib * 2**30)
            torch.backends.cudnn.benchmark = v.cudnn_benchmark
            r = measure(v.name, ours, lambda v=v, z=z: ours.decode(z, dtype=v.dtype), dev, args.repeats)
            r["frames_per_chunk"] = min(lat[2] - 1, ours.decode_frames_per_chunk(lat[3], lat[4]))
            results.append(r)
        torch.backends.cudnn.benchmark = False
        if args.profile:
            ours.decode_chunk_bytes = DEFAULT_DECODE_CHUNK_BYTES
            ours.to(dev)
            with torch.no_grad(), torch.profiler.profile() as prof:
                ours.decode(z, dtype=torch.bfloat16)
            ours.to("cpu")
            sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60))
        for r in results:
            out = r.pop("out")
            r["rel_err"] = float("nan") if out is None else ((out - ref).norm() / ref.norm()).item()
        report["sizes"][f"{w}x{h}"] = results

        base = results[0]["seconds"]
        print(f"\n{card}, torch {torch.__version__}, {w}x{h}, {args.frames} frames (latent {list(lat)})")
        print(f"{'decoder':<34} {'median s':>9} {'x official':>10} {'peak GB':>8} {'rel err':>9} {'chunk':>6}")
        for r in results:
            print(f"{r['name']:<34} {r['seconds']:9.3f} {r['seconds'] / base:10.3f} {r['peak_gb']:8.1f} "
                  f"{r['rel_err']:9.2e} {r.get('frames_per_chunk', 1):>6}")
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
