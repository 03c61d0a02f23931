"""The VAE decode precision patch: applied through `decode_dtype`, removed exactly, on only where it helps."""
from __future__ import annotations

import torch

from patches.tiers import plan_tier
from patches.vae_decode import VaeDecodeConfig, apply_vae_decode, vae_decode_status
from tests.patches import tiny_pipeline


def test_apply_sets_decode_dtype_and_remove_restores_it():
    pipe = tiny_pipeline()
    assert "decode_dtype" in vars(pipe.vae) and pipe.vae.decode_dtype is None
    z = torch.randn(16, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    before = pipe.decode_video(z)
    handle = apply_vae_decode(pipe, VaeDecodeConfig(torch.bfloat16))
    assert pipe.vae.decode_dtype is torch.bfloat16 and "bfloat16" in handle.detail
    handle.remove()
    assert pipe.vae.decode_dtype is None
    assert torch.equal(pipe.decode_video(z), before)


def test_only_gpu_tiers_past_quality_decode_in_bf16():
    on, why = vae_decode_status("cpu")
    assert not on and "CPU" in why
    assert [p.name for p in plan_tier("quality", "cpu")].count("vae_decode") == 0
    entry = next(p for p in plan_tier("balanced", "cpu") if p.name == "vae_decode")
    assert not entry.on and entry.apply is None
    assert vae_decode_status("cuda")[0]
