"""Triton kernels for the DiT's element-wise work on CUDA with bf16 weights, eager and compiled.

At video sizes a block's norms, modulation, q/k RMSNorm, RoPE and residual adds are passes over
[B, L, dim] tensors; run as separate PyTorch ops they cost about 22 ms per block at 480p on an H200
(a block's GEMMs and attention take about 65 ms). Each kernel here does one chain of them in a single
read and a single write, with the official roundings (float32 statistics and residual stream, the
RMSNorm scale applied in the weight dtype, RoPE in float32), so results stay within bf16 rounding
of the PyTorch path:
- `layer_norm_modulate`: LayerNorm (affine and/or `* (1 + scale) + shift`) of the float32 residual
  stream, written in the dtype of the next linear layer;
- `add_layer_norm`: x + y (* gate) -> the float32 sum, and its `layer_norm_modulate`;
- `add_gated` / `add_gated_`: x + y * gate (the block's last residual add);
- `rms_norm_rope`: RMSNorm over the whole width, then RoPE, written in the layout attention reads.

Each launcher is a `torch.library.triton_op` (namespace `wan_engine`) whose kernel goes through
`torch.library.wrap_triton`. In eager mode the op launches the kernel as a plain Triton call. Under
torch.compile(fullgraph=True) Dynamo captures each call as one graph node, AOTAutograd traces into it,
and inductor launches our kernel as it is, generating kernels only for the glue around it: compiled
blocks keep these kernels instead of regenerating the plain path's element-wise work.

Only `wan_engine.dit` uses these, on CUDA with 16-bit weights; the CPU path never needs Triton.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

# One row (token) per program, 4 warps: at 480p on an H200 (L = 32,760, width 5,120) a sweep of 4, 8, 16
# and 32 warps gave 4 the fastest for every kernel here (LayerNorm-modulate 0.25 ms against 0.34 with 16,
# add + LayerNorm 0.56 against 0.66, q/k RMSNorm + RoPE 0.17 against 0.20 with 8): 3.6-4.1 TB/s, against
# 4.2 for a plain copy.
NUM_WARPS = 4

# FP32_SCALARS: a Python float argument (eps) reaches a kernel as fp32 when Triton launches it, but as fp64
# when inductor does (a compiled block launching these kernels); an fp64 eps would turn the row's
# normalisation into float64 arithmetic (33% slower at 480p, and other roundings). The kernels cast it.


@triton.jit
def _add_layer_norm_kernel(x_ptr, y_ptr, gate_ptr, w_ptr, b_ptr, shift_ptr, scale_ptr, sum_ptr, out_ptr,
                           L, C, stride_gb, stride_gl, per_g, stride_mb, stride_ml, per_m, eps,
                           HAS_Y: tl.constexpr, HAS_GATE: tl.constexpr, HAS_AFFINE: tl.constexpr,
                           HAS_MOD: tl.constexpr, NORM: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < C
    x = tl.load(x_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_Y:
        y = tl.load(y_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:
            g = (row // L) * stride_gb + ((row % L) // per_g) * stride_gl
            y = y * tl.load(gate_ptr + g + cols, mask=mask, other=0.0)
        x = x + y
        tl.store(sum_ptr + row * C + cols, x, mask=mask)
    if NORM:
        mean = tl.sum(x, axis=0) / C
        xc = tl.where(mask, x - mean, 0.0)
        h = xc * tl.rsqrt(tl.sum(xc * xc, axis=0) / C + tl.cast(eps, tl.float32))  # see FP32_SCALARS
        if HAS_AFFINE:
            h = (h * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                 + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32))
        if HAS_MOD:
            m = (row // L) * stride_mb + ((row % L) // per_m) * stride_ml
            scale = tl.load(scale_ptr + m + cols, mask=mask, other=0.0)
            shift = tl.load(shift_ptr + m + cols, mask=mask, other=0.0)
            h = h * (1.0 + scale) + shift
        tl.store(out_ptr + row * C + cols, h.to(out_ptr.dtype.element_ty), mask=mask)


def _row_strides(t: Tensor | None, name: str, L: int) -> tuple[int, int, int]:
    """Strides (batch, row) of a [B, Lt, C] row tensor whose rows each hold L / Lt consecutive tokens
    (Lt 1: per sample; Lt L: per token; in between, e.g. per latent frame), and that token count."""
    if t is None:
        return 0, 0, 1
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must have contiguous channels")
    if L % t.shape[1]:
        raise ValueError(f"{name} has {t.shape[1]} rows, which do not split {L} tokens evenly")
    return t.stride(0), (t.stride(1) if t.shape[1] > 1 else 0), L // t.shape[1]


def _launch(x: Tensor, y: Tensor | None, gate: Tensor | None, out_sum: Tensor | None, out: Tensor | None,
            eps: float, weight: Tensor | None, bias: Tensor | None, shift: Tensor | None,
            scale: Tensor | None) -> None:
    """One `_add_layer_norm_kernel` launch: the sum goes to out_sum (may be x) when y is given, the
    normed rows to out when out is given."""
    B, L, C = x.shape
    if not x.is_contiguous() or (y is not None and not y.is_contiguous()):
        raise ValueError("x and y must be contiguous [B, L, C]")
    stride_gb, stride_gl, per_g = _row_strides(gate, "gate", L)
    stride_mb, stride_ml, per_m = _row_strides(shift, "shift", L)
    if shift is not None and scale.stride() != shift.stride():
        raise ValueError("shift and scale must be same-strided views")
    block = triton.next_power_of_2(C)
    wrap_triton(_add_layer_norm_kernel)[(B * L,)](
        x, y, gate, weight, bias, shift, scale, out_sum, out, L, C, stride_gb, stride_gl, per_g, stride_mb,
        stride_ml, per_m, eps, HAS_Y=y is not None, HAS_GATE=gate is not None, HAS_AFFINE=weight is not None,
        HAS_MOD=shift is not None, NORM=out is not None, BLOCK=block, num_warps=NUM_WARPS)


# The ops. Each has an out-of-place form; the two residual adds also have an in-place one (the float32
# residual stream is 0.67 GB per sample at 480p), declared with `mutates_args` so it stays correct when
# traced. The public functions below pick the form.

@triton_op("wan_engine::layer_norm_modulate", mutates_args=())
def _layer_norm_modulate_op(x: Tensor, eps: float, out_dtype: torch.dtype, weight: Tensor | None,
                            bias: Tensor | None, shift: Tensor | None, scale: Tensor | None) -> Tensor:
    x = x.contiguous()
    out = torch.empty(x.shape, device=x.device, dtype=out_dtype)  # [B, L, C]
    _launch(x, None, None, None, out, eps, weight, bias, shift, scale)
    return out


@triton_op("wan_engine::add_layer_norm", mutates_args=())
def _add_layer_norm_op(x: Tensor, y: Tensor, gate: Tensor | None, eps: float, out_dtype: torch.dtype,
                       weight: Tensor | None, bias: Tensor | None, shift: Tensor | None,
                       scale: Tensor | None) -> tuple[Tensor, Tensor]:
    out_sum = torch.empty_like(x)  # [B, L, C] fp32
    out = torch.empty(x.shape, device=x.device, dtype=out_dtype)  # [B, L, C]
    _launch(x, y, gate, out_sum, out, eps, weight, bias, shift, scale)
    return out_sum, out


@triton_op("wan_engine::add_layer_norm_", mutates_args=("x",))
def _add_layer_norm_inplace_op(x: Tensor, y: Tensor, gate: Tensor | None, eps: float, out_dtype: torch.dtype,
                               weight: Tensor | None, bias: Tensor | None, shift: Tensor | None,
                               scale: Tensor | None) -> Tensor:
    out = torch.empty(x.shape, device=x.device, dtype=out_dtype)  # [B, L, C]
    _launch(x, y, gate, x, out, eps, weight, bias, shift, scale)
    return out


@triton_op("wan_engine::add_gated", mutates_args=())
def _add_gated_op(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    out_sum = torch.empty_like(x)  # [B, L, C] fp32
    _launch(x, y, gate, out_sum, None, 0.0, None, None, None, None)
    return out_sum


@triton_op("wan_engine::add_gated_", mutates_args=("x",))
def _add_gated_inplace_op(x: Tensor, y: Tensor, gate: Tensor) -> None:
    _launch(x, y, gate, x, None, 0.0, None, None, None, None)


def _in_place(inplace: bool) -> bool:
    # Under torch.compile the out-of-place ops are used. AOTAutograd functionalizes an in-place
    # Triton op into "clone x, run the kernel on the clone, copy back", and only inductor's
    # re-inplacing pass takes that extra full pass over x away again; the out-of-place op has no copy
    # to remove, and inductor's buffer planning can reuse x's memory once x is dead. Eager has no
    # planner, so there the caller's permission to overwrite x is taken.
    return inplace and not torch.compiler.is_compiling()


def layer_norm_modulate(x: Tensor, eps: float, out_dtype: torch.dtype, weight: Tensor | None = None,
                        bias: Tensor | None = None, shift: Tensor | None = None,
                        scale: Tensor | None = None) -> Tensor:
    """LayerNorm of x [B, L, C] float32 in float32 (affine if weight/bias are given), then, if
    shift/scale [B, Lt, C] float32 (Lt rows of L / Lt consecutive tokens each) are given,
    `* (1 + scale) + shift`; written once in out_dtype."""
    return _layer_norm_modulate_op(x, eps, out_dtype, weight, bias, shift, scale)


def add_layer_norm(x: Tensor, y: Tensor, gate: Tensor | None, eps: float, out_dtype: torch.dtype,
                   weight: Tensor | None = None, bias: Tensor | None = None, shift: Tensor | None = None,
                   scale: Tensor | None = None, inplace: bool = False) -> tuple[Tensor, Tensor]:
    """s = x + y (* gate) in float32 (x [B, L, C] float32, y [B, L, C] any dtype, gate [B, Lt, C]),
    then `layer_norm_modulate(s, ...)`. Returns (s, normed). inplace: the caller gives x up, so s may be
    written into it (in eager mode it is; under torch.compile s is a new tensor): use the returned s."""
    if _in_place(inplace):
        return x, _add_layer_norm_inplace_op(x, y, gate, eps, out_dtype, weight, bias, shift, scale)
    return _add_layer_norm_op(x, y, gate, eps, out_dtype, weight, bias, shift, scale)


def add_gated_(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    """x += y * gate in place (x [B, L, C] float32, y [B, L, C], gate [B, Lt, C] float32); returns x.
    Always in place, compiled too (a declared mutation)."""
    _add_gated_inplace_op(x, y, gate)
    return x


def add_gated(x: Tensor, y: Tensor, gate: Tensor, inplace: bool = False) -> Tensor:
    """x + y * gate, as `add_gated_` but out of place unless inplace (as in `add_layer_norm`: x may then
    be overwritten; use the returned tensor)."""
    return add_gated_(x, y, gate) if _in_place(inplace) else _add_gated_op(x, y, gate)


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
    rstd = tl.rsqrt(tl.sum(tl.sum(x * x, axis=1), axis=0) / C + tl.cast(eps, tl.float32))  # see FP32_SCALARS
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


@triton_op("wan_engine::rms_norm_rope", mutates_args=())
def _rms_norm_rope_op(x: Tensor, weight: Tensor, eps: float, num_heads: int, cos: Tensor | None,
                      sin: Tensor | None) -> Tensor:
    B, L, C = x.shape
    D = C // num_heads
    if x.stride(-1) != 1 or x.stride(1) != C:
        x = x.contiguous()
    if D & (D - 1):
        raise ValueError(f"head width {D} must be a power of two")
    if cos is not None and (cos.shape != (L, D // 2) or not cos.is_contiguous() or not sin.is_contiguous()):
        raise ValueError(f"rope tables must be contiguous [{L}, {D // 2}], got {tuple(cos.shape)}")
    mem = torch.empty(B, L, num_heads, D, device=x.device, dtype=x.dtype)  # [B, L, N, D]
    n_block = triton.next_power_of_2(num_heads)
    wrap_triton(_rms_norm_rope_kernel)[(B * L,)](
        x, weight, cos, sin, mem, L, C, x.stride(0), x.stride(1), mem.stride(0), mem.stride(1), mem.stride(2),
        D // 2, eps, N=num_heads, D=D, N_BLOCK=n_block, HAS_ROPE=cos is not None,
        num_warps=NUM_WARPS)
    return mem


def rms_norm_rope(x: Tensor, weight: Tensor, eps: float, num_heads: int,
                  rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """RMSNorm over the whole width of x [B, L, C] (16-bit), then RoPE on channel pairs (2i, 2i+1)
    when rope = (cos, sin) [L, C / num_heads / 2] float32 is given. Returns [B, N, L, D] in x's dtype,
    a transposed view of [B, L, N, D] memory: the layout of v and the one SDPA (cuDNN) and
    FlashAttention read fastest here."""
    cos, sin = rope if rope is not None else (None, None)
    return _rms_norm_rope_op(x, weight, eps, num_heads, cos, sin).transpose(1, 2)  # [B, N, L, D]
