"""Triton kernels for the DiT's element-wise work on CUDA with bf16 weights (the eager fast path).

At video sizes a block's norms, modulation, q/k RMSNorm, RoPE and residual adds are passes over
[B, L, dim] tensors; run as separate PyTorch ops they cost about 22 ms per block at 480p on an H200
(a block's GEMMs and attention take about 65 ms). Each kernel here does one chain of them in a single
read and a single write, with the official roundings (float32 statistics and residual stream, the
RMSNorm scale applied in the weight dtype, RoPE in float32), so results stay within bf16 rounding
of the PyTorch path:
- `add_layer_norm`: x (+ y [* gate]) -> the float32 sum, and its LayerNorm (affine and/or
  `* (1 + scale) + shift`) in the dtype of the next linear layer;
- `add_gated_`: x += y * gate in place (the block's last residual add);
- `rms_norm_rope`: RMSNorm over the whole width, then RoPE, written in the layout attention reads.

Only `wan_engine.dit` uses these, and only on CUDA with 16-bit weights outside torch.compile (the
compiler fuses the plain PyTorch path itself); the CPU path never imports Triton.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


def _warps(block: int) -> int:
    return min(16, max(4, block // 512))


@triton.jit
def _add_layer_norm_kernel(x_ptr, y_ptr, gate_ptr, w_ptr, b_ptr, shift_ptr, scale_ptr, sum_ptr, out_ptr,
                           L, C, stride_gb, stride_gl, stride_mb, stride_ml, eps,
                           HAS_Y: tl.constexpr, HAS_GATE: tl.constexpr, HAS_AFFINE: tl.constexpr,
                           HAS_MOD: tl.constexpr, NORM: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < C
    x = tl.load(x_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_Y:
        y = tl.load(y_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:
            g = (row // L) * stride_gb + (row % L) * stride_gl
            y = y * tl.load(gate_ptr + g + cols, mask=mask, other=0.0)
        x = x + y
        tl.store(sum_ptr + row * C + cols, x, mask=mask)
    if NORM:
        mean = tl.sum(x, axis=0) / C
        xc = tl.where(mask, x - mean, 0.0)
        h = xc * tl.rsqrt(tl.sum(xc * xc, axis=0) / C + eps)
        if HAS_AFFINE:
            h = (h * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                 + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32))
        if HAS_MOD:
            m = (row // L) * stride_mb + (row % L) * stride_ml
            scale = tl.load(scale_ptr + m + cols, mask=mask, other=0.0)
            shift = tl.load(shift_ptr + m + cols, mask=mask, other=0.0)
            h = h * (1.0 + scale) + shift
        tl.store(out_ptr + row * C + cols, h.to(out_ptr.dtype.element_ty), mask=mask)


def _row_strides(t: Tensor | None, name: str) -> tuple[int, int]:
    """Strides (batch, token) of a [B, Lt, C] per-sample (Lt = 1) or per-token row tensor."""
    if t is None:
        return 0, 0
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must have contiguous channels")
    return t.stride(0), (t.stride(1) if t.shape[1] > 1 else 0)


def _launch(x: Tensor, y: Tensor | None, gate: Tensor | None, out_sum: Tensor | None, eps: float,
            out_dtype: torch.dtype | None, weight: Tensor | None, bias: Tensor | None, shift: Tensor | None,
            scale: Tensor | None) -> Tensor | None:
    B, L, C = x.shape
    if not x.is_contiguous() or (y is not None and not y.is_contiguous()):
        raise ValueError("x and y must be contiguous [B, L, C]")
    stride_gb, stride_gl = _row_strides(gate, "gate")
    stride_mb, stride_ml = _row_strides(shift, "shift")
    if shift is not None and scale.stride() != shift.stride():
        raise ValueError("shift and scale must be same-strided views")
    out = None if out_dtype is None else torch.empty(B, L, C, device=x.device, dtype=out_dtype)  # [B, L, C]
    block = triton.next_power_of_2(C)
    _add_layer_norm_kernel[(B * L,)](
        x, y, gate, weight, bias, shift, scale, out_sum, out, L, C, stride_gb, stride_gl, stride_mb, stride_ml,
        eps, HAS_Y=y is not None, HAS_GATE=gate is not None, HAS_AFFINE=weight is not None,
        HAS_MOD=shift is not None, NORM=out is not None, BLOCK=block, num_warps=_warps(block))
    return out


def layer_norm_modulate(x: Tensor, eps: float, out_dtype: torch.dtype, weight: Tensor | None = None,
                        bias: Tensor | None = None, shift: Tensor | None = None,
                        scale: Tensor | None = None) -> Tensor:
    """LayerNorm of x [B, L, C] float32 in float32 (affine if weight/bias are given), then, if
    shift/scale [B, Lt, C] float32 (Lt 1 or L) are given, `* (1 + scale) + shift`; written once in
    out_dtype."""
    return _launch(x.contiguous(), None, None, None, eps, out_dtype, weight, bias, shift, scale)


def add_layer_norm(x: Tensor, y: Tensor, gate: Tensor | None, eps: float, out_dtype: torch.dtype,
                   weight: Tensor | None = None, bias: Tensor | None = None, shift: Tensor | None = None,
                   scale: Tensor | None = None, inplace: bool = False) -> tuple[Tensor, Tensor]:
    """s = x + y (* gate) in float32 (x [B, L, C] float32, y [B, L, C] any dtype, gate [B, Lt, C]),
    then `layer_norm_modulate(s, ...)`. Returns (s, normed); s is written into x when inplace."""
    out_sum = x if inplace else torch.empty_like(x)  # [B, L, C] fp32
    normed = _launch(x, y, gate, out_sum, eps, out_dtype, weight, bias, shift, scale)
    return out_sum, normed


def add_gated_(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    """x += y * gate in place (x [B, L, C] float32, y [B, L, C], gate [B, Lt, C] float32); returns x."""
    _launch(x, y, gate, x, 0.0, None, None, None, None, None)
    return x


@triton.jit
def _rms_norm_rope_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr,
                          L, C, stride_xb, stride_xl, stride_ob, stride_ol, stride_on, stride_cl, eps,
                          N: tl.constexpr, D: tl.constexpr, N_BLOCK: tl.constexpr, HAS_ROPE: tl.constexpr):
    # One token per program, held as an [N_BLOCK, D] tile (heads x head channels) so that loads and
    # stores are contiguous along the head channels in either output layout.
    row = tl.program_id(0).to(tl.int64)
    b = row // L
    t = row % L
    n = tl.arange(0, N_BLOCK)[:, None]
    d = tl.arange(0, D)[None, :]
    mask = (n < N) & (d < D)
    x = tl.load(x_ptr + b * stride_xb + t * stride_xl + n * D + d, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(tl.sum(x * x, axis=1), axis=0) / C + eps)
    # Official roundings: normalise in float32, round to the weight dtype, scale in that dtype.
    dt = out_ptr.dtype.element_ty
    w = tl.load(w_ptr + n * D + d, mask=mask, other=0.0).to(tl.float32)
    y = ((x * rstd).to(dt).to(tl.float32) * w).to(dt).to(tl.float32)
    if HAS_ROPE:
        even, odd = tl.split(tl.reshape(y, (N_BLOCK, D // 2, 2)))  # channels 2i, 2i+1: [N_BLOCK, D/2]
        i = tl.arange(0, D // 2)[None, :]
        cos = tl.load(cos_ptr + t * stride_cl + i)  # [1, D/2], shared by the heads
        sin = tl.load(sin_ptr + t * stride_cl + i)
        y = tl.reshape(tl.join(even * cos - odd * sin, even * sin + odd * cos), (N_BLOCK, D))
    tl.store(out_ptr + b * stride_ob + t * stride_ol + n * stride_on + d, y.to(dt), mask=mask)


def rms_norm_rope(x: Tensor, weight: Tensor, eps: float, num_heads: int,
                  rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """RMSNorm over the whole width of x [B, L, C] (16-bit), then RoPE on channel pairs (2i, 2i+1)
    when rope = (cos, sin) [L, C / num_heads / 2] float32 is given. Returns [B, N, L, D] in x's dtype,
    a transposed view of [B, L, N, D] memory: the layout of v and the one SDPA (cuDNN) and
    FlashAttention read fastest here."""
    B, L, C = x.shape
    D = C // num_heads
    if x.stride(-1) != 1 or x.stride(1) != C:
        x = x.contiguous()
    if D & (D - 1):
        raise ValueError(f"head width {D} must be a power of two")
    mem = torch.empty(B, L, num_heads, D, device=x.device, dtype=x.dtype)  # [B, L, N, D]
    cos, sin = rope if rope is not None else (None, None)
    if rope is not None and (cos.shape != (L, D // 2) or not cos.is_contiguous() or not sin.is_contiguous()):
        raise ValueError(f"rope tables must be contiguous [{L}, {D // 2}], got {tuple(cos.shape)}")
    n_block = triton.next_power_of_2(num_heads)
    _rms_norm_rope_kernel[(B * L,)](
        x, weight, cos, sin, mem, L, C, x.stride(0), x.stride(1), mem.stride(0), mem.stride(1), mem.stride(2),
        D // 2, eps, N=num_heads, D=D, N_BLOCK=n_block, HAS_ROPE=rope is not None,
        num_warps=_warps(n_block * D // 2))
    return mem.transpose(1, 2)  # [B, N, L, D]
