"""`wanflow bench` on the CPU with the tiny DiT: the table, the JSON, and the real-size model tables."""
from __future__ import annotations

import json

import pytest
import torch

from flows.bench import BENCH_MODELS, main, run_bench
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


@pytest.mark.parametrize(("model", "billions"), [("t2v-A14B", 14.29), ("ti2v-5B", 5.0)])
def test_real_size_models_have_the_released_parameter_counts(model, billions):
    with torch.device("meta"):
        dit = WanDiT(BENCH_MODELS[model].dit)
    assert sum(p.numel() for p in dit.parameters()) / 1e9 == pytest.approx(billions, abs=0.02)


@pytest.mark.slow
def test_warm_compile_is_measured_in_a_second_process():
    facts, rows = run_bench("tiny", tiers=("balanced",), repeats=1, device="cpu",
                            options=TierOptions(compile_backend="eager"))
    assert rows[0].compile_cold_s is not None and rows[0].compile_warm_s is not None
    assert facts["tokens"] == 32
