"""Compile patch: one compiled block for every block, saved and loaded by a new process without
re-tracing (precompiled artifacts), a new artifact for a new signature, corrupt files replaced, the
torch.compile fallback, exact removal, cache dir. CPU tests use the trace-only "aot_eager" / "eager"
backends; the GPU test runs inductor."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from patches import torch_internals
from patches.compile import (
    CACHE_ENV,
    CompileConfig,
    apply_compile,
    compile_status,
    precompiled_dir,
    wanflow_inductor_dir,
    warm_up,
)
from tests.conftest import rel_err
from tests.patches import generate

ROOT = Path(__file__).resolve().parents[2]
# A new process: the oracle-fixture pipeline, the compile patch, the same seeded run as `generate`.
CHILD = """
import json, sys, torch
import wan_engine
from patches.compile import CompileConfig, apply_compile
from tests.conftest import ORACLE_DIR
from tests.patches import generate
from torch._dynamo.utils import counters
device, backend, out = sys.argv[1:]
dtype = torch.float32 if device == "cpu" else torch.bfloat16
pipe = wan_engine.load_pipeline(ORACLE_DIR / "t2v-A14B-tiny", device=device, dtype=dtype)
with apply_compile(pipe, CompileConfig(backend=backend)) as handle:
    torch.save(generate(pipe).cpu(), out)
    print(json.dumps({"warm_start": handle.warm_start, "graphs": counters["stats"]["unique_graphs"]}))
"""


@pytest.fixture(autouse=True)
def cache_dir(monkeypatch, tmp_path) -> Path:
    """Every test compiles into its own inductor cache dir (precompiled artifacts go under it)."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "inductor"))
    return tmp_path / "inductor"


def run_child(device: str, backend: str, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", CHILD, device, backend, str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def artifacts() -> list[Path]:
    return sorted(precompiled_dir().glob("*.aot"))


class CountingBackend:
    """A torch.compile backend that runs the captured graph as is and counts the graphs."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def compiled(pipe) -> list[bool]:
    return [block._compiled_call_impl is not None for block in pipe.repeated_blocks()]


def test_compiled_blocks_give_the_same_video_and_remove_restores_eager(pipe, reference, monkeypatch):
    monkeypatch.delenv(CACHE_ENV)   # a trace-only backend with no cache dir chosen: compiled blocks in memory only
    handle = apply_compile(pipe, CompileConfig(backend="eager"))
    assert all(compiled(pipe))
    assert torch.equal(generate(pipe), reference)
    assert handle.warm_start == "compiled cold (in memory)" and handle.precompiled.directory is None
    handle.remove()
    assert not any(compiled(pipe))
    assert torch.equal(generate(pipe), reference)


def test_a_new_process_loads_the_saved_blocks_without_tracing(pipe, reference, tmp_path):
    with apply_compile(pipe, CompileConfig(backend="aot_eager")) as handle:
        assert handle.warm_start == "nothing compiled yet"
        assert rel_err(generate(pipe), reference) < 1e-5
        assert handle.warm_start == "compiled cold (artifact saved)"
        assert handle.precompiled.events == {"saved": 1}   # one artifact for the 4 blocks of both experts
    assert len(artifacts()) == 1 and not list(precompiled_dir().glob(".*.tmp"))

    child = run_child("cpu", "aot_eager", tmp_path / "child.pt")
    assert child == {"warm_start": "precompiled artifact loaded", "graphs": 0}   # Dynamo traced nothing
    assert rel_err(torch.load(tmp_path / "child.pt"), reference) < 1e-5
    assert len(artifacts()) == 1


def sdpa_in_python(q, k, v):
    """A different attention backend with the same result (its own function, so its own artifact)."""
    return F.scaled_dot_product_attention(q, k, v)


def test_a_new_signature_or_attention_backend_compiles_anew_and_a_rejected_artifact_is_replaced(pipe, reference):
    with apply_compile(pipe, CompileConfig(backend="aot_eager")) as handle:
        generate(pipe)   # batch 2 (cond and uncond as one batch)
        (batch2,) = artifacts()
        warm_up(pipe, pipe.plan(size=(64, 64), frame_num=5, cfg="sequential"))   # batch 1
        (batch1,) = set(artifacts()) - {batch2}
        assert handle.precompiled.events == {"saved": 2}

    attention = [m for dit in pipe.experts.values() for m in dit.modules() if hasattr(m, "attention_fn")]
    for m in attention:
        m.attention_fn = sdpa_in_python
    try:
        with apply_compile(pipe, CompileConfig(backend="aot_eager")) as handle:
            assert rel_err(generate(pipe), reference) < 1e-5
            assert handle.precompiled.events == {"saved": 1}
    finally:
        for m in attention:
            del m.attention_fn
    assert len(artifacts()) == 3

    # An artifact under another signature's name: its guards reject the call, so it is compiled anew.
    batch2.write_bytes(batch1.read_bytes())
    with apply_compile(pipe, CompileConfig(backend="aot_eager")) as handle:
        assert rel_err(generate(pipe), reference) < 1e-5
        assert handle.warm_start == "compiled cold (artifact saved)"
    assert batch2.read_bytes() != batch1.read_bytes()


def test_a_corrupt_artifact_is_compiled_again_and_replaced(pipe, reference):
    with apply_compile(pipe, CompileConfig(backend="eager")):
        generate(pipe)
    (path,) = artifacts()
    path.write_bytes(b"not a compiled function")
    with apply_compile(pipe, CompileConfig(backend="eager")) as handle:
        assert torch.equal(generate(pipe), reference)
        assert handle.warm_start == "compiled cold (artifact saved)"
    with apply_compile(pipe, CompileConfig(backend="eager")) as handle:
        assert torch.equal(generate(pipe), reference)
        assert handle.warm_start == "precompiled artifact loaded"


def test_without_aot_compile_the_blocks_fall_back_to_torch_compile(pipe, reference, monkeypatch, caplog):
    attempts = []

    def unavailable(*args):
        attempts.append(1)
        raise AttributeError("'function' object has no attribute 'aot_compile'")

    monkeypatch.setattr(torch_internals, "aot_compile", unavailable)
    caplog.set_level(logging.INFO, logger="patches.precompiled")
    torch.compiler.reset()
    with apply_compile(pipe, CompileConfig(backend="eager")) as handle:
        assert torch.equal(generate(pipe), reference)
        assert all(compiled(pipe)) and handle.precompiled.fallen_back
        assert handle.warm_start == "precompile failed; torch.compile, cold"
    assert sum("precompiled blocks unavailable" in r.message for r in caplog.records) == 1
    assert not any(compiled(pipe)) and not artifacts()
    assert torch.equal(generate(pipe), reference)

    # The failure is remembered on disk: a later apply (or process) goes to torch.compile at once.
    (marker,) = precompiled_dir().glob("*.failed")
    assert "aot_compile" in marker.read_text()
    with apply_compile(pipe, CompileConfig(backend="eager")) as handle:
        assert torch.equal(generate(pipe), reference)
        assert handle.precompiled.fallen_back and len(attempts) == 1


def test_warm_up_compiles_one_graph_for_every_block_of_both_experts(pipe):
    backend = CountingBackend()
    torch.compiler.reset()
    with apply_compile(pipe, CompileConfig(backend=backend)):
        seconds = warm_up(pipe, pipe.plan(size=(64, 64), frame_num=5, steps=2))
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

    # torch._dynamo's import writes torch's default dir into the environment: that is no one's choice
    default_cache_dir = torch_internals.default_cache_dir

    monkeypatch.setenv(CACHE_ENV, default_cache_dir())
    with apply_compile(pipe, CompileConfig()) as handle:
        assert os.environ[CACHE_ENV] == str(wanflow_inductor_dir())
        assert handle.precompiled.directory == wanflow_inductor_dir() / "wanflow-precompiled"
    assert os.environ[CACHE_ENV] == default_cache_dir()


def test_inductor_compile_is_off_on_a_cpu_but_trace_backends_run_anywhere():
    on, why = compile_status("cpu")
    assert not on and "no CUDA GPU" in why
    on, why = compile_status("cpu", "eager")
    assert on and f"precompiled blocks on (torch {torch.__version__})" in why


def test_the_block_triton_option_is_part_of_the_artifact_key(pipe, reference):
    with apply_compile(pipe, CompileConfig(backend="eager")) as handle:
        generate(pipe)
        for dit in pipe.experts.values():
            dit.set_triton(False)
        try:
            assert torch.equal(generate(pipe), reference)   # a CPU never takes the kernels: same video
        finally:
            for dit in pipe.experts.values():
                dit.set_triton(True)
        assert handle.precompiled.events == {"saved": 2}
    assert len(artifacts()) == 2


@pytest.mark.parametrize(("version", "known"), [("2.11.0+cu128", True), ("2.13.0+cpu", True),
                                                ("2.12.1", False), ("3.0.0", False)])
def test_precompiling_runs_on_the_torch_releases_it_was_checked_on(version, known):
    on, why = torch_internals.precompile_status(version)
    assert on == (known and hasattr(torch.compiler, "load_compiled_function"))
    if not known:
        assert why == f"torch {version} is not a release its experimental API was checked on (2.11, 2.13)"


def test_an_unknown_torch_keeps_the_plain_path_and_says_why(pipe, reference, monkeypatch):
    monkeypatch.setattr(torch_internals, "KNOWN_TORCH", ())
    on, why = compile_status("cpu", "eager")
    assert on and f"precompiled blocks off (torch {torch.__version__} is not a release" in why
    torch.compiler.reset()
    with apply_compile(pipe, CompileConfig(backend="eager")) as handle:
        assert torch.equal(generate(pipe), reference)
        assert handle.precompiled is None and handle.warm_start == "torch.compile, cold"
    assert not artifacts()


@pytest.mark.gpu
def test_inductor_blocks_saved_on_a_gpu_load_in_a_new_process(tmp_path):
    """torch's aot_compile with inductor on CUDA (the balanced tier's path): the parent compiles and saves,
    a new process loads without tracing, and both give the same latents."""
    import wan_engine
    from tests.conftest import ORACLE_DIR

    pipe = wan_engine.load_pipeline(ORACLE_DIR / "t2v-A14B-tiny", device="cuda", dtype=torch.bfloat16)
    eager = generate(pipe)
    with apply_compile(pipe, CompileConfig()) as handle:
        compiled_run = generate(pipe)
        assert handle.warm_start == "compiled cold (artifact saved)", handle.warm_start
    assert len(artifacts()) == 1
    child = run_child("cuda", "inductor", tmp_path / "child.pt")
    assert child == {"warm_start": "precompiled artifact loaded", "graphs": 0}
    assert rel_err(torch.load(tmp_path / "child.pt").to(compiled_run.device), compiled_run) < 1e-6
    assert rel_err(compiled_run, eager) < 2e-2
