"""The warm-up-compile task body (`.fn`, no Prefect server): it plans the run as the engine will and
compiles at that plan's shapes, or says why nothing was compiled."""
from __future__ import annotations

import pytest
from prefect.logging import disable_run_logger

import tasks.pipelines as pipelines
from tasks.warmup import warm_up_compile

RUN = dict(checkpoint="tiny", size="64*64", frame_count=5, steps=2, shift=12.0)


def test_the_quality_tier_compiles_nothing(tmp_path):
    with disable_run_logger():
        done = warm_up_compile.fn("quality", "cpu", str(tmp_path), **RUN)
    assert not done.compiled and done.seconds == 0 and "eager" in done.detail


@pytest.mark.parametrize("backend, compiled", [("inductor", False), ("eager", True)])
def test_balanced_warms_the_planned_shape_where_compile_is_on(tmp_path, monkeypatch, backend, compiled):
    monkeypatch.setattr(pipelines, "COMPILE_BACKEND", backend)
    with disable_run_logger():
        done = warm_up_compile.fn("balanced", "cpu", str(tmp_path), **RUN)
    assert done.compiled is compiled
    if compiled:
        assert done.seconds > 0 and "latent grid 8x8, CFG batched" in done.detail
    else:
        assert "compile is off on cpu" in done.detail
    pipelines.evict_pipelines("cpu")
