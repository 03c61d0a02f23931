"""Whole sampling loops against the official code (10-step T2V and I2V on the tiny fixture, fp32 CPU)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import wan_engine
from tests.conftest import ORACLE_DIR, load_ref, rel_err
from wan_engine import RunHook


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
    """Same seed on the CPU -> the pipeline's own draw is the official pipeline's initial noise."""
    run = load_ref("e_t2v_loop.pt")["runs"]["unipc_shift12"]
    plan = t2v_pipe.plan(size=tuple(run["size_wh"]), frame_num=run["frame_num"], seed=run["seed"])
    assert torch.equal(plan.noise, run["noise"])
    other = t2v_pipe.plan(size=tuple(run["size_wh"]), frame_num=run["frame_num"], seed=run["seed"] + 1)
    assert not torch.equal(other.noise, plan.noise)


def test_plan_holds_what_the_run_decides(t2v_pipe):
    plan = t2v_pipe.plan(size=(96, 64), frame_num=9, steps=6, shift=12.0, guide_scale=(3.0, 4.0), seed=5)
    assert (plan.grid.shape, plan.grid.tokens) == ((3, 8, 12), 3 * 4 * 6)
    assert plan.noise.shape == (16, 3, 8, 12) and plan.pixel_size == (96, 64)
    s = plan.steps
    assert s.steps == 6 and len(s.sigmas) == 7 and s.sigmas[-1] == 0 and s.timesteps[0] == 999
    assert s.experts == tuple("high_noise" if t >= 875 else "low_noise" for t in s.timesteps)
    assert s.guide_scales == tuple(4.0 if e == "high_noise" else 3.0 for e in s.experts)
    assert plan.cfg == "batched"    # the CPU default
    assert t2v_pipe.plan(size=(64, 64), frame_num=5, guide_scale=1.0).cfg == "none"


def test_generate_is_plan_encode_sample_decode(t2v_pipe):
    steps = []
    result = t2v_pipe.generate("a red car", "blurry", size=(64, 64), frame_num=5, steps=3, seed=2,
                               callback=steps.append)
    plan = t2v_pipe.plan(size=(64, 64), frame_num=5, steps=3, seed=2)
    text = t2v_pipe.encode_prompt(plan, "a red car", "blurry")
    sampled = t2v_pipe.sample(plan, text.context, t2v_pipe.encode_conditioning(plan))
    assert torch.equal(sampled.latents[0], result.latents)
    assert np.array_equal(t2v_pipe.decode(sampled.latents[0]), result.frames)
    assert [s.step for s in steps] == [0, 1, 2] and steps[0].total == 3 and steps[0].expert == "high_noise"
    assert sampled.experts_per_step == result.experts_per_step


def test_guide_scale_one_runs_one_forward_per_step_without_a_negative_prompt(t2v_pipe):
    calls = []

    class Record(RunHook):
        def block_stack(self, call, tokens, run_blocks):
            calls.append(call.branches)
            return run_blocks(tokens)

    hook = Record()
    t2v_pipe.hooks.register(hook)
    try:
        result = t2v_pipe.generate("a red car", size=(64, 64), frame_num=5, steps=3, guide_scale=1.0, decode=False)
    finally:
        t2v_pipe.hooks.remove(hook)
    assert calls == [("cond",)] * 3
    assert list(result.prompt_tokens) == ["prompt"] and result.settings["cfg"] == "none"


def _ref_image(run) -> Image.Image:
    return Image.fromarray(run["image"].numpy().astype(np.uint8))


@pytest.mark.parametrize("name", ["unipc_shift5", "dpm++_shift5"])
def test_i2v_loop_matches_official(i2v_pipe, name):
    run = load_ref("e_i2v_loop.pt")["runs"][name]
    image = _ref_image(run)
    # size only sets the area; the image sets the aspect ratio
    plan = i2v_pipe.plan(image=image, size=_area_size(run["max_area"]), frame_num=run["frame_num"])
    assert (plan.grid.height, plan.grid.width) == tuple(run["lat_hw"])
    y = i2v_pipe.encode_conditioning(plan)
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


def test_a_cancelled_run_still_ends_for_its_hooks(t2v_pipe):
    ended = []

    class Record(RunHook):
        def end_run(self):
            ended.append(True)

    hook = Record()
    t2v_pipe.hooks.register(hook)
    try:
        with pytest.raises(wan_engine.GenerationCancelled):
            t2v_pipe.generate("x", size=(64, 64), frame_num=5, steps=2, should_cancel=lambda: True)
    finally:
        t2v_pipe.hooks.remove(hook)
    assert ended == [True]


@pytest.mark.parametrize("cfg_batch", [True, False])
def test_block_stack_hook_sees_every_call(t2v_pipe, cfg_batch):
    calls, runs = [], []

    class Record(RunHook):
        def begin_run(self, plan):
            runs.append(("begin", plan.steps.steps, plan.cfg))

        def block_stack(self, call, tokens, run_blocks):
            calls.append(call)
            assert tokens.shape[0] == len(call.branches)
            return run_blocks(tokens)

        def end_run(self):
            runs.append(("end",))

    hook = Record()
    t2v_pipe.cfg_batch = cfg_batch
    try:
        plain = t2v_pipe.generate("x", size=(64, 64), frame_num=5, steps=3, seed=1, decode=False)
        t2v_pipe.hooks.register(hook)
        hooked = t2v_pipe.generate("x", size=(64, 64), frame_num=5, steps=3, seed=1, decode=False)
    finally:
        t2v_pipe.hooks.remove(hook)
        t2v_pipe.cfg_batch = None
    assert torch.equal(plain.latents, hooked.latents)
    assert runs == [("begin", 3, "batched" if cfg_batch else "sequential"), ("end",)]
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
