"""A job over two local CPU "devices" started by the run itself (no resident workers): gloo, the tiny T2V model."""
from __future__ import annotations

import functools
import time

import pytest
import torch

from tests.conftest import ORACLE_DIR, rel_err
from wan_engine import GenerationCancelled, load_pipeline
from wan_engine.launch import JobFailed, run_job

LOAD = functools.partial(load_pipeline, ORACLE_DIR / "t2v-A14B-tiny", dtype=torch.float32)
RUN = dict(prompt="a lighthouse at dusk", size=(48, 48), frame_num=9, steps=4, seed=7, decode=False)


def _cannot_load(device):
    raise ValueError(f"no weights for {device}")


def test_two_ranks_started_by_the_run_equal_one_device_and_report_progress():
    steps = []
    got = run_job(["cpu", "cpu"], LOAD, callback=steps.append, **RUN)
    expected = run_job(["cpu"], LOAD, **RUN)   # in this process
    assert rel_err(got.latents, expected.latents) < 1e-5
    assert (got.parallel["world"], got.parallel["cfg"], got.parallel["ulysses"]) == (2, 2, 1)   # guided: CFG halves
    assert [s.step for s in steps] == [0, 1, 2, 3]


def test_a_cancel_stops_every_rank_and_raises():
    steps = []
    started = time.monotonic()
    with pytest.raises(GenerationCancelled, match="cancelled before step"):
        run_job(["cpu", "cpu"], LOAD, callback=steps.append, should_cancel=lambda: bool(steps), **RUN | {"steps": 40})
    assert len(steps) < 40 and time.monotonic() - started < 60


def test_a_rank_that_cannot_load_fails_the_job_with_its_error():
    with pytest.raises(JobFailed, match="no weights for cpu"):
        run_job(["cpu", "cpu"], _cannot_load, **RUN)
