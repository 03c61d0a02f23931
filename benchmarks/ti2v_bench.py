"""TI2V-5B against the official code on one card: the real-size DiT forward and the Wan 2.2 VAE decode.

1. DiT: random bf16 weights of the real TI2V-5B (3072 wide, 30 blocks, 48 channels), shared by both models,
   at 1280x704 and 121 frames in text+image mode (latent frame 0 at t = 0). The official `WanModel` runs as
   its pipeline does (bf16 weights under bf16 autocast, per-token timesteps [1, L], its flash_attention
   replaced by torch SDPA on bf16 q/k/v since no flash_attn wheel is there); ours takes one timestep row per
   latent frame. Relative error of ours against the official output, both times, the ratio (target <= 0.75).
2. VAE: a random real-size Wan 2.2 VAE (encoder 160, decoder 256, fp32 weights) decoding 121 frames at
   1280x704: the official decode (fp32, one latent frame per chunk) against ours in fp32 and in bf16
   (target <= 0.5x).
The 50-step run's seconds per step and the quality and speed tiers come from `wanflow bench --model ti2v-5B`.

    python benchmarks/ti2v_bench.py [--wheels DIR] [--json out.json]
    python benchmarks/ti2v_bench.py --smoke            # toy widths on the CPU, to check the script itself

The official package is not part of the project: the script imports it from the oracle venv's site-packages
when present, else installs the wheels of `--wheels DIR` (made with `pip download --no-deps
--only-binary=:all: -d DIR wan22==2.2.11 diffusers==0.42.1 easydict ftfy wcwidth importlib_metadata`) into a
temporary folder, and says so and stops when neither is there.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch._dynamo  # noqa: F401  bind the real torch.cuda.current_device before load_official() patches it

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "oracle"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from wan_engine.dit import DiTConfig  # noqa: E402
from wan_engine.tiny import random_dit, randomise_  # noqa: E402
from wan_engine.vae22 import LATENT_MEAN, LATENT_STD, WanVAE22  # noqa: E402

TI2V_5B = dict(model_type="ti2v", in_dim=48, out_dim=48, dim=3072, ffn_dim=14336, num_heads=24, num_layers=30)
SMOKE_DIT = dict(TI2V_5B, dim=128, ffn_dim=256, num_heads=2, num_layers=2)
TIMESTEP = 900


def ensure_official(wheels: str | None) -> None:
    """Make `wan` importable: already there, or installed from the wheel folder into a temporary target."""
    if importlib.util.find_spec("wan") is not None:
        return
    if not wheels or not list(Path(wheels).glob("*.whl")):
        sys.exit("the official package (wan22 2.2.11) is absent: pass --wheels DIR with its wheels "
                 "(see this script's docstring); nothing was measured")
    target = tempfile.mkdtemp(prefix="ti2v-official-")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target,
                    *map(str, Path(wheels).glob("*.whl"))], check=True)
    sys.path.insert(1, target)


def timed(fn, repeats: int, dev: torch.device) -> tuple[float, float, torch.Tensor]:
    """(first-call seconds, median seconds of the later calls, output)."""
    times, out = [], None
    for _ in range(repeats + 1):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times[0], statistics.median(times[1:]), out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def bench_dit(W, dev: torch.device, arch: dict, size: tuple[int, int], frames: int, repeats: int) -> dict:
    from dit_vs_official import _rebuild_freqs, sdpa_attention

    W.m_model.flash_attention = sdpa_attention
    wdtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    with torch.device("meta"):
        official = W.WanModel(**arch)
    ours = random_dit(DiTConfig(**arch), dev, wdtype)
    official.load_state_dict(ours.state_dict(), assign=True, strict=True)   # the same tensors
    _rebuild_freqs(W, official, dev)
    official.eval().requires_grad_(False)
    gen = torch.Generator(device=dev).manual_seed(1)
    w, h = size
    lat = (48, (frames - 1) // 4 + 1, h // 16, w // 16)
    tokens = lat[1] * lat[2] * lat[3] // 4
    x = torch.randn(lat, generator=gen, device=dev)
    ctx = torch.randn(120, 4096, generator=gen, device=dev).to(wdtype)
    per_token = torch.full((1, tokens), float(TIMESTEP), device=dev)
    per_token[:, : tokens // lat[1]] = 0   # the image's latent frame
    per_frame = torch.full((1, lat[1]), TIMESTEP, device=dev)
    per_frame[:, 0] = 0

    def run_official():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            return official([x], t=per_token, context=[ctx], seq_len=tokens)[0]

    first_o, med_o, out_o = timed(run_official, repeats, dev)
    out_o = out_o.float()
    first_u, med_u, out_u = timed(lambda: ours(x[None], per_frame, ctx[None])[0], repeats, dev)
    return dict(size=list(size), frames=frames, tokens=tokens, official_s=med_o, official_first_s=first_o,
                ours_s=med_u, ours_first_s=first_u, ratio=med_u / med_o, rel_err=rel_err(out_u, out_o))


def bench_vae(W, dev: torch.device, dims: tuple[int, int], size: tuple[int, int], frames: int,
              repeats: int) -> dict:
    with torch.device("meta"):
        ours = WanVAE22(*dims)
    sd = {k: v.to(dev) for k, v in randomise_(WanVAE22(*dims), 7).state_dict().items()}
    ours.load_state_dict(sd, assign=True, strict=True)
    with torch.device("meta"):
        official = W.WanVAE22_(dim=dims[0], dec_dim=dims[1], z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                               attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0)
    official.load_state_dict(sd, assign=True, strict=True)
    ours.eval().requires_grad_(False)
    official.eval().requires_grad_(False)
    scale = [torch.tensor(LATENT_MEAN, device=dev), 1.0 / torch.tensor(LATENT_STD, device=dev)]
    w, h = size
    z = torch.randn(1, 48, (frames - 1) // 4 + 1, h // 16, w // 16, generator=torch.Generator().manual_seed(0)).to(dev)

    def run_official():
        with torch.autocast(dev.type, dtype=torch.float32, enabled=dev.type == "cuda"):
            return official.decode(z, scale).float().clamp_(-1, 1)

    res = {}
    _, res["official_s"], ref = timed(run_official, repeats, dev)
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        _, seconds, out = timed(lambda dtype=dtype: ours.decode(z, dtype=dtype), repeats, dev)
        res[f"ours_{name}_s"], res[f"ours_{name}_ratio"] = seconds, seconds / res["official_s"]
        res[f"ours_{name}_rel_err"] = rel_err(out.float(), ref)
    return dict(size=list(size), frames=frames, **res)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1280*704", help="W*H")
    ap.add_argument("--frames", type=int, default=121)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--parts", default="dit,vae", help="comma-separated subset of dit, vae")
    ap.add_argument("--wheels", default=None, help="folder with the official package's wheels")
    ap.add_argument("--json", default=None, help="write the results here too")
    ap.add_argument("--smoke", action="store_true", help="toy widths and size on the CPU")
    args = ap.parse_args()
    ensure_official(args.wheels)
    from official import load_official

    W = load_official()
    dev = torch.device("cpu" if args.smoke else "cuda")
    w, h = (int(v) for v in args.size.split("*"))
    frames, repeats = args.frames, args.repeats
    arch, vae_dims = TI2V_5B, (160, 256)
    if args.smoke:
        (w, h), frames, repeats, arch, vae_dims = (128, 64), 9, 1, SMOKE_DIT, (8, 8)
    parts = set(args.parts.split(","))
    card = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (smoke)"
    report = dict(card=card, torch=torch.__version__)
    if "dit" in parts:
        report["dit"] = bench_dit(W, dev, arch, (w, h), frames, repeats)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if "vae" in parts:
        report["vae"] = bench_vae(W, dev, vae_dims, (w, h), frames, repeats)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"\nTI2V-5B on {card}, torch {torch.__version__}, {w}x{h}, {frames} frames")
    print(f"{'part':<22} {'official s':>10} {'ours s':>9} {'x official':>10} {'rel err':>9}")
    if "dit" in report:
        d = report["dit"]
        print(f"{'DiT forward (bf16)':<22} {d['official_s']:10.3f} {d['ours_s']:9.3f} {d['ratio']:10.3f} "
              f"{d['rel_err']:9.2e}")
    if "vae" in report:
        v = report["vae"]
        for name in ("fp32", "bf16"):
            print(f"{'VAE 2.2 decode ' + name:<22} {v['official_s']:10.3f} {v[f'ours_{name}_s']:9.3f} "
                  f"{v[f'ours_{name}_ratio']:10.3f} {v[f'ours_{name}_rel_err']:9.2e}")


if __name__ == "__main__":
    main()
