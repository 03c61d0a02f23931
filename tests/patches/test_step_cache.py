"""The step-cache hook: lookup-only skipping, per-branch/per-expert residuals, runs, chaining and removal."""
from __future__ import annotations

from functools import cache
from types import SimpleNamespace

import pytest
import torch

from patches.magcache import MagCacheConfig, apply_magcache
from patches.step_cache import BRANCHES, SkipSchedule, StepCacheHandle
from patches.teacache import TeaCacheConfig, apply_teacache
from tests.patches import tiny_pipeline
from wan_engine import MODEL_SPECS, BlockCall, RunHook
from wan_engine.hooks import HookRegistry

STEPS = 4
RUN = dict(size=(64, 64), frame_num=5, steps=STEPS, seed=1, decode=False)


@cache
def uncached_latents() -> torch.Tensor:
    pipe = tiny_pipeline()
    assert len(pipe.hooks) == 0
    return pipe.generate("a red car in the city", **RUN).latents


# ---------------------------------------------------------------- the hook on its own (no model)
def _stub_pipe():
    return SimpleNamespace(spec=MODEL_SPECS["tiny"], hooks=HookRegistry())


def _plan(steps: int = 4, cfg: str = "sequential"):
    """A run plan of the tiny model (its steps and CFG mode are what a step cache reads)."""
    return tiny_pipeline().plan(size=(64, 64), frame_num=5, steps=steps, cfg=cfg)


def _handle(pipe, compute) -> StepCacheHandle:
    """A handle whose schedule is `compute`: branch -> flags per step, or a function of the steps giving them."""

    def build(steps, branches, batched, image):
        flags = compute(steps) if callable(compute) else compute
        return SkipSchedule("test", steps, {b: flags[b] for b in branches}, batched, {})

    return StepCacheHandle(pipe, build, "test")


class Blocks:
    """A stand-in block stack that adds a different constant per call and counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, tokens):
        self.calls += 1
        return tokens * 2 + self.calls


def _call(plan, step, branches=("cond",)):
    return BlockCall(step, plan.steps.timesteps[step], plan.steps.experts[step], branches)


def test_skipped_calls_reuse_the_branch_residual_without_running_blocks():
    pipe = _stub_pipe()
    handle = _handle(pipe, {"cond": (True, False, False, True), "uncond": (True, True, False, True)})
    plan = _plan()
    handle.begin_run(plan)
    blocks = Blocks()
    x0c, x0u = torch.full((1, 3, 2), 1.0), torch.full((1, 3, 2), 10.0)
    out_c = handle.block_stack(_call(plan, 0), x0c, blocks)
    out_u = handle.block_stack(_call(plan, 0, ("uncond",)), x0u, blocks)
    assert blocks.calls == 2
    x1 = torch.full((1, 3, 2), 5.0)
    # cond skips at step 1: its own residual (step 0, cond), not the uncond one
    assert torch.equal(handle.block_stack(_call(plan, 1), x1, blocks), x1 + (out_c - x0c))
    assert blocks.calls == 2
    out_u1 = handle.block_stack(_call(plan, 1, ("uncond",)), x1, blocks)  # uncond computes at step 1
    assert blocks.calls == 3 and torch.equal(out_u1, x1 * 2 + 3)
    x2 = torch.full((1, 3, 2), 7.0)
    assert torch.equal(handle.block_stack(_call(plan, 2), x2, blocks), x2 + (out_c - x0c))
    assert torch.equal(handle.block_stack(_call(plan, 2, ("uncond",)), x2, blocks), x2 + (out_u1 - x1))
    assert blocks.calls == 3
    assert not torch.equal(out_u1 - x1, out_u - x0u)
    assert [c.computed for c in handle.calls] == [True, True, False, True, False, False]


def test_batched_rows_use_their_own_residuals():
    pipe = _stub_pipe()
    handle = _handle(pipe, dict.fromkeys(BRANCHES, (True, False, True, True)))
    plan = _plan(cfg="batched")
    handle.begin_run(plan)
    blocks = Blocks()
    x0 = torch.stack([torch.full((3, 2), 1.0), torch.full((3, 2), 10.0)])  # [2, 3, 2]: cond row, uncond row
    out0 = handle.block_stack(_call(plan, 0, BRANCHES), x0, blocks)
    x1 = torch.randn(2, 3, 2)
    assert torch.equal(handle.block_stack(_call(plan, 1, BRANCHES), x1, blocks), x1 + (out0 - x0))
    assert blocks.calls == 1
    assert handle.schedule.batched


def test_rows_disagreeing_in_one_batch_are_both_computed():
    """Schedules whose rows disagree met by a batched call: the blocks run for the whole batch."""
    pipe = _stub_pipe()
    handle = _handle(pipe, {"cond": (True, False, True, True), "uncond": (True, True, True, True)})
    plan = _plan(cfg="batched")
    handle.begin_run(plan)
    blocks = Blocks()
    x = torch.ones(2, 3, 2)
    handle.block_stack(_call(plan, 0, BRANCHES), x, blocks)
    handle.block_stack(_call(plan, 1, BRANCHES), x, blocks)
    assert blocks.calls == 2


def test_each_expert_keeps_its_own_state():
    """The first low-noise step computes, and a high-noise residual never stands in for a low-noise call."""
    plan = _plan(10)
    experts = plan.steps.experts
    assert experts[:7] == ("high_noise",) * 7 and experts[7:] == ("low_noise",) * 3
    pipe = _stub_pipe()
    flags = (True, False, True, False, False, True, False, True, False, True)
    handle = _handle(pipe, dict.fromkeys(BRANCHES, flags))
    handle.begin_run(plan)
    assert handle.schedule.rows()["low_noise", "cond"] == {7: True, 8: False, 9: True}
    blocks = Blocks()
    x = torch.full((1, 3, 2), 3.0)
    outs = [handle.block_stack(_call(plan, step), x, blocks) for step in range(10)]
    assert blocks.calls == sum(flags)
    # step 8 (low noise, skipped) reuses step 7's residual, not step 5's (high noise)
    assert torch.equal(outs[8], outs[7]) and not torch.equal(outs[7], outs[5])


def test_a_new_run_starts_with_no_cached_state_and_ending_a_run_frees_the_residuals():
    pipe = _stub_pipe()
    handle = _handle(pipe, dict.fromkeys(BRANCHES, (True, False, True, True)))
    plan = _plan()
    blocks = Blocks()
    x = torch.ones(1, 3, 2)
    with pytest.raises(RuntimeError, match="outside a run"):
        handle.block_stack(_call(plan, 0), x, blocks)
    handle.begin_run(plan)
    handle.block_stack(_call(plan, 0), x, blocks)   # a cancelled run
    handle.end_run()
    handle.begin_run(plan)
    out = handle.block_stack(_call(plan, 0), x, blocks)  # the next run
    assert [c.step for c in handle.calls] == [0] and blocks.calls == 2
    assert torch.equal(handle.block_stack(_call(plan, 1), x, blocks), x + (out - x))


def test_the_schedule_is_the_plans_steps():
    """No settings to prepare: a run of any step count gets the schedule of its own plan."""
    pipe = _stub_pipe()
    handle = _handle(pipe, lambda steps: dict.fromkeys(BRANCHES, (True,) * steps.steps))
    for steps in (4, 8):
        plan = _plan(steps)
        handle.begin_run(plan)
        assert handle.schedule.plan == plan.steps and len(handle.schedule.compute["cond"]) == steps
        handle.end_run()
    handle.begin_run(_plan(4, cfg="none"))
    assert list(handle.schedule.compute) == ["cond"]


def test_wraps_the_hooks_registered_before_it_and_removes_only_itself():
    pipe = _stub_pipe()
    seen = []

    class Inner(RunHook):
        def block_stack(self, call, tokens, run_blocks):
            seen.append(call.step)
            return run_blocks(tokens)

    inner = Inner()
    pipe.hooks.register(inner)
    handle = _handle(pipe, dict.fromkeys(BRANCHES, (True, False, True, True)))
    plan = _plan()
    pipe.hooks.begin_run(plan)
    for step in range(4):
        pipe.hooks.bind(_call(plan, step))(torch.ones(1, 3, 2), Blocks())
    assert seen == [0, 2, 3]  # the inner hook sees the computed calls only
    handle.remove()
    handle.remove()
    assert list(pipe.hooks) == [inner]


def test_two_step_caches_do_not_stack():
    pipe = tiny_pipeline()
    handle = apply_magcache(pipe)
    try:
        with pytest.raises(ValueError, match="already applied"):
            apply_teacache(pipe)
        assert list(pipe.hooks) == [handle]
    finally:
        handle.remove()


# ---------------------------------------------------------------- on the tiny model
def test_the_schedule_follows_the_steps_the_engine_runs():
    pipe = tiny_pipeline()
    handle = apply_magcache(pipe, MagCacheConfig(threshold=0.5, max_skips=2, retention_ratio=0.0))
    try:
        result = pipe.generate("a red car", **dict(RUN, steps=10))
        plan = handle.schedule.plan
        assert list(plan.experts) == result.experts_per_step and plan.steps == 10
        assert plan.split == plan.experts.index("low_noise") and plan.phase_starts == {0, plan.split}
    finally:
        handle.remove()


def test_apply_then_remove_leaves_outputs_bit_identical():
    pipe = tiny_pipeline()
    expected = uncached_latents()
    apply_teacache(pipe, TeaCacheConfig(threshold=0.5), steps=STEPS).remove()
    apply_magcache(pipe, MagCacheConfig(threshold=0.5), steps=STEPS).remove()
    assert len(pipe.hooks) == 0
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
