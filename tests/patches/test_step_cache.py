"""The step-cache hook: lookup-only skipping, per-branch/per-expert residuals, runs, chaining and removal."""
from __future__ import annotations

from functools import cache
from types import SimpleNamespace

import pytest
import torch

from patches.magcache import MagCacheConfig, apply_magcache
from patches.step_cache import (
    BRANCHES,
    ScheduleMismatch,
    SkipSchedule,
    StepCacheHandle,
    plan_sampling,
)
from patches.teacache import TeaCacheConfig, apply_teacache
from tests.patches import tiny_pipeline
from wan_engine import MODEL_SPECS, BlockCall

STEPS = 4
RUN = dict(size=(64, 64), frame_num=5, steps=STEPS, seed=1, decode=False)


@cache
def uncached_latents() -> torch.Tensor:
    pipe = tiny_pipeline()
    assert pipe.block_stack_hook is None
    return pipe.generate("a red car in the city", **RUN).latents


# ---------------------------------------------------------------- the hook on its own (no model)
def _stub_pipe():
    return SimpleNamespace(spec=MODEL_SPECS["tiny"], block_stack_hook=None)


def _handle(pipe, compute, steps: int = 4) -> StepCacheHandle:
    """A handle whose schedule (for separate and for batched rows) is `compute`: branch -> flags per
    step, or a function of the plan giving them."""

    def build(plan):
        flags = compute(plan) if callable(compute) else compute
        return {b: SkipSchedule("test", plan, flags, b, {}) for b in (False, True)}

    handle = StepCacheHandle(pipe, build)
    handle.prepare(steps=steps)
    return handle


class Blocks:
    """A stand-in block stack that adds a different constant per call and counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, tokens):
        self.calls += 1
        return tokens * 2 + self.calls


def _call(plan, step, branches=("cond",)):
    return BlockCall(step, plan.timesteps[step], plan.experts[step], branches)


def test_skipped_calls_reuse_the_branch_residual_without_running_blocks():
    pipe = _stub_pipe()
    handle = _handle(pipe, {"cond": (True, False, False, True), "uncond": (True, True, False, True)})
    plan = handle.schedule.plan
    blocks = Blocks()
    x0c, x0u = torch.full((1, 3, 2), 1.0), torch.full((1, 3, 2), 10.0)
    out_c = pipe.block_stack_hook(_call(plan, 0), x0c, blocks)
    out_u = pipe.block_stack_hook(_call(plan, 0, ("uncond",)), x0u, blocks)
    assert blocks.calls == 2
    x1 = torch.full((1, 3, 2), 5.0)
    # cond skips at step 1: its own residual (step 0, cond), not the uncond one
    assert torch.equal(pipe.block_stack_hook(_call(plan, 1), x1, blocks), x1 + (out_c - x0c))
    assert blocks.calls == 2
    out_u1 = pipe.block_stack_hook(_call(plan, 1, ("uncond",)), x1, blocks)  # uncond computes at step 1
    assert blocks.calls == 3 and torch.equal(out_u1, x1 * 2 + 3)
    x2 = torch.full((1, 3, 2), 7.0)
    assert torch.equal(pipe.block_stack_hook(_call(plan, 2), x2, blocks), x2 + (out_c - x0c))
    assert torch.equal(pipe.block_stack_hook(_call(plan, 2, ("uncond",)), x2, blocks), x2 + (out_u1 - x1))
    assert blocks.calls == 3
    assert not torch.equal(out_u1 - x1, out_u - x0u)
    assert [c.computed for c in handle.calls] == [True, True, False, True, False, False]


def test_batched_rows_use_their_own_residuals():
    pipe = _stub_pipe()
    handle = _handle(pipe, dict.fromkeys(BRANCHES, (True, False, True, True)))
    plan = handle.schedule.plan
    blocks = Blocks()
    x0 = torch.stack([torch.full((3, 2), 1.0), torch.full((3, 2), 10.0)])  # [2, 3, 2]: cond row, uncond row
    out0 = pipe.block_stack_hook(_call(plan, 0, BRANCHES), x0, blocks)
    x1 = torch.randn(2, 3, 2)
    assert torch.equal(pipe.block_stack_hook(_call(plan, 1, BRANCHES), x1, blocks), x1 + (out0 - x0))
    assert blocks.calls == 1
    assert handle.schedule.batched


def test_rows_disagreeing_in_one_batch_are_both_computed():
    """A schedule made for separate calls met by a batched call: the blocks run for the whole batch."""
    pipe = _stub_pipe()
    _handle(pipe, {"cond": (True, False, True, True), "uncond": (True, True, True, True)})
    plan = plan_sampling("tiny", 4)
    blocks = Blocks()
    x = torch.ones(2, 3, 2)
    pipe.block_stack_hook(_call(plan, 0, BRANCHES), x, blocks)
    pipe.block_stack_hook(_call(plan, 1, BRANCHES), x, blocks)
    assert blocks.calls == 2


def test_each_expert_keeps_its_own_state():
    """The first low-noise step computes, and a high-noise residual never stands in for a low-noise call."""
    plan = plan_sampling("tiny", 10)
    assert plan.experts[:7] == ("high_noise",) * 7 and plan.experts[7:] == ("low_noise",) * 3
    pipe = _stub_pipe()
    flags = (True, False, True, False, False, True, False, True, False, True)
    handle = _handle(pipe, dict.fromkeys(BRANCHES, flags), steps=10)
    assert handle.schedule.rows()["low_noise", "cond"] == {7: True, 8: False, 9: True}
    blocks = Blocks()
    x = torch.ones(1, 3, 2)
    for step in range(10):
        pipe.block_stack_hook(_call(plan, step), x, blocks)
        # only residuals that a later step of the same expert reuses are held
        held = set(handle._residuals)
        assert held == ({(plan.experts[step], "cond")} if step + 1 < 10 and not flags[step + 1] else set())
    assert blocks.calls == sum(flags)


def test_a_new_run_starts_with_no_cached_state():
    pipe = _stub_pipe()
    handle = _handle(pipe, dict.fromkeys(BRANCHES, (True, False, True, True)))
    plan = handle.schedule.plan
    blocks = Blocks()
    x = torch.ones(1, 3, 2)
    for step in (0, 1):  # a cancelled run
        pipe.block_stack_hook(_call(plan, step), x, blocks)
    out = pipe.block_stack_hook(_call(plan, 0), x, blocks)  # the next run
    assert [c.step for c in handle.calls] == [0] and blocks.calls == 2
    assert torch.equal(pipe.block_stack_hook(_call(plan, 1), x, blocks), x + (out - x))


def test_a_run_with_other_settings_is_refused():
    pipe = _stub_pipe()
    handle = _handle(pipe, lambda plan: dict.fromkeys(BRANCHES, (True,) * plan.steps))
    other = plan_sampling("tiny", 8)
    pipe.block_stack_hook(_call(other, 0), torch.ones(1, 3, 2), Blocks())  # step 0 is t=999 for any step count
    with pytest.raises(ScheduleMismatch, match="prepared for 4 steps"):
        pipe.block_stack_hook(_call(other, 1), torch.ones(1, 3, 2), Blocks())
    handle.prepare(steps=8)
    pipe.block_stack_hook(_call(other, 1), torch.ones(1, 3, 2), Blocks())


def test_chains_to_the_hook_already_installed_and_restores_it():
    pipe = _stub_pipe()
    seen = []

    def inner(call, tokens, run_blocks):
        seen.append(call.step)
        return run_blocks(tokens)

    pipe.block_stack_hook = inner
    handle = _handle(pipe, dict.fromkeys(BRANCHES, (True, False, True, True)))
    plan = handle.schedule.plan
    for step in range(4):
        pipe.block_stack_hook(_call(plan, step), torch.ones(1, 3, 2), Blocks())
    assert seen == [0, 2, 3]  # the inner hook sees the computed calls only
    pipe.block_stack_hook = lambda call, tokens, run_blocks: handle(call, tokens, run_blocks)  # a later patch
    with pytest.raises(RuntimeError, match="remove it first"):
        handle.remove()
    pipe.block_stack_hook = handle  # that patch removed
    handle.remove()
    handle.remove()
    assert pipe.block_stack_hook is inner


def test_two_step_caches_do_not_stack():
    pipe = tiny_pipeline()
    handle = apply_magcache(pipe)
    try:
        with pytest.raises(ValueError, match="already applied"):
            apply_teacache(pipe)
        assert pipe.block_stack_hook is handle
    finally:
        handle.remove()


# ---------------------------------------------------------------- on the tiny model
def test_the_plan_is_what_the_engine_runs():
    pipe = tiny_pipeline()
    plan = plan_sampling(pipe.spec, 40, 12.0, "unipc")
    assert list(plan.experts) == [pipe.expert_for(t) for t in plan.timesteps]
    assert plan.split == plan.experts.index("low_noise") and plan.phase_starts == {0, plan.split}


def test_apply_then_remove_leaves_outputs_bit_identical():
    pipe = tiny_pipeline()
    expected = uncached_latents()
    apply_teacache(pipe, TeaCacheConfig(threshold=0.5), steps=STEPS).remove()
    apply_magcache(pipe, MagCacheConfig(threshold=0.5), steps=STEPS).remove()
    assert pipe.block_stack_hook is None
    assert torch.equal(pipe.generate("a red car in the city", **RUN).latents, expected)


@pytest.mark.parametrize("apply", [lambda p: apply_teacache(p, TeaCacheConfig(threshold=0), steps=STEPS),
                                   lambda p: apply_magcache(p, MagCacheConfig(threshold=0), steps=STEPS)],
                         ids=["teacache", "magcache"])
def test_threshold_zero_reproduces_the_uncached_result_exactly(apply):
    pipe = tiny_pipeline()
    expected = uncached_latents()
    handle = apply(pipe)
    try:
        assert handle.counts["skipped"] == 0
        assert torch.equal(pipe.generate("a red car in the city", **RUN).latents, expected)
        assert all(c.computed for c in handle.calls)
        assert sum(len(c.branches) for c in handle.calls) == 2 * STEPS
    finally:
        handle.remove()


def _skipping_magcache(pipe):
    return apply_magcache(pipe, MagCacheConfig(threshold=0.5, max_skips=2, retention_ratio=0.0), steps=STEPS)


@pytest.mark.parametrize("cfg_batch", [True, False], ids=["batched", "separate"])
def test_skipped_calls_do_not_run_the_blocks_and_follow_the_schedule(cfg_batch):
    pipe = tiny_pipeline()
    block_runs = []
    hooks = [block.register_forward_pre_hook(lambda m, a: block_runs.append(m)) for block in pipe.repeated_blocks()]
    pipe.cfg_batch = cfg_batch
    handle = _skipping_magcache(pipe)
    try:
        pipe.generate("a red car in the city", **RUN)
        schedule = handle.schedule
        assert schedule.batched == cfg_batch and schedule.counts()["skipped"] > 0
        per_run = 1 if cfg_batch else 2  # block-stack runs per computed step
        assert len(block_runs) == len(pipe.experts["high_noise"].blocks) * per_run * len(
            schedule.computed_steps()["cond"])
        assert [(c.step, b, c.computed) for c in handle.calls for b in c.branches] == [
            (i, b, schedule.compute[b][i]) for i in range(STEPS) for b in BRANCHES]
        assert handle.metadata()["computed_steps"] == schedule.computed_steps()
    finally:
        pipe.cfg_batch = None
        handle.remove()
        for h in hooks:
            h.remove()


def test_a_reused_pipeline_starts_clean():
    pipe = tiny_pipeline()
    handle = _skipping_magcache(pipe)
    try:
        first = pipe.generate("a red car in the city", **RUN).latents
        assert not torch.equal(first, uncached_latents())
        pipe.generate("a dog on the sea", **RUN)
        assert torch.equal(pipe.generate("a red car in the city", **RUN).latents, first)
    finally:
        handle.remove()
