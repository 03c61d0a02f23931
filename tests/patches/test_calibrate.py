"""Calibration: one run records MagCache ratios and TeaCache fit data next to the checkpoint, and the
caches then prefer them over the published figures."""
from __future__ import annotations

import copy
import json

import pytest

from patches.calibrate import calibrate
from patches.magcache import MagCacheConfig, apply_magcache, magcache_schedule
from patches.step_cache import CALIBRATION_FILE, find_calibration, load_calibrations
from patches.teacache import TeaCacheConfig, apply_teacache
from tests.patches import tiny_pipeline
from wan_engine import RunHook, plan_steps
from wan_engine.hooks import HookRegistry

RUN = dict(size=(64, 64), frame_num=5, seed=1)


@pytest.fixture
def pipe(tmp_path):
    """The tiny pipeline with its own checkpoint folder for calibration files (models shared)."""
    pipe = copy.copy(tiny_pipeline())
    pipe.checkpoint_dir = tmp_path
    pipe.hooks = HookRegistry()
    return pipe


def test_calibration_is_written_next_to_the_checkpoint_and_preferred(pipe, tmp_path):
    residuals = {}

    class Capture(RunHook):  # an earlier hook: calibration wraps it
        def block_stack(self, call, tokens, run_blocks):
            out = run_blocks(tokens)
            for i, branch in enumerate(call.branches):
                residuals[call.step, branch] = (out - tokens)[i]  # [L, C]
            return out

    capture = Capture()
    pipe.hooks.register(capture)
    result = calibrate(pipe, "a red car in the city", steps=8, **RUN)
    assert list(pipe.hooks) == [capture]
    assert result.path == tmp_path / CALIBRATION_FILE and result.path.is_file()
    entry = json.loads(result.path.read_text())["entries"][0]
    assert entry == result.entry and (entry["steps"], entry["shift"], entry["solver"]) == (8, 12.0, "unipc")

    # MagCache's ratio: mean over tokens of |residual| / |previous residual of the branch|, in the published
    # layout (interleaved cond/uncond from step 1)
    ratios = result.magcache_ratios
    assert len(ratios) == 2 * (8 - 1)
    for step, branch in [(1, "cond"), (1, "uncond"), (7, "uncond")]:
        cur, prev = residuals[step, branch], residuals[step - 1, branch]
        expected = (cur.norm(dim=-1) / prev.norm(dim=-1)).mean().item()
        assert ratios[2 * (step - 1) + (branch == "uncond")] == pytest.approx(expected, abs=1e-5)
    for signal in ("e", "e0"):
        fit = entry["teacache"][signal]
        assert len(fit["x"]) == len(fit["y"]) == 2 * 6 and len(fit["coefficients"]) == 5  # no y at phase starts

    plan = plan_steps(pipe.spec, 8)
    handle = apply_magcache(pipe, MagCacheConfig(threshold=0.3, retention_ratio=0.0), steps=8)
    try:
        schedule = handle.schedule
        assert schedule.settings["ratios"].startswith(f"calibration {result.path}")
        assert schedule.compute == magcache_schedule(plan, ratios, 0.3, 2, 0.0).compute
    finally:
        handle.remove()
    handle = apply_magcache(pipe, MagCacheConfig(use_calibration=False), steps=8)
    assert handle.schedule.settings["ratios"] == "published wan2.2/t2v-A14B"
    handle.remove()
    handle = apply_teacache(pipe, TeaCacheConfig(use_calibration=True), steps=8)
    assert handle.schedule.settings["coefficients"].startswith("calibration")
    handle.remove()
    assert list(pipe.hooks) == [capture]


def test_entries_are_kept_per_setting_and_the_closest_is_chosen(pipe, tmp_path):
    calibrate(pipe, "a red car", steps=3, **RUN)
    calibrate(pipe, "a red car", steps=2, **RUN)
    calibrate(pipe, "a dog", steps=3, **RUN)  # replaces the 3-step entry
    entries = load_calibrations(tmp_path / CALIBRATION_FILE)
    assert [(e["steps"], e["prompt"]) for e in entries] == [(2, "a red car"), (3, "a dog")]
    assert find_calibration(tmp_path, plan_steps(pipe.spec, 2))[1]["steps"] == 2
    assert find_calibration(tmp_path, plan_steps(pipe.spec, 40))[1]["steps"] == 3  # newest, resampled
    handle = apply_magcache(pipe, steps=40)  # 40 steps from a 3-step curve: nearest neighbour
    assert handle.schedule.settings["ratios"].endswith("(3 steps)")
    handle.remove()


def test_calibration_refuses_to_run_through_a_step_cache(pipe, tmp_path):
    handle = apply_magcache(pipe)
    try:
        with pytest.raises(ValueError, match="remove it before calibrating"):
            calibrate(pipe, "a red car", steps=4, **RUN)
    finally:
        handle.remove()
    assert not (tmp_path / CALIBRATION_FILE).exists()
