"""`wanflow bench` on the CPU with the tiny DiT: the table, the JSON, the real-size model tables, and the
compile measurement (an eager forward first in each process, the warm start of a second process)."""
from __future__ import annotations

import json

import pytest
import torch

import patches.bench as bench
from patches.bench import BENCH_MODELS, BenchRow, bench_pipeline, dit_inputs, format_table, main, run_bench
from patches.tiers import TierOptions
from wan_engine.dit import WanDiT


def test_tiny_bench_prints_a_table(capsys, tmp_path):
    out = tmp_path / "bench.json"
    assert main(["--model", "tiny", "--tiers", "quality", "--repeats", "1", "--device", "cpu",
                 "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "s/forward" in table and "MFU" in table and "compile cold s" in table
    assert table.count("quality") >= 1 and "32 tokens" in table
    result = json.loads(out.read_text())
    row = result["rows"][0]
    assert row["tier"] == "quality" and row["forward_s"] > 0 and 0 < row["mfu"]
    assert row["compile_cold_s"] is None  # nothing compiled


def test_tiny_ti2v_bench_times_the_text_image_forward_and_a_step_cached_loop(capsys):
    pipe = bench_pipeline("tiny-ti2v", torch.device("cpu"), torch.float32)
    t = dit_inputs(pipe, (64, 64), 9)["t"]
    assert t.tolist() == [[0, 900, 900]]   # one timestep per latent frame, the image's frame at 0
    assert main(["--model", "tiny-ti2v", "--tiers", "speed", "--step-cache", "magcache", "--repeats", "1",
                 "--device", "cpu", "--no-warm"]) == 0
    table = capsys.readouterr().out
    assert "tiny-ti2v DiT (random weights), 64x64, 5 frames" in table
    assert "ratios published wan2.2/ti2v-5B/i2v" in table   # the loop runs the text+image mode, as the forward


def test_a_real_size_model_without_a_gpu_is_refused_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench, "random_dit", lambda *a, **k: pytest.fail("the bench built a model"))
    for argv in ([], ["--model", "ti2v-5B", "--device", "cpu"]):
        assert main(argv) == 2
        [line] = capsys.readouterr().err.splitlines()
        assert line.startswith("bench: --model ") and "needs a CUDA GPU" in line and "--model tiny" in line
    assert main(["--model", "tiny", "--device", "cuda"]) == 2
    assert capsys.readouterr().err.startswith("bench: --device cuda: no CUDA GPU here")


@pytest.mark.parametrize(("model", "billions"), [("t2v-A14B", 14.29), ("ti2v-5B", 5.0)])
def test_real_size_models_have_the_released_parameter_counts(model, billions):
    with torch.device("meta"):
        dit = WanDiT(BENCH_MODELS[model].dit)
    assert sum(p.numel() for p in dit.parameters()) / 1e9 == pytest.approx(billions, abs=0.02)


def test_a_compiled_tier_runs_one_eager_forward_before_its_timed_first_call(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    applied, forwards = [], []
    apply_tier = bench.apply_tier
    monkeypatch.setattr(bench, "apply_tier", lambda pipe, tier, *a, **k: applied.append(tier) or apply_tier(
        pipe, tier, *a, **k))
    pipe = bench_pipeline("tiny", torch.device("cpu"), torch.float32)
    dit = pipe.experts["high_noise"]
    dit.register_forward_pre_hook(lambda *_: forwards.append(list(applied)))
    m = bench._measure_tier(pipe, "balanced", dit_inputs(pipe, (64, 64), 5), 1,
                            TierOptions(compile_backend="eager"), None, per_step=False)
    assert forwards[0] == ["quality"] and forwards[1] == ["quality", "balanced"]   # eager, then the timed first
    assert m["compile_path"] == "compiled cold (artifact saved)"


def test_the_table_says_how_each_compiled_tier_got_its_code():
    facts = dict(device="CPU", torch="x", dtype="float32", model="tiny", size=[64, 64], frames=5, tokens=32,
                 flops=1e9, gemm_tflops=1.0)
    row = BenchRow("balanced", 1.0, 2.0, 1.0, 0.5, None, 3.0, 0.2, "", [], "compiled cold (artifact saved)",
                   "precompiled artifact loaded")
    table = format_table(facts, [row])
    assert "after one eager forward at the same shape" in table
    assert "balanced compiled code: cold process compiled cold (artifact saved); new process precompiled " \
           "artifact loaded" in table


def test_the_table_shows_energy_where_measured_and_dashes_where_not():
    facts = dict(device="GPU", torch="x", dtype="bfloat16", model="tiny", size=[64, 64], frames=5, tokens=32,
                 flops=1e9, gemm_tflops=1.0)
    measured = BenchRow("quality", 2.8, 5.6, 1.0, 0.5, 30.0, None, None, "", [], joules_per_forward=1904.0,
                        watts=680.0, sm_mhz=1590.0, power_capped=0.93)
    unmeasured = BenchRow("speed", 2.8, 5.6, 1.0, 0.5, None, None, None, "", [])
    lines = format_table(facts, [measured, unmeasured]).splitlines()
    quality = next(line for line in lines if line.startswith("quality "))
    assert quality.split()[-4:] == ["1904", "680", "1590", "93%"]
    assert next(line for line in lines if line.startswith("speed ")).split()[-4:] == ["-"] * 4
    assert any("power limit held its SM clock" in line for line in lines)


@pytest.mark.slow
def test_warm_compile_is_measured_in_a_second_process():
    facts, rows = run_bench("tiny", tiers=("balanced",), repeats=1, device="cpu",
                            options=TierOptions(compile_backend="eager"))
    assert rows[0].compile_cold_s is not None and rows[0].compile_warm_s is not None
    assert rows[0].compile_cold_path == "compiled cold (artifact saved)"
    assert rows[0].compile_warm_path == "precompiled artifact loaded"
    assert facts["tokens"] == 32
