"""Tests of the performance patches. `tiny_pipeline()` loads the tiny preset once per test process, from a
private cache folder, so a calibration file written elsewhere never changes what these tests see."""
from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import cache

import pytest
import torch

import wan_engine
from wan_engine import ModelSpec

# TI2V-5B as released (one DiT, no preset yet): what its step-cache schedules are planned from
TI2V_SPEC = ModelSpec(name="ti2v-5B", task="ti2v", experts=(".",), vae_file="Wan2.2_VAE.pth",
                      sizes=((1280, 704), (704, 1280)), fps=24, steps=50, shift=5.0, guide_scale=(5.0, 5.0),
                      boundary=None, frame_num=121, vae_stride=(4, 16, 16), z_dim=48)


@cache
def tiny_pipeline() -> wan_engine.WanPipeline:
    folder = tempfile.mkdtemp(prefix="wanflow-patches-tests-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WAN_CACHE_DIR", folder)
        return wan_engine.load_pipeline("tiny", dtype=torch.float32)


def generate(pipe) -> torch.Tensor:
    """A short, seeded run: the latents patch tests compare before, while and after patching."""
    return pipe.generate("a cat", size=(64, 64), frame_num=5, steps=2, seed=0, decode=False).latents
