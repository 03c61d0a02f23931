"""The warm-up task's body, called as a function: nothing to do for the quality tier or where compile is off,
and a compile at the run's shape where it is on."""
from __future__ import annotations

from tasks import pipelines
from tasks.warmup import warm_up_compile
from tests.tasks.runs import tiny_run


def test_the_warm_up_body_says_why_it_compiles_nothing(no_prefect_server, fresh_engines, tmp_path):
    quality = warm_up_compile.fn(tiny_run(), str(tmp_path), fresh_engines)
    assert (quality.compiled, quality.seconds) == (False, 0.0) and "quality tier runs eager" in quality.detail
    balanced = warm_up_compile.fn(tiny_run(tier="balanced"), str(tmp_path), fresh_engines)
    assert not balanced.compiled and "compile is off on cpu: no CUDA GPU" in balanced.detail
    assert not fresh_engines.holds("tiny", "cpu")  # it said so before loading anything


def test_the_warm_up_body_compiles_the_runs_shape(no_prefect_server, fresh_engines, monkeypatch, tmp_path):
    monkeypatch.setattr(pipelines, "COMPILE_BACKEND", "eager")  # traces without generating kernels: a CPU can
    warm = warm_up_compile.fn(tiny_run(tier="balanced", frame_count=9), str(tmp_path), fresh_engines)
    assert warm.compiled and warm.seconds > 0 and "warmed 64*64, 9 frames, latent grid 8x8, CFG batched" in warm.detail
    assert fresh_engines.holds("tiny", "cpu")  # loaded, tier applied: denoise finds it ready
    assert warm.record() == {"compiled": True, "seconds": round(warm.seconds, 3), "detail": warm.detail}
