"""The Wan2.2 diffusion transformer (DiT): the denoiser of T2V/I2V-A14B (each expert) and TI2V-5B.

Parameter names are those of the official ``WanModel`` so released checkpoints load with
``load_state_dict(strict=True)`` and no remapping. The numerics follow the official code (timestep
sinusoid in float64, float32 time embedding / modulation / residual stream, qk RMSNorm over the
whole width, 3-axis RoPE) but the structure is ours: batched tensors, real cos/sin RoPE tables
cached per grid, modulation rows only for timesteps that differ (one per sample when all tokens share
a timestep, one per latent frame when frames differ, as TI2V's image frame at t = 0 does: never a
[B, L, 6, dim] tensor for them), a ``block_stack_hook`` seam for step-caching patches, and an ``ulysses``
option of the forward that splits the token sequence over a Ulysses group (`wan_engine.ulysses`; the
block-stack hook then sees this rank's tokens).

dtype policy: linear and conv layers run in their weight dtype (bf16 on GPU); norms, the time
embedding, every modulation and the head run in float32; the residual stream stays float32.

Two paths compute the same block. The plain PyTorch one is the reference (CPU, float32 weights). On
CUDA with 16-bit weights the element-wise chains (residual add + LayerNorm + modulate + cast, q/k
RMSNorm + RoPE) run as single Triton kernels (`triton_kernels`) with the same roundings, eager and
under torch.compile alike: they are custom ops that a compiled block keeps as graph nodes. The fast path
is an option of each model, `WanDiT(config, triton=False)` or `model.set_triton(False)`, not a process
switch: benchmarks compare the two paths (compiled, inductor fuses the plain one itself), and the compile
patch keys its artifacts on each block's `triton` attribute.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ulysses import SequenceShard, Ulysses

# The Triton kernels (the CUDA fast path; the CPU path never needs them), imported by `load_triton_kernels` on
# the first CUDA forward or by the compile patch: registering them imports torch's inductor, seconds that a
# process building no CUDA model (a flow run whose GPU work a resident engine does) should not pay.
# None until then, and for good where Triton is not installed.
triton_kernels = None


def load_triton_kernels() -> bool:
    """Import the Triton kernels if Triton is installed; whether they are there (a fact of the install, not a
    switch: the option is each model's `triton`)."""
    global triton_kernels
    if triton_kernels is None:
        try:
            from . import triton_kernels as kernels
        except ImportError:
            return False
        triton_kernels = kernels
    return True

MODEL_TYPES = ("t2v", "i2v", "ti2v")
ROPE_THETA = 10000.0
SINUSOID_BASE = 10000.0

BlockStackHook = Callable[[Tensor, Callable[[Tensor], Tensor]], Tensor]


@dataclass(frozen=True)
class DiTConfig:
    model_type: str
    in_dim: int
    out_dim: int
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    freq_dim: int = 256
    text_len: int = 512
    eps: float = 1e-6
    text_dim: int = 4096
    patch_size: tuple[int, int, int] = (1, 2, 2)

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(f"dim {self.dim} must split into {self.num_heads} heads of even width")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def from_config_json(cls, path) -> DiTConfig:
        """Read an official ``config.json``. Like the official loader (diffusers ``ignore_for_config``),
        text_dim, patch_size, qk_norm, cross_attn_norm and window_size are ignored even when listed."""
        raw = json.loads(Path(path).read_text())
        required = ("model_type", "in_dim", "out_dim", "dim", "ffn_dim", "num_heads", "num_layers")
        missing = [k for k in required if k not in raw]
        if missing:
            raise ValueError(f"{path}: DiT config lacks {', '.join(missing)}")
        optional = ("freq_dim", "text_len", "eps")
        return cls(**{k: raw[k] for k in required + optional if k in raw})

    def flops_per_forward(self, tokens: int, text_tokens: int = 512) -> int:
        """Matmul FLOPs (2 per multiply-add) of one forward of one sample with `tokens` video tokens.

        Counts the linear layers and both attentions; the per-sample time embedding, norms and
        element-wise work are left out (they are negligible at video sizes)."""
        d, L, Lc = self.dim, tokens, text_tokens
        patch_in = self.in_dim * math.prod(self.patch_size)
        per_block = (
            2 * L * 4 * d * d  # self-attention q, k, v, o
            + 4 * L * L * d  # self-attention scores and weighted sum
            + 2 * L * 2 * d * d + 2 * Lc * 2 * d * d  # cross-attention q, o and k, v
            + 4 * L * Lc * d  # cross-attention scores and weighted sum
            + 2 * L * 2 * d * self.ffn_dim  # FFN
        )
        embed = 2 * L * patch_in * d + 2 * self.text_len * (self.text_dim * d + d * d)
        head = 2 * L * d * self.out_dim * math.prod(self.patch_size)
        return embed + self.num_layers * per_block + head


def token_rows(x: Tensor, rows: int) -> Tensor:
    """[B, L, C] -> the view [B, rows, L / rows, C]: the tokens that share each row of a [B, rows, C]
    modulation (rows 1: all of them; rows L: one each)."""
    return x.unflatten(1, (rows, -1))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x [B, L, C] * (1 + scale) + shift, with shift/scale [B, Lt, C] rows of L / Lt consecutive tokens."""
    rows = shift.shape[1]
    return (token_rows(x, rows) * (1 + scale[:, :, None]) + shift[:, :, None]).flatten(1, 2)


def add_gated(x: Tensor, y: Tensor, gate: Tensor, inplace: bool = False) -> Tensor:
    """x + y * gate in float32 (x [B, L, C], gate [B, Lt, C] rows as in `modulate`); in place into x when
    `inplace` (x must be contiguous then)."""
    rows = gate.shape[1]
    if inplace:
        token_rows(x, rows).addcmul_(token_rows(y, rows), gate[:, :, None])
        return x
    return torch.addcmul(token_rows(x, rows), token_rows(y, rows), gate[:, :, None]).flatten(1, 2)


def use_triton(x: Tensor, weight: Tensor) -> bool:
    """Whether the Triton kernels can take this call: installed, CUDA and 16-bit weights, eager or compiled.
    A block takes them when its `triton` option is also on."""
    if not (x.is_cuda and weight.dtype in (torch.bfloat16, torch.float16)):
        return False
    if triton_kernels is None and not torch.compiler.is_compiling():  # a compiled block's patch loaded them first
        load_triton_kernels()
    return triton_kernels is not None


def timestep_sinusoid(t: Tensor, dim: int) -> Tensor:
    """[cos | sin] embedding of timesteps [...] -> [..., dim] float32, computed in float64 as the
    official code does (int64 timesteps near 1000 lose digits in float32)."""
    half = dim // 2
    freqs = SINUSOID_BASE ** (-torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.to(torch.float64)[..., None] * freqs  # [..., half]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float()  # [..., dim]


def timestep_rows(t: Tensor, frames: int) -> Tensor:
    """Per-token timesteps [B, L] (L = frames * tokens per frame) reduced to the rows that differ: [B, 1] when
    every token shares one, [B, frames] when each latent frame does, else unchanged."""
    per_frame = t.unflatten(1, (frames, -1))  # [B, f, hw]
    if bool((per_frame == per_frame[:, :1, :1]).all()):
        return t[:, :1]
    if bool((per_frame == per_frame[:, :, :1]).all()):
        return per_frame[:, :, 0]
    return t


def rope_tables(grid: tuple[int, int, int], head_dim: int) -> tuple[Tensor, Tensor]:
    """Real RoPE tables for tokens in row-major (f, h, w) order: cos, sin [L, head_dim // 2] float32.

    The head_dim/2 rotation frequencies are split over the (F, H, W) axes as [c - 2(c//3), c//3, c//3];
    each axis has its own frequency ladder theta^(-2i/d_axis). Angles are formed in float64 so the
    tables equal the official complex128 ones rounded once to float32."""
    c = head_dim // 2
    axis_angles = []
    for size, n in zip(grid, (c - 2 * (c // 3), c // 3, c // 3), strict=True):
        inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, 2 * n, 2, dtype=torch.float64) / (2 * n))
        axis_angles.append(torch.outer(torch.arange(size, dtype=torch.float64), inv_freq))  # [size, n]
    f, h, w = grid
    angles = torch.cat([
        axis_angles[0][:, None, None].expand(f, h, w, -1),
        axis_angles[1][None, :, None].expand(f, h, w, -1),
        axis_angles[2][None, None, :].expand(f, h, w, -1),
    ], dim=-1).reshape(f * h * w, c)  # [L, c]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) of x [B, N, L, D] by the angles of cos/sin [L, D/2];
    float32 result."""
    real, imag = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # [B, N, L, D/2] each
    return torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1).flatten(-2)


class FP32Linear(nn.Linear):
    """A Linear that always computes in float32, whatever its weight dtype: used for the time
    embedding, the time projection and the head, which the official model runs in float32."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.float(), self.weight.float(), self.bias.float())


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (affine weights upcast); returns float32."""

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32, then scale in the input dtype: the official order of roundings.
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class Attention(nn.Module):
    """Multi-head attention of x over itself (self-attention, with RoPE) or over a context
    (cross-attention). q/k RMSNorm spans the whole width, before the split into heads."""

    # The attention kernel, q, k, v [B, N, L, D] -> [B, N, L, D]: a seam the attention-backend patch
    # swaps per instance. On the Triton path q, k and v are transposed views of [B, L, N, D] memory.
    attention_fn = staticmethod(F.scaled_dot_product_attention)

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def forward(self, x: Tensor, context: Tensor | None = None, rope: tuple[Tensor, Tensor] | None = None,
                triton: bool = False, shard: SequenceShard | None = None) -> Tensor:
        """`triton`: q/k RMSNorm + RoPE as one Triton kernel (the block decides, see `DiTBlock.triton`).
        `shard`: x holds this rank's tokens of a sequence split over a Ulysses group (self-attention only)."""
        dtype = self.q.weight.dtype
        x = x.to(dtype)
        kv = x if context is None else context.to(dtype)
        n = self.num_heads
        if triton:
            q = triton_kernels.rms_norm_rope(self.q(x), self.norm_q.weight, self.norm_q.eps, n, rope)  # [B, N, L, D]
            k = triton_kernels.rms_norm_rope(self.k(kv), self.norm_k.weight, self.norm_k.eps, n, rope)  # [B, N, Lk, D]
        else:
            q = self.norm_q(self.q(x)).unflatten(-1, (n, -1)).transpose(1, 2)  # [B, N, L, D]
            k = self.norm_k(self.k(kv)).unflatten(-1, (n, -1)).transpose(1, 2)  # [B, N, Lk, D]
            if rope is not None:
                q, k = apply_rope(q, *rope).to(dtype), apply_rope(k, *rope).to(dtype)
        v = self.v(kv).unflatten(-1, (n, -1)).transpose(1, 2)  # [B, N, Lk, D]
        out = self.attention_fn(q, k, v) if shard is None else shard.attend(self.attention_fn, q, k, v)  # [B, N, L, D]
        return self.o(out.transpose(1, 2).flatten(2))  # [B, L, dim]


class DiTBlock(nn.Module):
    """Modulated self-attention, unmodulated cross-attention to the text, modulated FFN; each
    branch adds into the float32 residual stream (the two modulated ones through a gate).

    `triton`: take the Triton kernels where they can run (`use_triton`); off, always the plain path."""

    def __init__(self, cfg: DiTConfig, triton: bool = True):
        super().__init__()
        self.triton = triton
        dim = cfg.dim
        self.norm1 = FP32LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = Attention(dim, cfg.num_heads, cfg.eps)
        self.norm3 = FP32LayerNorm(dim, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = Attention(dim, cfg.num_heads, cfg.eps)
        self.norm2 = FP32LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x: Tensor, mod: Tensor, context: Tensor, rope: tuple[Tensor, Tensor],
                shard: SequenceShard | None = None) -> Tensor:
        """x [B, L, dim] fp32; mod [B, Lt, 6, dim] fp32, each row for L / Lt consecutive tokens (Lt 1: a
        shared timestep; the latent frames; L: per token);
        context [B, text_len, dim]; rope cos/sin [L, head_dim/2]. Returns [B, L, dim] fp32.
        With `shard`, L is this rank's slice of a sequence split over a Ulysses group."""
        shift_sa, scale_sa, gate_sa, shift_ffn, scale_ffn, gate_ffn = (
            self.modulation.float() + mod).unbind(2)  # 6 x [B, Lt, dim]
        if self.triton and use_triton(x, self.ffn[0].weight):
            return self._forward_fused(x, (shift_sa, scale_sa, gate_sa, shift_ffn, scale_ffn, gate_ffn),
                                       context, rope, shard)
        dtype = self.ffn[0].weight.dtype
        y = self.self_attn(modulate(self.norm1(x), shift_sa, scale_sa).to(dtype), rope=rope, shard=shard)  # [B, L, dim]
        # A new tensor: the caller's x (a step cache may keep it) is never written. The residual
        # adds take the branch output in its own dtype (one kernel, float32 arithmetic).
        x = add_gated(x, y, gate_sa)  # [B, L, dim] fp32
        x.add_(self.cross_attn(self.norm3(x).to(dtype), context))
        y = self.ffn(modulate(self.norm2(x), shift_ffn, scale_ffn).to(dtype))  # [B, L, dim]
        return add_gated(x, y, gate_ffn, inplace=True)

    def _forward_fused(self, x: Tensor, mod: tuple[Tensor, ...], context: Tensor,
                       rope: tuple[Tensor, Tensor], shard: SequenceShard | None) -> Tensor:
        """The same block with each residual add fused into the norm that follows it (Triton)."""
        shift_sa, scale_sa, gate_sa, shift_ffn, scale_ffn, gate_ffn = mod
        K, dtype = triton_kernels, self.ffn[0].weight.dtype
        h = K.layer_norm_modulate(x, self.norm1.eps, dtype, shift=shift_sa, scale=scale_sa)  # [B, L, dim]
        y = self.self_attn(h, rope=rope, triton=True, shard=shard)  # [B, L, dim]
        x, h = K.add_layer_norm(x, y, gate_sa, self.norm3.eps, dtype,
                                self.norm3.weight, self.norm3.bias)  # a new x [B, L, dim] fp32; h [B, L, dim]
        x, h = K.add_layer_norm(x, self.cross_attn(h, context, triton=True), None, self.norm2.eps, dtype,
                                shift=shift_ffn, scale=scale_ffn, inplace=True)
        return K.add_gated(x, self._ffn_gelu_epilogue(h), gate_ffn, inplace=True)

    def _ffn_gelu_epilogue(self, h: Tensor) -> Tensor:
        """The FFN with its tanh GELU applied in the first GEMM's epilogue (cuBLASLt, on the float32
        accumulator), which saves a read and a write of the [B, L, ffn_dim] activation (about 0.3 ms per
        block at 480p on an H200). One bf16 rounding instead of two, so within bf16 rounding of `self.ffn`."""
        up, down = self.ffn[0], self.ffn[2]
        a = torch._addmm_activation(up.bias, h.flatten(0, 1), up.weight.t(), use_gelu=True)  # [B*L, ffn_dim]
        return down(a.unflatten(0, h.shape[:2]))  # [B, L, dim]


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = FP32LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = FP32Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        """x [B, L, dim], e (time embedding, not its projection) [B, Lt, dim] -> [B, L, p*q*r*out_dim]."""
        shift, scale = (self.modulation.float() + e.unsqueeze(2)).unbind(2)  # 2 x [B, Lt, dim]
        return self.head(modulate(self.norm(x), shift, scale))


class WanDiT(nn.Module):
    """`triton`: whether the blocks take the Triton kernels where they can run (see the module docstring)."""

    def __init__(self, config: DiTConfig, triton: bool = True):
        super().__init__()
        self.config = cfg = config
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size,
                                         stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(FP32Linear(cfg.freq_dim, cfg.dim), nn.SiLU(),
                                            FP32Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), FP32Linear(cfg.dim, 6 * cfg.dim))
        self.blocks = nn.ModuleList(DiTBlock(cfg, triton) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        # Not buffers: a meta-built model must load with assign=True, and .to(bf16) must not touch them.
        self._rope_cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    def set_triton(self, on: bool) -> None:
        """Turn the Triton kernels on or off for every block (a compiled block recompiles or loads anew)."""
        for block in self.blocks:
            block.triton = on

    def rope(self, grid: tuple[int, int, int], device: torch.device) -> tuple[Tensor, Tensor]:
        key = (grid, device)
        if key not in self._rope_cache:
            cos, sin = rope_tables(grid, self.config.head_dim)
            self._rope_cache[key] = (cos.to(device), sin.to(device))
        return self._rope_cache[key]

    def forward(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor | None = None,
                block_stack_hook: BlockStackHook | None = None, ulysses: Ulysses | None = None) -> Tensor:
        """x [B, C_x, F, H, W] latents; y optional [B, C_y, F, H, W] conditioning (I2V: mask + image
        latent), concatenated on channels; t [B] (one timestep per sample), [B, f] (one per latent frame:
        what the engine passes for TI2V) or [B, L] (per token, the official form; reduced to the rows that
        differ, which costs a host sync);
        context [B, Lc, text_dim], Lc <= text_len, rows past a prompt's end zero.
        block_stack_hook(tokens, run_blocks) replaces the call run_blocks(tokens) of the block stack.
        `ulysses`: split the tokens over this Ulysses group (every rank passes the same inputs and gets the
        whole prediction); the block stack and its hook then run on this rank's tokens.
        Returns the prediction [B, out_dim, F, H, W] float32."""
        cfg = self.config
        if y is not None:
            x = torch.cat([x, y], dim=1)  # [B, in_dim, F, H, W]
        self._check_inputs(x, t, context)
        B, _, F_, H_, W_ = x.shape
        pf, ph, pw = cfg.patch_size
        grid = (F_ // pf, H_ // ph, W_ // pw)

        x = self.patch_embedding(x.to(self.patch_embedding.weight.dtype))  # [B, dim, f, h, w]
        # [B, L, dim], row-major (f, h, w); contiguous so every pass over the residual stream is dense
        x = x.flatten(2).transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format, copy=True)

        # One modulation row per distinct run of tokens, broadcast over its tokens (see `modulate`).
        t = t[:, None] if t.dim() == 1 else t  # [B, Lt]
        if t.shape[1] == math.prod(grid) and t.shape[1] > grid[0]:
            t = timestep_rows(t, grid[0])  # [B, 1 or f or L]
        e = self.time_embedding(timestep_sinusoid(t, cfg.freq_dim))  # [B, Lt, dim] fp32
        mod = self.time_projection(e).unflatten(-1, (6, cfg.dim))  # [B, Lt, 6, dim] fp32

        # Official behaviour: pad with zeros to text_len BEFORE the embedding MLP, and attend to the
        # padded rows unmasked (they become the constant text_embedding(0)).
        context = F.pad(context, (0, 0, 0, cfg.text_len - context.shape[1]))  # [B, text_len, text_dim]
        context = self.text_embedding(context.to(self.text_embedding[0].weight.dtype))  # [B, text_len, dim]

        rope = self.rope(grid, x.device)
        shard = None if ulysses is None else ulysses.shard(x.shape[1])
        if shard is not None:   # this rank's tokens, with their own positions' RoPE rows and modulation
            x, rope = shard.scatter(x), (shard.scatter(rope[0], 0), shard.scatter(rope[1], 0))  # [B, Ls, dim]
            if e.shape[1] > 1:   # the rows of this rank's tokens (its padding takes the last one)
                tokens = math.prod(grid)
                first = torch.arange(shard.local, device=x.device) + shard.rank * shard.local
                rows = first.clamp_(max=tokens - 1) // (tokens // e.shape[1])
                e, mod = e[:, rows], mod[:, rows]

        def run_blocks(tokens: Tensor) -> Tensor:
            for block in self.blocks:
                tokens = block(tokens, mod, context, rope, shard)
            return tokens

        x = block_stack_hook(x, run_blocks) if block_stack_hook is not None else run_blocks(x)
        x = self.head(x, e)  # [B, L, p*q*r*out_dim] fp32 (L: this rank's tokens when split)
        if shard is not None:
            x = shard.gather(x)  # [B, L, p*q*r*out_dim]
        return self.unpatchify(x, grid)

    def unpatchify(self, x: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """[B, L, p*q*r*C] with features ordered (p, q, r, C), C fastest -> [B, C, f*p, h*q, w*r]."""
        f, h, w = grid
        p, q, r = self.config.patch_size
        x = x.reshape(x.shape[0], f, h, w, p, q, r, self.config.out_dim)  # [B, f, h, w, p, q, r, C]
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, f, p, h, q, w, r]
        return x.reshape(x.shape[0], self.config.out_dim, f * p, h * q, w * r)

    def _check_inputs(self, x: Tensor, t: Tensor, context: Tensor) -> None:
        cfg = self.config
        if x.dim() != 5 or x.shape[1] != cfg.in_dim:
            raise ValueError(f"expected latents (+ y) [B, {cfg.in_dim}, F, H, W], got {tuple(x.shape)}")
        (F_, H_, W_), (pf, ph, pw) = x.shape[2:], cfg.patch_size
        if F_ % pf or H_ % ph or W_ % pw:
            raise ValueError(f"latent grid {(F_, H_, W_)} is not divisible by patch {cfg.patch_size}")
        tokens = (F_ // pf) * (H_ // ph) * (W_ // pw)
        if t.shape not in ((x.shape[0],), (x.shape[0], F_ // pf), (x.shape[0], tokens)):
            raise ValueError(f"t must be [B], [B, f] or [B, L] = [{x.shape[0]}, {F_ // pf}] or "
                             f"[{x.shape[0]}, {tokens}], got {tuple(t.shape)}")
        if context.dim() != 3 or context.shape[1] > cfg.text_len or context.shape[2] != cfg.text_dim:
            raise ValueError(f"context must be [B, <= {cfg.text_len}, {cfg.text_dim}], "
                             f"got {tuple(context.shape)}")
