"""TeaCache: the signal is the model's own timestep embedding, and schedules follow the published loop."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from patches.step_cache import BRANCHES
from patches.teacache import (
    TeaCacheConfig,
    apply_teacache,
    polyval,
    published_coefficients,
    teacache_rel_l1,
    teacache_schedule,
)
from tests.patches import tiny_pipeline
from wan_engine import MODEL_SPECS, plan_steps


def _upstream(rel, steps, threshold, coefficients, use_ret_steps, phase_starts=frozenset({0})):
    """The published TeaCache4Wan2.1 loop, written out: model calls interleave cond and uncond; 'ret' mode
    computes the first 10 calls, 'non_ret' the first 2 and the last 2; each branch accumulates the rescaled
    change and computes (restarting the sum) once it reaches the threshold. A14B adds: each expert's phase
    starts with a computed step. Returns, per call, whether it is computed."""
    ret_calls, cutoff = (10, 2 * steps) if use_ret_steps else (2, 2 * steps - 2)
    acc, computed = [0.0, 0.0], []
    for cnt in range(2 * steps):
        b, i = cnt % 2, cnt // 2
        if cnt < ret_calls or cnt >= cutoff or i in phase_starts:
            calc, acc[b] = True, 0.0
        else:
            acc[b] += np.poly1d(coefficients)(rel[i])
            calc = not acc[b] < threshold
            if calc:
                acc[b] = 0.0
        computed.append(calc)
    return computed


def _interleaved(schedule):
    return [schedule.compute[b][i] for i in range(schedule.plan.steps) for b in BRANCHES]


def test_the_signal_is_what_the_model_modulates_with():
    """e and e0 measured inside a real forward at two timesteps give the relative change teacache_rel_l1
    computes before sampling from the expert's modules alone."""
    pipe = tiny_pipeline()
    plan = plan_steps(pipe.spec, 10)
    dit = pipe.experts[plan.experts[1]]
    seen = {}
    hooks = [dit.time_embedding.register_forward_hook(lambda m, a, out: seen.setdefault("e", []).append(out)),
             dit.time_projection.register_forward_hook(lambda m, a, out: seen.setdefault("e0", []).append(out))]
    x, context = torch.randn(1, 16, 2, 4, 4), torch.randn(1, 8, 4096)
    try:
        with torch.no_grad():
            for i in (0, 1):
                dit(x, torch.tensor([plan.timesteps[i]]), context)
    finally:
        for h in hooks:
            h.remove()
    for signal in ("e", "e0"):
        prev, cur = seen[signal]
        expected = ((cur - prev).abs().mean() / prev.abs().mean()).item()
        rel = teacache_rel_l1(pipe.experts, plan, signal)
        assert rel[1] == pytest.approx(expected, rel=1e-5)
        assert rel[0] is None and rel[plan.split] is None  # phase starts have no previous signal


@pytest.mark.parametrize("use_ret_steps", [True, False])
@pytest.mark.parametrize("threshold", [0.05, 0.2, 0.5])
def test_single_expert_schedule_matches_the_published_loop(use_ret_steps, threshold):
    steps = 50
    plan = plan_steps(MODEL_SPECS["ti2v-5B"], steps, 5.0)
    rng = np.random.default_rng(0)
    rel = [None, *rng.uniform(0.005, 0.08, steps - 1).tolist()]
    coefficients = published_coefficients("t2v-A14B", "e0" if use_ret_steps else "e")
    schedule = teacache_schedule(plan, rel, threshold, coefficients, use_ret_steps)
    assert _interleaved(schedule) == _upstream(rel, steps, threshold, coefficients, use_ret_steps)
    assert schedule.compute["cond"] == schedule.compute["uncond"]


def test_a14b_schedule_at_threshold_0_2_for_40_steps():
    """On the tiny T2V experts' own embeddings: the published loop, each expert's phase opening with a
    computed step; the published T2V-14B 'ret' polynomial."""
    pipe = tiny_pipeline()
    plan = plan_steps(pipe.spec, 40)
    rel = teacache_rel_l1(pipe.experts, plan, "e0")
    coefficients = published_coefficients("t2v-A14B", "e0")
    assert coefficients == (-3.03318725e05, 4.90537029e04, -2.65530556e03, 5.87365115e01, -3.15583525e-01)
    schedule = teacache_schedule(plan, rel, 0.2, coefficients)
    assert _interleaved(schedule) == _upstream(rel, 40, 0.2, coefficients, True, plan.phase_starts)
    computed = schedule.computed_steps()["cond"]
    assert computed[:5] == [0, 1, 2, 3, 4] and plan.split in computed
    assert 0 < schedule.counts()["skipped"]


def test_a_polynomial_used_outside_its_fit_is_reported(caplog):
    """Random weights change their embedding far more per step than a trained model: the published
    polynomial goes negative there, which apply_teacache says (the schedule then skips nearly everything)."""
    pipe = tiny_pipeline()
    with caplog.at_level("WARNING", logger="patches.teacache"):
        handle = apply_teacache(pipe, TeaCacheConfig(threshold=0.2), steps=40)
    handle.remove()
    assert "outside the range it was fitted on" in caplog.text
    assert handle.schedule.computed_steps()["cond"] == [0, 1, 2, 3, 4, handle.schedule.plan.split]


def test_i2v_never_skips_in_the_high_noise_phase():
    plan = plan_steps(MODEL_SPECS["i2v-A14B"], 40)
    rel = [None if i in plan.phase_starts else 1e-3 for i in range(40)]  # tiny changes: skip wherever allowed
    schedule = teacache_schedule(plan, rel, 0.2, published_coefficients("i2v-A14B", "e0"))
    skipped = schedule.skipped_steps()["cond"]
    assert skipped == [i for i in range(40) if i > plan.split]


def test_non_ret_mode_computes_the_first_and_the_last_step():
    plan = plan_steps(MODEL_SPECS["t2v-A14B"], 40)
    rel = [None if i in plan.phase_starts else 1e-3 for i in range(40)]
    schedule = teacache_schedule(plan, rel, 0.2, published_coefficients("t2v-A14B", "e"), use_ret_steps=False)
    assert schedule.computed_steps()["cond"] == [0, plan.split, 39]
    assert schedule.settings["signal"] == "e"


def test_threshold_zero_computes_every_step_even_when_the_polynomial_is_negative():
    plan = plan_steps(MODEL_SPECS["t2v-A14B"], 40)
    rel = [None if i in plan.phase_starts else 1e-3 for i in range(40)]
    coefficients = published_coefficients("t2v-A14B", "e0")
    assert polyval(coefficients, 1e-3) < 0
    assert teacache_schedule(plan, rel, 0, coefficients).counts()["skipped"] == 0


def test_polyval_is_numpy_poly1d():
    for model in ("t2v-A14B", "i2v-A14B"):
        for signal in ("e", "e0"):
            c = published_coefficients(model, signal)
            assert all(polyval(c, x) == np.poly1d(c)(x) for x in (0.0, 0.013, 0.07, 0.3))


def test_config_validation_names_the_allowed_range():
    for bad in (0.04, 0.51, -0.1):
        with pytest.raises(ValueError, match="0.05-0.5"):
            TeaCacheConfig(threshold=bad)
    assert TeaCacheConfig().threshold == 0.25 and TeaCacheConfig(threshold=0).threshold == 0
