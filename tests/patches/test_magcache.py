"""MagCache schedules: the published rule on the published Wan2.2 figures, resampling and the retention windows."""
from __future__ import annotations

import copy

import numpy as np
import pytest
from PIL import Image

from patches.calibrate import calibrate
from patches.magcache import (
    PUBLISHED_DEFAULTS,
    MagCacheConfig,
    apply_magcache,
    branch_ratios,
    magcache_schedule,
    published_ratios,
    resample_nearest,
)
from patches.step_cache import BRANCHES
from tests.patches import tiny_pipeline
from wan_engine import MODEL_SPECS, plan_steps
from wan_engine.hooks import HookRegistry

# T2V-A14B, 40 steps, shift 12, the published E006K2R04 (threshold 0.06, K 2, retention 0.4), by hand:
# - steps 0-25 are high-noise (t >= 875), so split = 26; retention: high-noise steps < int(26 * 0.4) = 10,
#   low-noise steps 26 <= i <= 26 + 14 * 0.4 = 31.6.
# - steps 10-25: ratios 0.994-0.997, two skips cost < 0.02 error, so K = 2 decides: compute every third
#   step (12, 15, 18, 21, 24); 25 is skipped and 26 starts the low-noise phase.
# - step 32: r 0.97776, error 0.022 -> skip; 33: ratio 0.97776 * 0.97278 = 0.951, error 0.071 -> compute;
#   34: 0.96731, 0.033 -> skip; 35: 0.927 -> 0.106 -> compute; 36: 0.94385, 0.056 -> skip; 37: 0.869 ->
#   compute; 38: 0.88108, 0.119 -> compute; 39: 0.80263 -> compute.
T2V_A14B_COMPUTED = [*range(10), 12, 15, 18, 21, 24, *range(26, 32), 33, 35, 37, 38, 39]
# I2V-A14B, 40 steps, shift 5, E006K2R01: high-noise steps 0-14 (split 15), never skipped, and the low-noise
# phase retained up to int(15 + 25 * 0.1) = 17; then K = 2 until the ratios fall (every other step from 28).
I2V_A14B_COMPUTED = [*range(17), 19, 22, 25, 28, 30, 32, *range(34, 40)]


def _published(model: str, steps: int = 40, **overrides):
    plan = plan_steps(MODEL_SPECS[model], steps)
    threshold, k, retention = MagCacheConfig(**overrides).resolve(model)
    return magcache_schedule(plan, published_ratios(model), threshold, k, retention)


def test_t2v_a14b_published_defaults_give_the_hand_computed_schedule():
    assert PUBLISHED_DEFAULTS["t2v-A14B"] == (0.06, 2, 0.4)
    schedule = _published("t2v-A14B")
    assert schedule.plan.split == 26
    assert schedule.computed_steps() == {"cond": T2V_A14B_COMPUTED, "uncond": T2V_A14B_COMPUTED}
    assert schedule.counts() == {"computed": 52, "skipped": 28, "total": 80}
    assert schedule.summary()["computed_per_expert"] == {"high_noise": {"cond": 15, "uncond": 15},
                                                         "low_noise": {"cond": 11, "uncond": 11}}


def test_i2v_a14b_never_skips_in_the_high_noise_phase():
    schedule = _published("i2v-A14B")
    assert schedule.plan.split == 15
    assert schedule.computed_steps()["cond"] == I2V_A14B_COMPUTED == schedule.computed_steps()["uncond"]


def _upstream_single_expert(ratios, steps, threshold, k, retention):
    """The published per-call loop of MagCache for one DiT (Wan2.1 / TI2V-5B), written out: model calls
    interleave cond and uncond, step 0 is padded with ratio 1.0, and other step counts resample each
    branch's curve by nearest neighbour (numpy rounding). Returns, per call, whether it is computed."""
    mag = np.array([1.0, 1.0, *ratios])
    if len(mag) != 2 * steps:
        def nearest(src, n):
            if n == 1:
                return np.array([src[-1]])
            return src[np.round(np.arange(n) * ((len(src) - 1) / (n - 1))).astype(int)]
        mag = np.stack([nearest(mag[0::2], steps), nearest(mag[1::2], steps)], axis=1).reshape(-1)
    acc_ratio, acc_steps, acc_err = [1.0, 1.0], [0, 0], [0.0, 0.0]
    computed = []
    for cnt in range(2 * steps):
        b, skip = cnt % 2, False
        if cnt >= int(2 * steps * retention):
            acc_ratio[b] *= mag[cnt]
            acc_steps[b] += 1
            acc_err[b] += abs(1 - acc_ratio[b])
            if acc_err[b] < threshold and acc_steps[b] <= k:
                skip = True
            else:
                acc_ratio[b], acc_steps[b], acc_err[b] = 1.0, 0, 0.0
        computed.append(not skip)
    return computed


@pytest.mark.parametrize("steps, threshold, k, retention", [
    (50, 0.06, 2, 0.2), (50, 0.12, 4, 0.1), (30, 0.06, 2, 0.2), (64, 0.04, 3, 0.15), (25, 0.3, 2, 0.1)])
def test_single_expert_schedule_matches_the_published_loop(steps, threshold, k, retention):
    """TI2V-5B's published curve (50 steps, one DiT): identical decisions, call by call, at its own
    step count and resampled; retention counted in model calls can split a step between branches."""
    ratios = published_ratios("ti2v-5B/t2v")
    plan = plan_steps(MODEL_SPECS["ti2v-5B"], steps, 5.0)
    schedule = magcache_schedule(plan, ratios, threshold, k, retention)
    ours = [schedule.compute[b][i] for i in range(steps) for b in BRANCHES]
    assert ours == _upstream_single_expert(ratios, steps, threshold, k, retention)
    assert 0 < schedule.counts()["skipped"] < 2 * steps


def test_ti2v_runs_take_the_figures_of_their_mode(tmp_path):
    """Text+image runs of TI2V-5B take its published i2v curve, text-only runs its t2v curve (at 20 steps the
    two schedules differ); a calibration serves only runs of the mode it was recorded in."""
    pipe = copy.copy(tiny_pipeline("tiny-ti2v"))
    pipe.checkpoint_dir, pipe.hooks = tmp_path, HookRegistry()
    image = tmp_path / "first.png"
    Image.new("RGB", (80, 60), (30, 120, 200)).save(image)

    def run(image=None, steps=20):
        pipe.generate("a heron", image=image, size=(64, 64), frame_num=5, steps=steps, seed=0, decode=False)
        return handle.schedule

    handle = apply_magcache(pipe, steps=20)
    try:
        assert handle.schedule.settings["ratios"] == "published wan2.2/ti2v-5B/t2v"   # before a run: text only
        plan = plan_steps(pipe.spec, 20)
        for given, figures in ((None, "ti2v-5B/t2v"), (image, "ti2v-5B/i2v")):
            schedule = run(given)
            expected = magcache_schedule(plan, published_ratios(figures), *PUBLISHED_DEFAULTS["ti2v-5B"],
                                         batched=schedule.batched)
            assert schedule.settings["ratios"] == f"published wan2.2/{figures}"
            assert schedule.compute == expected.compute and handle.calls
        assert run(None).compute != run(image).compute
    finally:
        handle.remove()

    calibrate(pipe, "a heron", steps=3, size=(64, 64), frame_num=5, seed=0)   # text only
    handle = apply_magcache(pipe, steps=3)
    try:
        assert run(None, steps=3).settings["ratios"].startswith("calibration ")
        assert run(image, steps=3).settings["ratios"] == "published wan2.2/ti2v-5B/i2v"
    finally:
        handle.remove()


def test_nearest_neighbour_resampling():
    src = list(range(40))
    assert resample_nearest(src, 20) == np.round(np.arange(20) * (39 / 19)).astype(int).tolist()
    assert resample_nearest(src, 40) == src
    assert resample_nearest(list(range(6)), 3) == [0, 2, 5]  # 2.5 rounds to even, as numpy does
    assert resample_nearest(src, 1) == [39]
    published = published_ratios("t2v-A14B")
    per_branch = branch_ratios(published, 40)
    assert per_branch["cond"][:3] == [1.0, published[0], published[2]]
    assert per_branch["uncond"][:3] == [1.0, published[1], published[3]]


@pytest.mark.parametrize("steps", [20, 30, 50])
def test_other_step_counts_resample_the_published_curve(steps):
    schedule = _published("t2v-A14B", steps)
    per_branch = branch_ratios(published_ratios("t2v-A14B"), steps)
    assert len(per_branch["cond"]) == steps and schedule.plan.steps == steps
    assert schedule.compute["cond"][schedule.plan.split]  # the low-noise phase starts with a computed step
    assert 0 < schedule.counts()["skipped"] < steps


def test_threshold_zero_computes_every_step():
    assert _published("t2v-A14B", threshold=0.0).counts()["skipped"] == 0


def test_batched_rows_skip_only_together():
    """cond could skip every step it may (ratios 1), uncond never (ratios 0.5): in one batch both compute."""
    plan = plan_steps(MODEL_SPECS["t2v-A14B"], 40)
    ratios = [1.0, 0.5] * 39
    separate = magcache_schedule(plan, ratios, 0.06, 2, 0.0)
    assert separate.counts()["skipped"] > 0 and all(separate.compute["uncond"])
    assert magcache_schedule(plan, ratios, 0.06, 2, 0.0, batched=True).counts()["skipped"] == 0


def test_config_validation_names_the_allowed_range():
    with pytest.raises(ValueError, match="0.0-0.5"):
        MagCacheConfig(threshold=0.6)
    with pytest.raises(ValueError, match="max_skips"):
        MagCacheConfig(max_skips=-1)
    with pytest.raises(ValueError, match="0-1"):
        MagCacheConfig(retention_ratio=1.5)
    assert MagCacheConfig(threshold=0.1).resolve("i2v-A14B") == (0.1, 2, 0.1)
