"""The per-process pipeline cache: one copy of the weights, the requested tier applied in place,
each run's step cache prepared for that run."""
from __future__ import annotations

import os

from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from patches.compile import CACHE_ENV
from tasks.pipelines import get_tiered_pipeline


def _generate(pipe, steps: int):
    return pipe.generate("a heron", size=(64, 64), frame_num=5, steps=steps, seed=0, decode=False)


def test_the_cached_pipeline_changes_tier_in_place():
    pipe, speed = get_tiered_pipeline("tiny", "cpu", "speed", 0.25, steps=10)
    assert list(pipe.hooks) == [speed.step_cache] and speed.tier == "speed"

    same, again = get_tiered_pipeline("tiny", "cpu", "speed", 0.25, steps=6)
    assert (same, again) == (pipe, speed)  # kept applied; the schedule follows the run's settings
    assert speed.step_cache.schedule.plan.steps == 6

    _, stricter = get_tiered_pipeline("tiny", "cpu", "speed", 0.4)
    assert stricter is not speed and not speed.active  # another threshold: the old cache is removed first
    assert stricter.step_cache.metadata()["settings"]["threshold"] == 0.4

    _, balanced = get_tiered_pipeline("tiny", "cpu", "balanced", 0.4)
    assert get_tiered_pipeline("tiny", "cpu", "balanced", 0.1)[1] is balanced  # the threshold is speed's only
    assert len(pipe.hooks) == 0 and balanced.step_cache is None  # MagCache is for I2V

    _, quality = get_tiered_pipeline("tiny", "cpu", "quality")
    assert not balanced.active and [p.name for p in quality.plan] == ["precision", "attention", "resident"]


def test_a_reused_step_cache_starts_each_run_clean():
    pipe, handle = get_tiered_pipeline("tiny", "cpu", "speed", 0.25, steps=7)
    _generate(pipe, 7)
    _, again = get_tiered_pipeline("tiny", "cpu", "speed", 0.25, steps=6)
    assert again is handle
    _generate(pipe, 6)
    cache = handle.step_cache
    assert [c.step for c in cache.calls] == list(range(6))  # only this run's calls
    executed = [c.step for c in cache.calls if c.computed]
    assert executed == cache.computed_steps["cond"] == cache.computed_steps["uncond"]
    get_tiered_pipeline("tiny", "cpu", "quality")


def test_the_speed_tier_runs_the_requested_step_cache():
    from tasks.pipelines import tier_options

    assert tier_options("speed", 0.3).step_cache == "teacache" and tier_options("speed", 0.3).threshold == 0.3
    magcache = tier_options("speed", 0.3, "magcache")
    assert magcache.step_cache == "magcache" and magcache.threshold is None   # its published schedule
    assert tier_options("balanced", 0.3, "magcache") == tier_options("balanced")


def test_the_flow_cache_dir_wins_over_torchs_default(tmp_path, monkeypatch):
    """Importing torch._dynamo puts torch's own default into TORCHINDUCTOR_CACHE_DIR; that is not a user's
    choice, so compiled kernels still go under the flow's cache dir, while a user's own choice stays."""
    monkeypatch.setenv(CACHE_ENV, default_cache_dir())
    get_tiered_pipeline("tiny", "cpu", "balanced", cache_dir=tmp_path)
    assert os.environ[CACHE_ENV] == str(tmp_path / "inductor")

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    get_tiered_pipeline("tiny", "cpu", "speed", cache_dir=tmp_path)
    assert os.environ[CACHE_ENV] == str(tmp_path / "mine")
