"""Whole sampling loops against the official code (10-step T2V and I2V on the tiny fixture, fp32 CPU)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import wan_engine
from tests.conftest import ORACLE_DIR, load_ref, rel_err
from wan_engine.pipeline import i2v_latent_grid


@pytest.fixture(scope="module")
def t2v_pipe():
    return wan_engine.load_pipeline(ORACLE_DIR / "t2v-A14B-tiny", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def i2v_pipe():
    return wan_engine.load_pipeline(ORACLE_DIR / "i2v-A14B-tiny", device="cpu", dtype=torch.float32)


def _guide(run):
    return tuple(run["guide_scale_low_high"])


@pytest.mark.parametrize("name", ["unipc_shift12", "dpm++_shift12", "unipc_shift5"])
def test_t2v_loop_matches_official(t2v_pipe, name):
    run = load_ref("e_t2v_loop.pt")["runs"][name]
    result = t2v_pipe.generate(run["prompt"], run["n_prompt"], size=tuple(run["size_wh"]),
                               frame_num=run["frame_num"], steps=run["sampling_steps"], shift=run["shift"],
                               guide_scale=_guide(run), solver=run["solver"], seed=run["seed"], decode=False)
    assert result.latents.shape == run["final_latents"].shape
    assert rel_err(result.latents, run["final_latents"]) < 1e-4
    video = t2v_pipe.decode_video(result.latents)
    assert rel_err(video, run["video"]) < 1e-4
    expected_experts = ["high_noise" if t >= run["boundary_t"] else "low_noise" for t in run["timesteps"].tolist()]
    assert result.experts_per_step == expected_experts


def test_t2v_noise_is_drawn_like_the_official_code(t2v_pipe):
    """Same seed on the CPU -> the same initial noise as the official pipeline."""
    run = load_ref("e_t2v_loop.pt")["runs"]["unipc_shift12"]
    steps = []
    t2v_pipe.generate(run["prompt"], run["n_prompt"], size=tuple(run["size_wh"]), frame_num=run["frame_num"],
                      steps=1, shift=run["shift"], guide_scale=_guide(run), seed=run["seed"], decode=False,
                      callback=steps.append)
    gen = torch.Generator().manual_seed(run["seed"])
    assert torch.equal(torch.randn(run["noise"].shape, generator=gen), run["noise"])
    assert len(steps) == 1 and steps[0].total == 1 and steps[0].expert == "high_noise"


def _ref_image(run) -> Image.Image:
    return Image.fromarray(run["image"].numpy().astype(np.uint8))


@pytest.mark.parametrize("name", ["unipc_shift5", "dpm++_shift5"])
def test_i2v_loop_matches_official(i2v_pipe, name):
    run = load_ref("e_i2v_loop.pt")["runs"][name]
    image = _ref_image(run)
    # size only sets the area; the image sets the aspect ratio
    assert i2v_latent_grid(tuple(run["image"].shape[:2]), run["max_area"]) == tuple(run["lat_hw"])
    y = i2v_pipe.image_conditioning(image, _area_size(run["max_area"]), run["frame_num"])
    assert rel_err(y[0], run["y"]) < 1e-4
    result = i2v_pipe.generate(run["prompt"], run["n_prompt"], image=image, size=_area_size(run["max_area"]),
                               frame_num=run["frame_num"], steps=run["sampling_steps"], shift=run["shift"],
                               guide_scale=_guide(run), solver=run["solver"], seed=run["seed"], decode=False)
    assert rel_err(result.latents, run["final_latents"]) < 1e-4
    assert rel_err(i2v_pipe.decode_video(result.latents), run["video"]) < 1e-4


def _area_size(max_area: int) -> tuple[int, int]:
    """A (W, H) with the reference's pixel area (the oracle passes max_area = 64 * 96)."""
    assert max_area == 64 * 96
    return (96, 64)


def test_frames_are_uint8_video(t2v_pipe):
    result = t2v_pipe.generate("a red car", size=(96, 64), frame_num=5, steps=2, seed=3)
    assert result.frames.dtype == np.uint8 and result.frames.shape == (5, 64, 96, 3)
    again = t2v_pipe.decode(result.latents)
    assert np.array_equal(again, result.frames)


def test_bad_requests_fail_before_any_compute(t2v_pipe):
    with pytest.raises(ValueError, match="4k\\+1"):
        t2v_pipe.generate("x", size=(64, 64), frame_num=6)
    with pytest.raises(ValueError, match="multiples of 16"):
        t2v_pipe.generate("x", size=(70, 64), frame_num=5)
    with pytest.raises(ValueError, match="unipc"):
        t2v_pipe.generate("x", size=(64, 64), frame_num=5, solver="ddim")
    with pytest.raises(ValueError, match="takes no image"):
        t2v_pipe.generate("x", size=(64, 64), frame_num=5, image=Image.new("RGB", (8, 8)))


def test_cancellation_stops_between_steps(t2v_pipe):
    seen = []
    with pytest.raises(wan_engine.GenerationCancelled):
        t2v_pipe.generate("x", size=(64, 64), frame_num=5, steps=4, callback=seen.append,
                          should_cancel=lambda: len(seen) >= 2)
    assert len(seen) == 2


@pytest.mark.parametrize("cfg_batch", [True, False])
def test_block_stack_hook_sees_every_call(t2v_pipe, cfg_batch):
    calls = []

    def hook(call, tokens, run_blocks):
        calls.append(call)
        assert tokens.shape[0] == len(call.branches)
        return run_blocks(tokens)

    t2v_pipe.cfg_batch = cfg_batch
    try:
        plain = t2v_pipe.generate("x", size=(64, 64), frame_num=5, steps=3, seed=1, decode=False)
        t2v_pipe.block_stack_hook = hook
        hooked = t2v_pipe.generate("x", size=(64, 64), frame_num=5, steps=3, seed=1, decode=False)
    finally:
        t2v_pipe.block_stack_hook = None
        t2v_pipe.cfg_batch = None
    assert torch.equal(plain.latents, hooked.latents)
    if cfg_batch:
        assert [(c.step, c.branches) for c in calls] == [(s, ("cond", "uncond")) for s in range(3)]
    else:
        assert [(c.step, c.branches) for c in calls] == [(s, (b,)) for s in range(3) for b in ("cond", "uncond")]
    assert {c.expert for c in calls} <= {"high_noise", "low_noise"}
    assert len(t2v_pipe.repeated_blocks()) == 2 * 2   # two experts x two tiny blocks


def test_cfg_as_two_forwards_matches_official_and_the_batched_run(t2v_pipe):
    """On the CPU the default is one batch-2 forward per step; two batch-1 forwards give the same loop."""
    run = load_ref("e_t2v_loop.pt")["runs"]["unipc_shift12"]
    kwargs = dict(size=tuple(run["size_wh"]), frame_num=run["frame_num"], steps=run["sampling_steps"],
                  shift=run["shift"], guide_scale=_guide(run), solver=run["solver"], seed=run["seed"], decode=False)
    batched = t2v_pipe.generate(run["prompt"], run["n_prompt"], **kwargs)
    t2v_pipe.cfg_batch = False
    try:
        single = t2v_pipe.generate(run["prompt"], run["n_prompt"], **kwargs)
    finally:
        t2v_pipe.cfg_batch = None
    assert batched.settings["cfg_batch"] and not single.settings["cfg_batch"]
    assert rel_err(single.latents, run["final_latents"]) < 1e-4
    assert rel_err(single.latents, batched.latents) < 1e-4
