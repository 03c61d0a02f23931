"""Compile patch: blocks compiled in place, one graph shared by every block, exact removal, cache dir."""
from __future__ import annotations

import os

import torch

from patches.compile import CACHE_ENV, CompileConfig, apply_compile, compile_status, wanflow_inductor_dir, warm_up
from tests.patches import generate


class CountingBackend:
    """A torch.compile backend that runs the captured graph as is and counts the graphs."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def compiled(pipe) -> list[bool]:
    return [block._compiled_call_impl is not None for block in pipe.repeated_blocks()]


def test_compiled_blocks_give_the_same_video_and_remove_restores_eager(pipe, reference):
    handle = apply_compile(pipe, CompileConfig(backend="eager"))
    assert all(compiled(pipe))
    assert torch.equal(generate(pipe), reference)
    handle.remove()
    assert not any(compiled(pipe))
    assert torch.equal(generate(pipe), reference)


def test_warm_up_compiles_one_graph_for_every_block_of_both_experts(pipe):
    backend = CountingBackend()
    torch.compiler.reset()
    with apply_compile(pipe, CompileConfig(backend=backend)):
        seconds = warm_up(pipe, (64, 64), 5)
        assert seconds > 0 and backend.graphs == 1
        generate(pipe)  # the run at the warmed shape compiles nothing more
        assert backend.graphs == 1


def test_inductor_cache_goes_under_wanflow_unless_the_user_chose(pipe, monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("WAN_CACHE_DIR", str(tmp_path))
    import torch._inductor.config as inductor_config

    inductor_config_before = inductor_config.fx_graph_cache
    with apply_compile(pipe, CompileConfig()) as handle:
        assert os.environ[CACHE_ENV] == str(tmp_path / "inductor") == str(wanflow_inductor_dir())
        assert inductor_config.fx_graph_cache
        assert "cache" in handle.detail
    assert CACHE_ENV not in os.environ
    assert inductor_config.fx_graph_cache == inductor_config_before

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    with apply_compile(pipe, CompileConfig()):
        assert os.environ[CACHE_ENV] == str(tmp_path / "mine")
    assert os.environ[CACHE_ENV] == str(tmp_path / "mine")


def test_inductor_compile_is_off_on_a_cpu_but_trace_backends_run_anywhere():
    on, why = compile_status("cpu")
    assert not on and "no CUDA GPU" in why
    assert compile_status("cpu", "eager")[0]
