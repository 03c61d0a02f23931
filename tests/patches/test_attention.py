"""Attention backend: SDPA where FA4 cannot run (with the reason), FA4 installed through the engine's
seam and captured whole by torch.compile, exact removal. FA4 itself needs a GPU: a stand-in module
with its call signature and layout ([B, L, N, D], returns (out, lse)) plays it on the CPU."""
from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

import patches.attention as attention
from patches.attention import AttentionConfig, apply_attention, fa4_attention, select_backend
from patches.compile import CompileConfig, apply_compile
from tests.conftest import rel_err
from tests.patches import generate


@pytest.fixture
def stand_in_fa4(monkeypatch):
    """A `flash_attn.cute` whose flash_attn_func is SDPA in FA4's layout, counted; FA4 reported usable."""
    calls = []

    def flash_attn_func(q, k, v):
        calls.append(q.shape)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).contiguous(), None

    package = types.ModuleType("flash_attn")
    module = types.ModuleType("flash_attn.cute")
    module.flash_attn_func = flash_attn_func
    package.cute = module
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", module)
    monkeypatch.setattr(attention, "fa4_status", lambda device, dtype=None: (True, "FlashAttention-4 (stand-in)"))
    monkeypatch.setattr(attention, "_probe_fa4", lambda *args: None)
    return calls


def test_cpu_runs_sdpa_and_says_why():
    backend, why = select_backend("cpu", torch.bfloat16)
    assert backend == "sdpa" and "torch SDPA" in why
    with pytest.raises(RuntimeError, match="'fa4' was requested"):
        select_backend("cpu", torch.bfloat16, "fa4")


def test_auto_on_a_cpu_changes_nothing(pipe, reference, caplog):
    with caplog.at_level("INFO", logger="patches.attention"), apply_attention(pipe) as handle:
        assert "SDPA" in handle.detail
        assert torch.equal(generate(pipe), reference)
    assert any("attention backend: torch SDPA" in r.message for r in caplog.records)


def test_fa4_contract_matches_sdpa(stand_in_fa4):
    q, k, v = torch.randn(3, 2, 4, 40, 16).unbind(0)  # [B, N, L, D] each
    assert rel_err(fa4_attention(q, k, v), F.scaled_dot_product_attention(q, k, v)) < 1e-6
    assert stand_in_fa4 == [torch.Size([2, 40, 4, 16])]  # FA4 saw its own layout


def test_fa4_installs_through_the_seam_and_removes_exactly(pipe, reference, stand_in_fa4):
    with apply_attention(pipe, AttentionConfig("fa4")) as handle:
        assert "stand-in" in handle.detail
        assert rel_err(generate(pipe), reference) < 1e-5
        assert stand_in_fa4  # the engine called FA4
    count = len(stand_in_fa4)
    assert torch.equal(generate(pipe), reference)
    assert len(stand_in_fa4) == count


def test_compiled_blocks_capture_fa4_as_one_op(pipe, stand_in_fa4):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compiler.reset()
    with apply_attention(pipe, AttentionConfig("fa4")), apply_compile(pipe, CompileConfig(backend=backend)):
        generate(pipe)
    assert len(graphs) == 1  # fullgraph: no break at the kernel call
    assert "flash_attention_4" in graphs[0].code
