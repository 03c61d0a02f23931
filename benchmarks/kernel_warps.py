"""Sweep the warps per program of our Triton kernels (wan_engine.triton_kernels) at a real DiT shape.

Each kernel runs one token per program; the number of warps sets how many threads share a row. Prints,
for 4, 8, 16 and 32 warps and for the module's NUM_WARPS, each kernel's time and bandwidth (bytes: each
input read once, each output written once) next to a plain device copy.

    python benchmarks/kernel_warps.py --size 832*480 --frames 81
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wan_engine import triton_kernels as K  # noqa: E402
from wan_engine.dit import rope_tables  # noqa: E402
from wan_engine.sizes import Size  # noqa: E402

WARPS = (4, 8, 16, 32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="832*480", help="W*H")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--dim", type=int, default=5120)
    ap.add_argument("--heads", type=int, default=40)
    args = ap.parse_args()
    w, h = Size.parse(args.size)
    grid = ((args.frames - 1) // 4 + 1, h // 16, w // 16)
    L, C, H = grid[0] * grid[1] * grid[2], args.dim, args.heads
    xs = torch.randn(1, L, C, device="cuda")
    yb = torch.randn(1, L, C, device="cuda", dtype=torch.bfloat16)
    shift, scale, gate = torch.randn(1, 1, 3, C, device="cuda").unbind(2)
    wq = torch.ones(C, device="cuda", dtype=torch.bfloat16)
    cos, sin = (t.cuda() for t in rope_tables(grid, C // H))
    gb = xs.nbytes / 1e9   # one fp32 [L, C] pass
    cases = {   # name: (fp32-[L, C]-sized passes moved, call)
        "layer_norm_modulate": (1.5, lambda: K.layer_norm_modulate(xs, 1e-6, torch.bfloat16, shift=shift,
                                                                   scale=scale)),
        "add_layer_norm": (3.0, lambda: K.add_layer_norm(xs, yb, gate, 1e-6, torch.bfloat16, shift=shift,
                                                         scale=scale)),
        "add_gated_": (2.5, lambda: K.add_gated_(xs, yb, gate)),
        "rms_norm_rope": (1.0, lambda: K.rms_norm_rope(yb, wq, 1e-6, H, (cos, sin))),
    }
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, L={L}, width {C}, {H} heads; "
          f"ms and GB/s per warps")
    print(f"{'kernel':<22}" + "".join(f"{'w' + str(n):>15}" for n in WARPS) + f"{'NUM_WARPS=' + str(K.NUM_WARPS):>15}")
    default = K.NUM_WARPS
    for name, (passes, fn) in cases.items():
        cells = []
        for n in (*WARPS, default):
            K.NUM_WARPS = n
            ms = do_bench(fn, warmup=5, rep=50)
            cells.append(f"{ms:.3f} {passes * gb / ms * 1e3:5.0f}")
        K.NUM_WARPS = default
        print(f"{name:<22}" + "".join(f"{c:>15}" for c in cells))
    src = torch.randn(L * C, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=5, rep=50)
    print(f"copy of an fp32 [L, C]: {ms:.3f} ms, {2 * src.nbytes / 1e6 / ms:.0f} GB/s")


if __name__ == "__main__":
    main()
