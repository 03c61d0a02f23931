"""The parallel path on one CUDA GPU (pytest -m gpu): NCCL, bf16, the Triton kernels and inductor on a split.

One GPU makes a job of one rank, so these check the CUDA side of the machinery (NCCL functional collectives,
the broadcasts of run_rank, the Triton q/k kernels and compiled blocks on a Ulysses shard), not the speed-up."""
from __future__ import annotations

import datetime
import socket

import pytest
import torch
import torch.distributed as dist

import wan_engine
from patches.compile import CompileConfig, apply_compile
from tests.conftest import ORACLE_DIR, rel_err
from wan_engine.parallel import ParallelPlan, init_job_group, run_rank
from wan_engine.ulysses import Ulysses

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

T2V = dict(prompt="a red fox in the snow", size=(48, 48), frame_num=9, steps=4, seed=3)


@pytest.fixture(scope="module")
def job():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.cuda.set_device(0)
    store = dist.TCPStore("127.0.0.1", port, 1, is_master=True, timeout=datetime.timedelta(seconds=30))
    group = init_job_group(0, 1, store, "nccl", datetime.timedelta(seconds=30))
    yield group
    group.close()


@pytest.fixture(scope="module")
def pipe():
    return wan_engine.load_pipeline(ORACLE_DIR / "t2v-A14B-tiny", device="cuda", dtype=torch.bfloat16)


def test_run_rank_on_nccl_equals_generate(job, pipe):
    got = run_rank(pipe, job, ParallelPlan(1, 1), **T2V, decode=False)
    expected = pipe.generate(**T2V, decode=False)
    assert rel_err(got.latents, expected.latents) < 1e-3
    assert got.parallel["world"] == 1 and len(got.parallel["rank_denoise_seconds"]) == 1


def test_a_shard_on_cuda_takes_the_triton_kernels_and_compiles(job, pipe):
    dit = pipe.experts["high_noise"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 16, 3, 6, 6, device="cuda", generator=gen)
    t = torch.tensor([900], device="cuda")
    context = torch.randn(1, 12, 4096, device="cuda", generator=gen).bfloat16()
    ulysses = Ulysses.of(job.group)
    with torch.no_grad():
        plain = dit(x, t, context)
        split = dit(x, t, context, ulysses=ulysses)
        assert rel_err(split, plain) < 1e-3
        with apply_compile(pipe, CompileConfig(precompiled=False)):
            compiled = dit(x, t, context, ulysses=ulysses)
    assert rel_err(compiled, plain) < 2e-2
