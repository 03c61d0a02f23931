"""How a job's ranks are shared out: CFG halves when guided and even, the rest Ulysses dividing the heads."""
from __future__ import annotations

import pytest

from wan_engine.parallel import ParallelPlan, choose_parallel_plan, usable_world_sizes


@pytest.mark.parametrize(("world", "cfg_mode", "expected"), [
    (1, "batched", ParallelPlan(1, 1)),
    (2, "batched", ParallelPlan(1, 2)),        # one branch per GPU: no attention traffic
    (2, "none", ParallelPlan(2, 1)),           # guide scale 1: no uncond branch to split off
    (4, "sequential", ParallelPlan(2, 2)),
    (8, "batched", ParallelPlan(4, 2)),        # the 2 CFG x 4 Ulysses
    (5, "batched", ParallelPlan(5, 1)),        # odd: Ulysses only (5 divides 40)
    (8, "none", ParallelPlan(8, 1)),
])
def test_a14b_plans(world, cfg_mode, expected):
    plan = choose_parallel_plan(world, 40, cfg_mode)
    assert plan == expected and plan.world == world


@pytest.mark.parametrize(("world", "cfg_mode"), [(3, "batched"), (6, "batched"), (3, "none"), (16, "none")])
def test_a_degree_that_does_not_divide_the_heads_is_refused_with_the_usable_sizes(world, cfg_mode):
    with pytest.raises(ValueError, match=r"does not divide the model's 40 heads.*usable: \[1, 2"):
        choose_parallel_plan(world, 40, cfg_mode)


def test_usable_world_sizes_for_auto():
    assert usable_world_sizes(8, 40, "batched") == [1, 2, 4, 5, 8]
    assert usable_world_sizes(8, 40, "none") == [1, 2, 4, 5, 8]
    assert usable_world_sizes(4, 2, "batched") == [1, 2, 4]   # the tiny model's 2 heads


@pytest.mark.parametrize(("kwargs", "error"), [
    (dict(ulysses=0), "at least 1"), (dict(cfg=3), "1 or 2"), (dict(cfg=0), "1 or 2")])
def test_bad_degrees_are_refused(kwargs, error):
    with pytest.raises(ValueError, match=error):
        ParallelPlan(**kwargs)


def test_check_refuses_cfg_parallel_without_guidance_and_a_ulysses_degree_not_dividing_heads():
    with pytest.raises(ValueError, match="needs a guided run"):
        ParallelPlan(1, 2).check(40, "none")
    with pytest.raises(ValueError, match="Ulysses degree 3 does not divide"):
        ParallelPlan(3, 1).check(40, "batched")
    with pytest.raises(ValueError, match="cfg_mode"):
        ParallelPlan(1, 1).check(40, "maybe")
    ParallelPlan(4, 2).check(40, "batched")
