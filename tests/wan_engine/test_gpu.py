"""GPU checks (run on the device machine: pytest -m gpu): bf16 on CUDA against the fp32 oracle."""
from __future__ import annotations

import pytest
import torch

import wan_engine
from tests.conftest import ORACLE_DIR, load_ref, rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_bf16_dit_forward_matches_official_fp32():
    pipe = wan_engine.load_pipeline(ORACLE_DIR / "t2v-A14B-tiny", device="cuda", dtype=torch.bfloat16)
    for case in load_ref("a_dit_forward.pt")["cases"]:
        if not case["name"].startswith("t2v_") or "batch2" in case["name"]:
            continue
        expert = pipe.experts["high_noise" if "_high_" in case["name"] else "low_noise"]
        i = case["inputs"]
        with torch.no_grad():
            out = expert(i["x"][0][None].cuda(), i["t"].cuda(), i["context"][0][None].cuda().bfloat16())
        assert rel_err(out[0].cpu(), case["output"][0]) < 2e-2, case["name"]


def test_bf16_t2v_loop_close_to_official():
    run = load_ref("e_t2v_loop.pt")["runs"]["unipc_shift12"]
    pipe = wan_engine.load_pipeline(ORACLE_DIR / "t2v-A14B-tiny", device="cuda", dtype=torch.bfloat16)
    result = pipe.generate(run["prompt"], run["n_prompt"], size=tuple(run["size_wh"]), frame_num=run["frame_num"],
                           steps=run["sampling_steps"], shift=run["shift"],
                           guide_scale=tuple(run["guide_scale_low_high"]), solver=run["solver"], noise=run["noise"],
                           decode=False)
    assert rel_err(result.latents, run["final_latents"]) < 2e-2


def test_tiny_preset_generates_on_cuda(tmp_path, monkeypatch):
    monkeypatch.setenv("WAN_CACHE_DIR", str(tmp_path))
    pipe = wan_engine.load_pipeline("tiny", device="cuda:0", dtype=torch.bfloat16)
    result = pipe.generate("a cat", size=(64, 64), frame_num=9, seed=0)
    assert result.frames.shape == (9, 64, 64, 3)
    assert torch.isfinite(result.latents).all()
