"""The engine cache: one copy of the weights per process, the requested tier applied in place, each run's
step cache prepared for that run, and a CUDA out-of-memory error turned into next steps."""
from __future__ import annotations

import os

import pytest
import torch
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from patches.compile import CACHE_ENV
from tasks.pipelines import EngineCache, GpuOutOfMemory, out_of_memory_as_advice, process_engines, tier_options
from tests.tasks.runs import tiny_run
from wan_engine.sizes import Size


def _generate(pipe, steps: int):
    return pipe.generate("a heron", size=(64, 64), frame_num=5, steps=steps, seed=0, decode=False)


def test_the_cached_pipeline_changes_tier_in_place():
    engines = process_engines()
    pipe, speed = engines.tiered(tiny_run(tier="speed", steps=10))
    assert list(pipe.hooks) == [speed.step_cache] and speed.tier == "speed"

    same, again = engines.tiered(tiny_run(tier="speed", steps=6))
    assert (same, again) == (pipe, speed)  # kept applied; the schedule follows the run's settings
    assert speed.step_cache.schedule.plan.steps == 6

    _, stricter = engines.tiered(tiny_run(tier="speed", teacache_threshold=0.4))
    assert stricter is not speed and not speed.active  # another threshold: the old cache is removed first
    assert stricter.step_cache.metadata()["settings"]["threshold"] == 0.4

    _, balanced = engines.tiered(tiny_run(tier="balanced", teacache_threshold=0.4))
    assert engines.tiered(tiny_run(tier="balanced", teacache_threshold=0.1))[1] is balanced  # speed's option only
    assert len(pipe.hooks) == 0 and balanced.step_cache is None  # MagCache is for I2V

    _, quality = engines.tiered(tiny_run())
    assert not balanced.active and [p.name for p in quality.plan] == ["precision", "attention", "resident"]


def test_a_reused_step_cache_starts_each_run_clean():
    engines = process_engines()
    pipe, handle = engines.tiered(tiny_run(tier="speed", steps=7))
    _generate(pipe, 7)
    _, again = engines.tiered(tiny_run(tier="speed", steps=6))
    assert again is handle
    _generate(pipe, 6)
    cache = handle.step_cache
    assert [c.step for c in cache.calls] == list(range(6))  # only this run's calls
    executed = [c.step for c in cache.calls if c.computed]
    assert executed == cache.computed_steps["cond"] == cache.computed_steps["uncond"]
    engines.tiered(tiny_run())


def test_the_speed_tier_runs_the_requested_step_cache():
    assert tier_options("speed", 0.3).step_cache == "teacache" and tier_options("speed", 0.3).threshold == 0.3
    magcache = tier_options("speed", 0.3, "magcache")
    assert magcache.step_cache == "magcache" and magcache.threshold is None   # its published schedule
    assert tier_options("balanced", 0.3, "magcache") == tier_options("balanced")


def test_the_flow_cache_dir_wins_over_torchs_default(tmp_path, monkeypatch):
    """Importing torch._dynamo puts torch's own default into TORCHINDUCTOR_CACHE_DIR; that is not a user's
    choice, so compiled kernels still go under the flow's cache dir, while a user's own choice stays."""
    engines = process_engines()
    monkeypatch.setenv(CACHE_ENV, default_cache_dir())
    engines.tiered(tiny_run(tier="balanced"), cache_dir=tmp_path)
    assert os.environ[CACHE_ENV] == str(tmp_path / "inductor")

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    engines.tiered(tiny_run(tier="speed"), cache_dir=tmp_path)
    assert os.environ[CACHE_ENV] == str(tmp_path / "mine")
    engines.tiered(tiny_run())


def test_a_pipeline_is_loaded_once_per_checkpoint_and_device_and_evicted_on_request():
    loads = []
    engines = EngineCache(load_pipeline=lambda checkpoint, device, dtype: loads.append((checkpoint, device, dtype))
                          or object())
    first = engines.pipeline("tiny", "cpu")
    assert engines.pipeline("tiny", "cpu") is first and loads == [("tiny", "cpu", torch.float32)]
    assert engines.holds("tiny", "cpu") and not engines.holds("tiny-i2v", "cpu")
    engines.evict("cpu")
    assert not engines.holds("tiny", "cpu")
    assert engines.pipeline("tiny", "cpu") is not first and len(loads) == 2


def test_out_of_memory_becomes_next_steps_and_frees_the_device():
    engines = EngineCache(load_pipeline=lambda checkpoint, device, dtype: object())
    engines.pipeline("tiny", "cpu")
    run = tiny_run(size=Size(1280, 720), frame_count=81)
    with pytest.raises(GpuOutOfMemory) as raised, out_of_memory_as_advice(run, engines):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    message = str(raised.value)
    assert "generating 81 frames at 1280*720 on 1 GPU(s)" in message and "frame_count=41" in message
    assert "(832*480)" in message and "gpus_per_job=2" in message and "released" in message
    assert not engines.holds("tiny", "cpu")


def test_a_load_that_runs_out_of_memory_evicts_the_least_recently_used_pipeline_and_tries_again():
    room = 2  # the device holds two pipelines

    def load(checkpoint, device, dtype):
        if len(engines.held()) >= room:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return object()

    engines = EngineCache(load_pipeline=load)
    a = engines.pipeline("a", "cuda:7")
    engines.pipeline("b", "cuda:7")
    assert engines.pipeline("a", "cuda:7") is a  # used again: "b" is now the least recent
    engines.pipeline("c", "cuda:7")
    assert engines.held() == [("a", "cuda:7"), ("c", "cuda:7")] and engines.loads == 3
    room = 0
    with pytest.raises(torch.OutOfMemoryError):  # nothing left to evict: the error stands
        engines.pipeline("d", "cuda:7")
    assert engines.held() == [] and engines.loads == 3


def test_a_device_short_of_memory_for_the_next_pipeline_evicts_the_least_recently_used_first():
    """A load adapts to the free memory (it offloads when short), so it rarely runs out: waiting for that would
    keep an idle pipeline on the card and run the new one offloaded for good. The cache first frees the room the
    new one needs to stay whole on the device, least recently used first."""
    room = 100   # device bytes; each pipeline needs 60 to stay whole

    def free(device):
        return room - 60 * len([k for k in engines.held() if k[1] == device])

    engines = EngineCache(load_pipeline=lambda checkpoint, device, dtype: object(), free_bytes=free,
                          resident_bytes=lambda checkpoint, dtype: 60)
    engines.pipeline("a", "cuda:0")
    engines.pipeline("b", "cuda:0")
    assert engines.held() == [("b", "cuda:0")]   # "a" went first: 40 free bytes would not hold "b"
    engines.pipeline("c", "cuda:1")
    assert engines.held() == [("b", "cuda:0"), ("c", "cuda:1")]  # another device's pipelines stay
    room = 200
    engines.pipeline("d", "cuda:0")
    assert engines.held() == [("b", "cuda:0"), ("c", "cuda:1"), ("d", "cuda:0")]  # room for both
    room = 50
    engines.pipeline("e", "cuda:0")   # short even with nothing left to evict: loaded anyway (the load offloads)
    assert engines.held() == [("c", "cuda:1"), ("e", "cuda:0")] and engines.loads == 5
