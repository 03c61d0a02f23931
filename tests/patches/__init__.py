"""Tests of the performance patches. `tiny_pipeline(preset)` loads a tiny preset once per test process, from a
private cache folder, so a calibration file written elsewhere never changes what these tests see."""
from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import cache

import pytest
import torch

import wan_engine


@cache
def tiny_pipeline(preset: str = "tiny") -> wan_engine.WanPipeline:
    folder = tempfile.mkdtemp(prefix="wanflow-patches-tests-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WAN_CACHE_DIR", folder)
        return wan_engine.load_pipeline(preset, dtype=torch.float32)


def generate(pipe) -> torch.Tensor:
    """A short, seeded run: the latents patch tests compare before, while and after patching."""
    return pipe.generate("a cat", size=(64, 64), frame_num=5, steps=2, seed=0, decode=False).latents
