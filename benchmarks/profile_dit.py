"""Where the time of a real-width DiT block goes: kernel table, the floor's two rates, our kernels' bandwidth.

Builds our WanDiT at the A14B width (5120, 40 heads, FFN 13824) with only a few blocks (random bf16
weights), then on one GPU, in one run:
- the ceilings: an 8192^3 bf16 GEMM, a device-to-device copy, SDPA at Wan's self-attention shape
  (1 x 40 heads x L x 128) in the layouts the engine can hand it, and the cross-attention shape;
- the GEMMs of a block at their real shapes (and a fused-QKV and a GELU-epilogue variant);
- the element-wise kernels of both paths at [1, L, dim], time and bandwidth;
- the forward of those blocks on the plain PyTorch path and on the Triton path, timed and checked
  against a float32 copy of the same weights; the Triton path profiled (torch.profiler kernel table);
- the floor of those blocks: linear FLOPs at the GEMM rate + attention FLOPs at the SDPA rate.

    python benchmarks/profile_dit.py --size 832*480 --frames 81 --blocks 4 --out /tmp/prof

Prints short tables; the full kernel table goes to --out.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wan_engine import dit as dit_module  # noqa: E402
from wan_engine.dit import DiTConfig, WanDiT  # noqa: E402
from wan_engine.sizes import Size  # noqa: E402
from wan_engine.tiny import random_dit  # noqa: E402

A14B = dict(model_type="t2v", in_dim=16, out_dim=16, dim=5120, ffn_dim=13824, num_heads=40)


def cuda_time(fn, repeats: int = 10, warmup: int = 2) -> float:
    """Median seconds of fn() timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def gemm_rate(m: int, k: int, n: int, bias: bool = False) -> float:
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16) if bias else None
    return 2 * m * k * n / cuda_time(lambda: F.linear(a, w, b)) / 1e12


def sdpa_rate(L: int, Lk: int, heads: int = 40, d: int = 128, layout: str = "bnld") -> tuple[float, bool]:
    """TFLOP/s of SDPA; layout bnld = contiguous [B, N, L, D], blnd = transposed views of [B, L, N, D],
    mixed = q, k contiguous [B, N, L, D] and v a view. Also says whether the output's [B, L, N*D]
    view is contiguous (no copy before the out projection)."""
    def make(n_tok, heads_first):
        if heads_first:
            return torch.randn(1, heads, n_tok, d, device="cuda", dtype=torch.bfloat16)
        return torch.randn(1, n_tok, heads, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    q = make(L, layout in ("bnld", "mixed"))
    k = make(Lk, layout in ("bnld", "mixed"))
    v = make(Lk, layout == "bnld")
    out = F.scaled_dot_product_attention(q, k, v)
    flat = out.transpose(1, 2).flatten(2).data_ptr() == out.data_ptr() and out.transpose(1, 2).is_contiguous()
    seconds = cuda_time(lambda: F.scaled_dot_product_attention(q, k, v), repeats=5)
    return 4 * L * Lk * heads * d / seconds / 1e12, flat


def copy_bandwidth(numel: int) -> float:
    src = torch.randn(numel, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.nbytes / cuda_time(lambda: dst.copy_(src)) / 1e9


def ffn_variants(L: int, dim: int, ffn: int) -> None:
    """The FFN GEMMs run below the square GEMM's rate: time ways of splitting them."""
    x = torch.randn(L, dim, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(L, ffn, device="cuda", dtype=torch.bfloat16)
    w1 = torch.randn(ffn, dim, device="cuda", dtype=torch.bfloat16)
    w2 = torch.randn(dim, ffn, device="cuda", dtype=torch.bfloat16)
    b1 = torch.randn(ffn, device="cuda", dtype=torch.bfloat16)
    b2 = torch.randn(dim, device="cuda", dtype=torch.bfloat16)
    flops = 2 * L * dim * ffn
    half = ffn // 2
    variants = {
        "in  F.linear": lambda: F.linear(x, w1, b1),
        "in  no bias": lambda: F.linear(x, w1),
        "in  N split in 2": lambda: torch.cat([F.linear(x, w1[:half], b1[:half]),
                                               F.linear(x, w1[half:], b1[half:])], dim=1),
        "in  M chunks of 8192": lambda: [F.linear(c, w1, b1) for c in x.split(8192)],
        "out F.linear": lambda: F.linear(h, w2, b2),
        "out no bias": lambda: F.linear(h, w2),
        "out M chunks of 8192": lambda: [F.linear(c, w2, b2) for c in h.split(8192)],
    }
    for name, fn in variants.items():
        print(f"  ffn {name:<22} {flops / cuda_time(fn) / 1e12:6.0f} TFLOP/s")


def gelu_epilogue(L: int, dim: int, ffn: int) -> None:
    x = torch.randn(L, dim, device="cuda", dtype=torch.bfloat16)
    w1 = torch.randn(ffn, dim, device="cuda", dtype=torch.bfloat16) / dim**0.5
    b1 = torch.randn(ffn, device="cuda", dtype=torch.bfloat16)
    plain = cuda_time(lambda: F.gelu(F.linear(x, w1, b1), approximate="tanh"))
    fused = cuda_time(lambda: torch._addmm_activation(b1, x, w1.t(), use_gelu=True))
    ref = F.gelu(F.linear(x, w1, b1), approximate="tanh").float()
    err = ((torch._addmm_activation(b1, x, w1.t(), use_gelu=True).float() - ref).norm() / ref.norm()).item()
    print(f"  ffn in + GELU: linear then gelu {plain * 1e3:.2f} ms, GELU epilogue {fused * 1e3:.2f} ms "
          f"(rel diff {err:.1e})")


def elementwise_kernels(L: int, dim: int, heads: int, lat: tuple[int, ...]) -> None:
    """Our kernels' time and bandwidth at [1, L, dim] (bytes: each input read once, output written once)."""
    from wan_engine import triton_kernels as K
    xs = torch.randn(1, L, dim, device="cuda")
    shift, scale = torch.randn(1, 1, 6, dim, device="cuda").unbind(2)[:2]
    qb = torch.randn(1, L, dim, device="cuda", dtype=torch.bfloat16)
    yb = torch.randn(1, L, dim, device="cuda", dtype=torch.bfloat16)
    wq = torch.ones(dim, device="cuda", dtype=torch.bfloat16)
    gelu_in = torch.randn(L, 13824, device="cuda", dtype=torch.bfloat16)
    cos, sin = dit_module.rope_tables((lat[1], lat[2] // 2, lat[3] // 2), dim // heads)
    rope = (cos.cuda(), sin.cuda())
    gb = xs.nbytes / 1e9
    rows = (("layer_norm_modulate fp32 -> bf16", 1.5,
             lambda: K.layer_norm_modulate(xs, 1e-6, torch.bfloat16, None, None, shift, scale)),
            ("add_layer_norm x + y*gate -> fp32, bf16", 3.0,
             lambda: K.add_layer_norm(xs, yb, scale, 1e-6, torch.bfloat16, shift=shift, scale=scale)),
            ("add_gated_ x += y*gate", 2.5, lambda: K.add_gated_(xs, yb, scale)),
            ("rms_norm_rope bf16 -> bf16", 1.0, lambda: K.rms_norm_rope(qb, wq, 1e-6, heads, rope)),
            ("rms_norm (no rope) bf16 -> bf16", 1.0, lambda: K.rms_norm_rope(qb, wq, 1e-6, heads)),
            ("torch addcmul fp32 + bf16 * gate", 2.5, lambda: torch.addcmul(xs, yb, scale)),
            ("torch LayerNorm + modulate + cast", 1.5,
             lambda: (F.layer_norm(xs, (dim,), eps=1e-6) * (1 + scale) + shift).bfloat16()),
            ("torch GELU tanh [L, 13824] bf16", 2.7 / 2,
             lambda: F.gelu(gelu_in, approximate="tanh")))
    print("\nElement-wise work at [1, L, dim] (GB/s counts the fewest bytes: inputs once, output once)")
    for name, gbytes, fn in rows:
        seconds = cuda_time(fn)
        print(f"  {name:<36} {seconds * 1e3:6.3f} ms  {gbytes * gb / seconds:6.0f} GB/s")


def build(blocks: int, dtype: torch.dtype, seed: int = 0) -> WanDiT:
    return random_dit(DiTConfig(**A14B, num_layers=blocks), "cuda", dtype, seed)


def forward_inputs(lat: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed inputs of a forward on CUDA: latents [1, *lat], timestep 900, a 120-token bf16 text context."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    x_in = torch.randn((1, *lat), generator=gen, device="cuda")
    ctx = torch.randn(1, 120, 4096, generator=gen, device="cuda").bfloat16()
    return x_in, torch.tensor([900], device="cuda"), ctx


def kernel_table(fn, path: Path, rows: int = 25) -> str:
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    avg = prof.key_averages()
    path.write_text(avg.table(sort_by="self_cuda_time_total", row_limit=200))
    return avg.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=70)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="832*480", help="W*H")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--out", default=".", help="folder for the full kernel tables")
    ap.add_argument("--fa4", action="store_true", help="also the Triton path on FlashAttention-4, profiled")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    w, h = Size.parse(args.size)
    lat = (16, (args.frames - 1) // 4 + 1, h // 8, w // 8)
    L = lat[1] * lat[2] * lat[3] // 4
    dim, ffn, heads = A14B["dim"], A14B["ffn_dim"], A14B["num_heads"]
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # a true fp32 reference
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {w}x{h}, {args.frames} frames, "
          f"L={L}, {args.blocks} blocks", flush=True)

    # ---- ceilings
    peak = gemm_rate(8192, 8192, 8192)
    bw = copy_bandwidth(L * dim)
    print(f"\n8192^3 bf16 GEMM {peak:.0f} TFLOP/s; copy of [L, dim] fp32 {bw:.0f} GB/s (read + write)")
    print("\nSDPA (1 x 40 x Lq x Lk x 128, bf16, default backend)")
    sdpa = {}
    for layout in ("bnld", "blnd", "mixed"):
        sdpa[layout], flat = sdpa_rate(L, L, layout=layout)
        print(f"  self  {layout:<6} {sdpa[layout]:6.0f} TFLOP/s   output [B, L, N*D] view contiguous: {flat}")
    cross, _ = sdpa_rate(L, 512, layout="blnd")
    print(f"  cross blnd   {cross:6.0f} TFLOP/s (Lk = 512)")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                rate, _ = sdpa_rate(L, L, layout="blnd")
            print(f"  self  blnd   {rate:6.0f} TFLOP/s with only {name}")
        except RuntimeError as e:
            print(f"  {name}: not available ({str(e).splitlines()[0][:80]})")

    # ---- the block's GEMMs at their real shapes
    print("\nGEMMs of one block (M = L, bf16, with bias)")
    shapes = {"q/k/v/o  5120->5120": (dim, dim), "qkv fused 5120->15360": (dim, 3 * dim),
              "ffn in   5120->13824": (dim, ffn), "ffn out 13824->5120": (ffn, dim)}
    gemm = {}
    for name, (k, n) in shapes.items():
        gemm[name] = gemm_rate(L, k, n, bias=True)
        print(f"  {name:<24} {gemm[name]:6.0f} TFLOP/s")
    ffn_variants(L, dim, ffn)
    gelu_epilogue(L, dim, ffn)
    elementwise_kernels(L, dim, heads, lat)

    # ---- the blocks: plain vs Triton path, error against float32 weights, kernel tables
    model = build(args.blocks, torch.bfloat16)
    x_in, t, ctx = forward_inputs(lat)
    cfg = model.config
    attn_flops = args.blocks * (4 * L * L * dim + 4 * L * 512 * dim)
    linear_flops = cfg.flops_per_forward(L) - attn_flops
    floor = linear_flops / (peak * 1e12) + attn_flops / (max(sdpa.values()) * 1e12)

    def forward():
        with torch.no_grad():
            return model(x_in, t, ctx)

    results = {}
    for name, triton_on in (("plain", False), ("triton", True)):
        model.set_triton(triton_on)
        torch.cuda.reset_peak_memory_stats()
        seconds = cuda_time(forward, repeats=5)
        results[name] = (seconds, forward().float(), torch.cuda.max_memory_allocated() / 1e9)
    table = kernel_table(forward, out_dir / "kernels_triton.txt")
    print(f"\n==== kernel table, triton path ({args.blocks} blocks)\n{table}", flush=True)
    if args.fa4:
        from patches.attention import fa4_attention

        for module in model.modules():
            if isinstance(module, dit_module.Attention):
                module.attention_fn = fa4_attention
        seconds = cuda_time(forward, repeats=5)
        results["triton + fa4"] = (seconds, forward().float(), torch.cuda.max_memory_allocated() / 1e9)
        table = kernel_table(forward, out_dir / "kernels_fa4.txt")
        print(f"\n==== kernel table, triton path + FA4 ({args.blocks} blocks)\n{table}", flush=True)

    fp32 = build(args.blocks, torch.float32)
    with torch.no_grad():
        ref = fp32(x_in, t, ctx.float())
    del fp32
    print(f"\nForward of {args.blocks} blocks at L={L} (median of 5): floor {floor * 1e3:.1f} ms "
          f"(linear {linear_flops / 1e12:.0f} TFLOP at {peak:.0f}, attention {attn_flops / 1e12:.0f} TFLOP at "
          f"{max(sdpa.values()):.0f})")
    print(f"{'path':<16} {'ms':>8} {'ms/block':>9} {'x floor':>8} {'peak GB':>8} {'rel err vs fp32':>16}")
    for name, (seconds, out, peak_gb) in results.items():
        err = ((out - ref).norm() / ref.norm()).item()
        print(f"{name:<16} {seconds * 1e3:8.1f} {seconds * 1e3 / args.blocks:9.1f} {seconds / floor:8.3f} "
              f"{peak_gb:8.1f} {err:16.2e}")


if __name__ == "__main__":
    main()
