"""The umT5-XXL text encoder (encoder half only) that turns prompt ids into the DiT's text context.

Parameter names are those of the official ``models_t5_umt5-xxl-enc-bf16.pth`` so the released file
loads strictly without remapping. Numerics follow the official encoder: RMS norms computed in
float32, unscaled attention, a relative-position bias per block, gated tanh-GELU feed-forward.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wan_engine.text import PromptTokenizer

MAX_DISTANCE = 128  # relative distances at or beyond this share the last bucket


@dataclass(frozen=True)
class T5Config:
    vocab_size: int
    dim: int
    dim_attn: int
    dim_ffn: int
    num_heads: int
    num_layers: int
    num_buckets: int = 32
    eps: float = 1e-6

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor]) -> T5Config:
        """Reads every size from key shapes only, so meta or memory-mapped tensors work."""
        try:
            vocab_size, dim = sd["token_embedding.weight"].shape
            dim_attn = sd["blocks.0.attn.q.weight"].shape[0]
            dim_ffn = sd["blocks.0.ffn.fc1.weight"].shape[0]
            num_buckets, num_heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
        except KeyError as e:
            raise ValueError(f"not a umT5 encoder state dict: missing {e}") from None
        num_layers = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        return cls(vocab_size=vocab_size, dim=dim, dim_attn=dim_attn, dim_ffn=dim_ffn,
                   num_heads=num_heads, num_layers=num_layers, num_buckets=num_buckets)


UMT5_XXL = T5Config(vocab_size=256384, dim=4096, dim_attn=4096, dim_ffn=10240, num_heads=64, num_layers=24)


def relative_position_buckets(length: int, num_buckets: int, device: torch.device | None = None) -> Tensor:
    """Bidirectional T5 buckets of key - query distance: half the buckets per direction, the first
    half of those exact, the rest log-spaced up to MAX_DISTANCE. Returns int64 [L, L] (query, key)."""
    pos = torch.arange(length, device=device)
    rel = pos[None, :] - pos[:, None]  # [L, L]
    half = num_buckets // 2
    exact = half // 2
    dist = rel.abs()
    # float32 ops in this order put the log bucket edges where the official encoder has them
    far = exact + (torch.log(dist.clamp_min(exact).float() / exact) / math.log(MAX_DISTANCE / exact)
                   * (half - exact)).long()
    far = far.clamp_max(half - 1)
    return (rel > 0).long() * half + torch.where(dist < exact, dist, far)  # [L, L]


def _clamp_fp16(x: Tensor) -> Tensor:
    # fp16 overflows in the residual stream; the official clamps only when an inf appeared.
    # torch.where keeps that rule without a host sync.
    if x.dtype != torch.float16:
        return x
    limit = torch.finfo(torch.float16).max - 1000
    return torch.where(torch.isinf(x).any(), x.clamp(-limit, limit), x)


class T5RMSNorm(nn.Module):
    """Scale-only RMS norm (no mean subtraction), statistics in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)  # [B, L, C] fp32
        return self.weight * y.to(self.weight.dtype)


class RelativePositionBias(nn.Module):
    def __init__(self, num_buckets: int, num_heads: int):
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, buckets: Tensor) -> Tensor:
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)  # [1, H, L, L]


class T5Attention(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q = nn.Linear(cfg.dim, cfg.dim_attn, bias=False)
        self.k = nn.Linear(cfg.dim, cfg.dim_attn, bias=False)
        self.v = nn.Linear(cfg.dim, cfg.dim_attn, bias=False)
        self.o = nn.Linear(cfg.dim_attn, cfg.dim, bias=False)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        B, L, _ = x.shape
        q = self.q(x).view(B, L, self.num_heads, -1).transpose(1, 2)  # [B, H, L, c]
        k = self.k(x).view(B, L, self.num_heads, -1).transpose(1, 2)  # [B, H, L, c]
        v = self.v(x).view(B, L, self.num_heads, -1).transpose(1, 2)  # [B, H, L, c]
        # T5 folds the 1/sqrt(d) into its initialisation, so the scores are unscaled
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # [B, H, L, c]
        return self.o(out.transpose(1, 2).reshape(B, L, -1))  # [B, L, C]


class T5FeedForward(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(cfg.dim, cfg.dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(cfg.dim, cfg.dim_ffn, bias=False)
        self.fc2 = nn.Linear(cfg.dim_ffn, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))  # [B, L, C]


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.norm1 = T5RMSNorm(cfg.dim, cfg.eps)
        self.attn = T5Attention(cfg)
        self.norm2 = T5RMSNorm(cfg.dim, cfg.eps)
        self.ffn = T5FeedForward(cfg)
        self.pos_embedding = RelativePositionBias(cfg.num_buckets, cfg.num_heads)

    def forward(self, x: Tensor, buckets: Tensor, pad_keys: Tensor) -> Tensor:
        bias = self.pos_embedding(buckets)  # [1, H, L, L]
        bias = bias.masked_fill(pad_keys, torch.finfo(bias.dtype).min)  # [B, H, L, L]
        x = _clamp_fp16(x + self.attn(self.norm1(x), bias))
        return _clamp_fp16(x + self.ffn(self.norm2(x)))  # [B, L, C]


class UMT5Encoder(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(T5Block(config) for _ in range(config.num_layers))
        self.norm = T5RMSNorm(config.dim, config.eps)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """ids, mask: [B, L] (mask 0 on padding). Returns [B, L, dim] in the weights' dtype; padded
        rows are computed (finite) but meaningless."""
        x = self.token_embedding(ids)  # [B, L, C]
        buckets = relative_position_buckets(ids.shape[1], self.config.num_buckets, ids.device)  # [L, L]
        pad_keys = (mask == 0)[:, None, None, :]  # [B, 1, 1, L]
        for block in self.blocks:
            x = block(x, buckets, pad_keys)
        return self.norm(x)  # [B, L, C]


@torch.no_grad()
def encode_prompts(
    encoder: UMT5Encoder, tokenizer: PromptTokenizer, prompts: list[str]
) -> tuple[Tensor, Tensor]:
    """Encodes prompts into (context [B, max_len, dim], lengths [B] int64).

    Row i holds the encoder output for its first lengths[i] tokens (</s> included, as the official
    trims) and exact zeros after. Only the first max_len tokens are run: padded keys are masked, so
    the real rows do not depend on the padding past them.
    """
    ids, mask = tokenizer(prompts)  # [B, text_len] each, on the host
    lengths = mask.sum(dim=1)  # [B]
    max_len = int(lengths.max())  # host tensor: no device sync
    device = encoder.token_embedding.weight.device
    ids = ids[:, :max_len].to(device)  # [B, max_len]
    mask = mask[:, :max_len].to(device)  # [B, max_len]
    out = encoder(ids, mask)  # [B, max_len, C]
    return out.masked_fill(mask[..., None] == 0, 0.0), lengths.to(device)
