"""VAE decode precision patch: decode with bf16 convolutions (norms and residual stream stay float32).

The official pipeline decodes in float32; on an H200 the bf16 path decodes 81 frames in 0.44x the
official time within 1.02e-2 of its output (docs/benchmarks.md, "Issue 4: VAE decode"). It acts
through the VAE's published `decode_dtype` attribute. On the CPU bf16 convolutions are slower than
float32, so the tiers leave it off there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import PatchHandle, swap_attr


@dataclass(frozen=True)
class VaeDecodeConfig:
    dtype: torch.dtype = torch.bfloat16


def vae_decode_status(device: torch.device | str) -> tuple[bool, str]:
    """Whether the reduced-precision decode helps on `device`, and why (not)."""
    if torch.device(device).type != "cuda":
        return False, "no CUDA GPU (bf16 convolutions are slower than float32 on the CPU)"
    return True, "VAE decode with bf16 convolutions, float32 norms and residuals"


def apply_vae_decode(pipe, cfg: VaeDecodeConfig | None = None) -> PatchHandle:
    cfg = cfg or VaeDecodeConfig()
    undo = swap_attr(pipe.vae, "decode_dtype", cfg.dtype)
    return PatchHandle("vae_decode", undo, f"VAE decode in {str(cfg.dtype).removeprefix('torch.')}")
