"""Is a sustained A14B forward bound by the card's power limit? Clock, power and energy per kernel and per variant.

On one GPU, in one run, each row timed with CUDA events and read with NVML (patches.power: energy,
mean power, mean SM clock, share of the time the power cap held the clock down):
- an 8192^3 bf16 GEMM in a burst (10 calls) and held for 3 s: how far the clock falls at the cap;
- the block's GEMMs at M = L, held about 1.5 s each, through every backend at hand: cuBLAS (torch's
  default), cuBLASLt (`preferred_blas_library`), quack's CuTe DSL GEMM (autotuned; where the
  quack-kernels package, which FlashAttention-4 brings, imports) and, with --autotune, inductor's
  max-autotune (Triton templates against cuBLAS);
- the forward of a few real-width blocks (eager, SDPA) in three variants, alternated over rounds:
  the engine as it is; q/k written [B, N, L, D] contiguous instead of as views of [B, L, N, D]; and the
  three residual adds done inside the GEMMs (bf16 x bf16 -> float32 with C = the residual stream,
  gates folded into the weights). That last variant drops the out-projection and FFN-out biases (a
  real version would carry them to the next norm), so it is a timing probe only and its output differs;
- with --fp8-blocks N: the FFN GEMMs in FP8 (e4m3, a scale per token and per output channel,
  `torch._scaled_mm`), held, beside bf16, and the forward of N blocks with FP8 FFNs against the bf16
  engine (time, energy, relative difference).

    python benchmarks/power_bound.py --size 832*480 --frames 81 --blocks 4

If the forward is power-bound, its time follows its energy and moving element-wise work into GEMM
epilogues or changing layouts cannot make it faster unless it saves energy.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from profile_dit import A14B, build, cuda_time, forward_inputs  # noqa: E402
from torch.library import wrap_triton  # noqa: E402

from patches.power import PowerMeter  # noqa: E402
from wan_engine import dit as dit_module  # noqa: E402
from wan_engine import triton_kernels as K  # noqa: E402
from wan_engine.sizes import Size  # noqa: E402


def metered(name: str, fn, flops: float | None = None, repeats: int = 10) -> None:
    """Time fn (median of `repeats`) under a power meter; print one row. Two warm-up calls run and finish
    before the meter starts (an autotuning backend tunes there, outside the energy). NVML's energy counter
    moves in steps of tens of milliseconds, so a shorter window shows its clock only."""
    fn(), fn()
    torch.cuda.synchronize()
    with PowerMeter("cuda") as meter:
        seconds = cuda_time(fn, repeats=repeats, warmup=0)
    r = meter.reading
    rate = f"{flops / seconds / 1e12:6.0f} TFLOP/s" if flops else " " * 14
    if r is None:
        power = "no NVML reading"
    elif r.seconds < 0.2:
        power = f"{'-':>8} J/call {'-':>5} W {r.sm_mhz:5.0f} MHz {r.power_capped:5.0%} capped"
    else:
        power = f"{r.joules / repeats:8.1f} J/call {r.watts:5.0f} W {r.sm_mhz:5.0f} MHz {r.power_capped:5.0%} capped"
    print(f"  {name:<46} {seconds * 1e3:9.2f} ms {rate}  {power}", flush=True)


def gemm_backends(L: int, autotune: bool) -> None:
    dim, ffn = A14B["dim"], A14B["ffn_dim"]
    try:
        from quack.gemm_interface import gemm as quack_gemm
    except ImportError:
        quack_gemm = None
    for label, (k, n) in {"q/k/v/o 5120->5120": (dim, dim), "ffn in 5120->13824": (dim, ffn),
                          "ffn out 13824->5120": (ffn, dim)}.items():
        print(f"\n{label} (M = {L}), held about 1.5 s each")
        _gemm_shape(L, k, n, quack_gemm, autotune)


def _gemm_shape(m: int, k: int, n: int, quack_gemm, autotune: bool) -> None:
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    flops = 2 * m * k * n
    repeats = max(10, round(1.5 / (flops / 700e12)))
    metered("cuBLAS (torch default) F.linear", lambda: F.linear(a, w, b), flops, repeats)
    torch.backends.cuda.preferred_blas_library("cublaslt")
    metered("cuBLASLt preferred F.linear", lambda: F.linear(a, w, b), flops, repeats)
    torch.backends.cuda.preferred_blas_library("cublas")
    if quack_gemm is not None:
        metered("quack CuTe DSL gemm (autotuned)", lambda: quack_gemm(a, w.t(), bias=b), flops, repeats)
    if autotune:
        linear = torch.compile(F.linear, mode="max-autotune-no-cudagraphs")
        metered("inductor max-autotune", lambda: linear(a, w, b), flops, repeats)
        torch._dynamo.reset()


def rms_norm_rope_heads_first(x, weight, eps, num_heads, rope=None):
    """K.rms_norm_rope's kernel writing q/k contiguous [B, N, L, D] (the layout the plain path gives)."""
    B, L, C = x.shape
    D = C // num_heads
    x = x.contiguous()
    cos, sin = rope if rope is not None else (None, None)
    out = torch.empty(B, num_heads, L, D, device=x.device, dtype=x.dtype)
    wrap_triton(K._rms_norm_rope_kernel)[(B * L,)](
        x, weight, cos, sin, out, L, C, x.stride(0), x.stride(1), out.stride(0), out.stride(2), out.stride(1),
        D // 2, eps, N=num_heads, D=D, N_BLOCK=1 << (num_heads - 1).bit_length(), HAS_ROPE=cos is not None,
        num_warps=K.NUM_WARPS)
    return out


def _attention_before_out(attn, x, context=None, rope=None):
    n = attn.num_heads
    kv = x if context is None else context.to(x.dtype)
    q = K.rms_norm_rope(attn.q(x), attn.norm_q.weight, attn.norm_q.eps, n, rope)
    k = K.rms_norm_rope(attn.k(kv), attn.norm_k.weight, attn.norm_k.eps, n, rope)
    v = attn.v(kv).unflatten(-1, (n, -1)).transpose(1, 2)
    return attn.attention_fn(q, k, v).transpose(1, 2).flatten(2)  # [B, L, dim]


def _add_matmul(x, a, w):
    """x + a @ w.T with x float32 [B, L, C], a and w bf16: one GEMM with C = x and a float32 output."""
    flat = torch.addmm(x.flatten(0, 1), a.flatten(0, 1), w.t(), out_dtype=torch.float32)
    return flat.view_as(x)


def residual_in_gemm_block(self, x, mod, context, rope):
    """Timing probe of DiTBlock._forward_fused with the residual adds inside the GEMMs (biases of the
    out projections and FFN-out dropped, gates folded into copies of the weights)."""
    shift_sa, scale_sa, gate_sa, shift_ffn, scale_ffn, gate_ffn = mod
    dt = self.ffn[0].weight.dtype
    h = K.layer_norm_modulate(x, self.norm1.eps, dt, shift=shift_sa, scale=scale_sa)
    a = _attention_before_out(self.self_attn, h, rope=rope)
    x = _add_matmul(x, a, self.self_attn.o.weight * gate_sa[0, 0, :, None].to(dt))
    h = K.layer_norm_modulate(x, self.norm3.eps, dt, self.norm3.weight, self.norm3.bias)
    x = _add_matmul(x, _attention_before_out(self.cross_attn, h, context), self.cross_attn.o.weight)
    h = K.layer_norm_modulate(x, self.norm2.eps, dt, shift=shift_ffn, scale=scale_ffn)
    up, down = self.ffn[0], self.ffn[2]
    f = torch._addmm_activation(up.bias, h.flatten(0, 1), up.weight.t(), use_gelu=True).unflatten(0, h.shape[:2])
    return _add_matmul(x, f, down.weight * gate_ffn[0, 0, :, None].to(dt))


def blocks_forward(blocks: int, lat: tuple[int, ...]):
    """A model of `blocks` real-width blocks (random bf16 weights) and its forward on fixed inputs."""
    model = build(blocks, torch.bfloat16)
    x_in, t, ctx = forward_inputs(lat)

    def forward():
        with torch.no_grad():
            return model(x_in, t, ctx)

    return model, forward


def block_variants(L: int, lat: tuple[int, ...], blocks: int, rounds: int) -> None:
    model, forward = blocks_forward(blocks, lat)
    flops = model.config.flops_per_forward(L)
    engine = (K.rms_norm_rope, dit_module.DiTBlock._forward_fused)
    variants = {"engine as it is": engine,
                "q/k contiguous [B, N, L, D]": (rms_norm_rope_heads_first, engine[1]),
                "residual adds in the GEMMs (probe)": (engine[0], residual_in_gemm_block)}
    ref = forward().float()
    print(f"\nForward of {blocks} real-width blocks, eager, SDPA, L = {L} ({rounds} alternating rounds)")
    try:
        for rnd in range(rounds):
            for name, (rope_fn, block_fn) in variants.items():
                K.rms_norm_rope, dit_module.DiTBlock._forward_fused = rope_fn, block_fn
                metered(f"round {rnd + 1}: {name}", forward, flops, repeats=6)
        for name, (rope_fn, block_fn) in variants.items():
            K.rms_norm_rope, dit_module.DiTBlock._forward_fused = rope_fn, block_fn
            diff = ((forward().float() - ref).norm() / ref.norm()).item()
            print(f"  {name}: output rel. diff. vs the engine {diff:.1e}")
    finally:
        K.rms_norm_rope, dit_module.DiTBlock._forward_fused = engine


E4M3_MAX = 448.0


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], float32 scale [M, 1]) with each row's absolute maximum at the e4m3 maximum."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12) / E4M3_MAX
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


def fp8_linear(x: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x [M, K] bf16 times e4m3 weights [N, K] with per-channel scales [1, N]: bf16 [M, N]."""
    x8, x_scale = quantize_rows(x)
    return torch._scaled_mm(x8, w8.t(), x_scale, w_scale, bias=bias, out_dtype=torch.bfloat16)


def fp8_ffn(self, h):
    """DiTBlock._ffn_gelu_epilogue with both FFN GEMMs in FP8 (weights quantized by `fp8_forward`)."""
    up, down = self.ffn[0], self.ffn[2]
    g = F.gelu(fp8_linear(h.flatten(0, 1), *up.fp8, up.bias), approximate="tanh")
    return fp8_linear(g, *down.fp8, down.bias).unflatten(0, h.shape[:2])


def fp8_gemms(L: int) -> None:
    dim, ffn = A14B["dim"], A14B["ffn_dim"]
    for label, (k, n) in {"ffn in 5120->13824": (dim, ffn), "ffn out 13824->5120": (ffn, dim)}.items():
        a = torch.randn(L, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        a8, a_scale = quantize_rows(a)
        w8, w_scale = quantize_rows(w)
        w_scale = w_scale.t().contiguous()
        flops = 2 * L * k * n
        repeats = max(10, round(1.5 / (flops / 700e12)))
        print(f"\n{label} (M = {L}), bf16 and FP8, held about 1.5 s each")
        metered("bf16 F.linear", lambda: F.linear(a, w, b), flops, repeats)  # noqa: B023 (called at once)
        metered("FP8 _scaled_mm, per-token x per-channel scales",
                lambda: torch._scaled_mm(a8, w8.t(), a_scale, w_scale, bias=b, out_dtype=torch.bfloat16),  # noqa: B023
                flops, 2 * repeats)
        ref = F.linear(a, w, b).float()
        got = torch._scaled_mm(a8, w8.t(), a_scale, w_scale, bias=b, out_dtype=torch.bfloat16).float()
        print(f"  FP8 GEMM rel. diff. vs bf16 (Gaussian data): {((got - ref).norm() / ref.norm()).item():.2e}")


def fp8_forward(L: int, lat: tuple[int, ...], blocks: int) -> None:
    model, forward = blocks_forward(blocks, lat)
    print(f"\nForward of {blocks} real-width blocks, eager, SDPA: bf16 FFN and FP8 FFN")
    ref = forward().float()
    metered("bf16 engine", forward, model.config.flops_per_forward(L), repeats=3)
    for block in model.blocks:
        for linear in (block.ffn[0], block.ffn[2]):
            w8, w_scale = quantize_rows(linear.weight)
            linear.fp8 = (w8, w_scale.t().contiguous())
    engine = dit_module.DiTBlock._ffn_gelu_epilogue
    dit_module.DiTBlock._ffn_gelu_epilogue = fp8_ffn
    try:
        diff = ((forward().float() - ref).norm() / ref.norm()).item()
        metered("FFN in FP8 (activations quantized by torch ops)", forward, model.config.flops_per_forward(L),
                repeats=3)
        print(f"  FP8 FFN output rel. diff. vs the bf16 engine: {diff:.2e}")
    finally:
        dit_module.DiTBlock._ffn_gelu_epilogue = engine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="832*480", help="W*H")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--autotune", action="store_true", help="also inductor max-autotune GEMMs (minutes)")
    ap.add_argument("--fp8-blocks", type=int, default=0, help="also the FP8 FFN probe on this many blocks")
    args = ap.parse_args()
    w, h = Size.parse(args.size)
    lat = (16, (args.frames - 1) // 4 + 1, h // 8, w // 8)
    L = lat[1] * lat[2] * lat[3] // 4
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {w}x{h}, {args.frames} frames, L={L}")
    square = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    print("\n8192^3 bf16 GEMM")
    metered("burst (10 calls)", lambda: square @ square, 2 * 8192**3, repeats=10)
    metered("held for about 3 s", lambda: square @ square, 2 * 8192**3, repeats=2000)
    gemm_backends(L, args.autotune)
    block_variants(L, lat, args.blocks, args.rounds)
    if args.fp8_blocks:
        fp8_gemms(L)
        fp8_forward(L, lat, args.fp8_blocks)


if __name__ == "__main__":
    main()
