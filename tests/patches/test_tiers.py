"""Tiers: what each applies on this machine (and why something is off), composition order, exact removal."""
from __future__ import annotations

import pytest
import torch

import patches.tiers as tiers
from patches.base import PatchHandle
from patches.tiers import TierOptions, apply_tier, describe_tiers, format_tiers
from tests.patches import generate
from wan_engine import Denoiser


def entries(plan) -> dict:
    return {p.name: p for p in plan}


def test_cpu_description_says_why_gpu_parts_are_off():
    described = describe_tiers("cpu")
    assert list(described) == ["quality", "balanced", "speed"]
    quality, balanced, speed = (entries(described[t]) for t in described)
    assert not quality["precision"].on and "no CUDA GPU" in quality["precision"].detail
    assert "torch SDPA" in quality["attention"].detail and "compile" not in quality
    assert not balanced["compile"].on and "no CUDA GPU" in balanced["compile"].detail
    assert "I2V only" in balanced["magcache"].detail
    assert speed["teacache"].on and "0.25" in speed["teacache"].detail
    text = format_tiers(described)
    assert "balanced:" in text and "compile" in text and "off" in text


def test_task_decides_the_step_caches():
    assert "magcache" not in entries(tiers.plan_tier("balanced", "cpu", "t2v"))
    i2v = entries(tiers.plan_tier("balanced", "cpu", "i2v"))
    assert "magcache" in i2v
    speed = entries(tiers.plan_tier("speed", "cpu", "t2v", TierOptions(step_cache="magcache")))
    assert "magcache" in speed and "teacache" not in speed


def test_patches_apply_in_order_and_remove_last_first(pipe, monkeypatch):
    events = []

    def recorder(name):
        def apply(pipe, cfg=None):
            events.append(f"+{name}")
            return PatchHandle(name, lambda: events.append(f"-{name}"))
        return apply

    for name in ("precision", "attention", "compile", "vae_decode"):
        monkeypatch.setattr(tiers, f"apply_{name}", recorder(name))
    monkeypatch.setattr(tiers, "tf32_status", lambda device: (True, "test"))
    monkeypatch.setattr(tiers, "compile_status", lambda device, backend: (True, "test"))
    monkeypatch.setattr(tiers, "vae_decode_status", lambda device: (True, "test"))
    handle = apply_tier(pipe, "balanced")
    assert events == ["+precision", "+attention", "+compile", "+vae_decode"]
    handle.remove()
    assert events[4:] == ["-vae_decode", "-compile", "-attention", "-precision"]
    assert [p["name"] for p in handle.summary()["patches"]] == ["precision", "attention", "resident", "compile",
                                                                "vae_decode"]



def test_vae_decode_is_off_for_a_pipeline_without_vae(pipe, monkeypatch):
    """`wanflow bench` holds a bare Denoiser: a compiled tier must still apply there (the VAE patch is off)."""
    monkeypatch.setattr(tiers, "vae_decode_status", lambda device: (True, "test"))
    denoiser = Denoiser(pipe.spec, pipe.experts, pipe.device, pipe.dtype, pipe.memory)
    entry = next(p for p in tiers.plan_tier("balanced", pipe.device, pipe=denoiser) if p.name == "vae_decode")
    assert (entry.on, entry.detail) == (False, "this pipeline has no VAE")
    handle = apply_tier(denoiser, "balanced", TierOptions(compile_backend="eager"))
    handle.remove()


@pytest.mark.parametrize("tier", ["quality", "balanced", "speed"])
def test_apply_then_remove_is_bit_identical(pipe, reference, tier):
    handle = apply_tier(pipe, tier, TierOptions(compile_backend="eager", threshold=0.5), steps=2)
    patched = generate(pipe)
    if tier != "speed":
        assert torch.equal(patched, reference)
    handle.remove()
    assert len(pipe.hooks) == 0
    assert torch.equal(generate(pipe), reference)


def test_speed_tier_hands_out_its_step_cache(pipe):
    with apply_tier(pipe, "speed", TierOptions(compile_backend="eager"), steps=2) as handle:
        assert list(pipe.hooks) == [handle.step_cache]
        assert [name for name, _ in handle.applied][-1] == "teacache"
