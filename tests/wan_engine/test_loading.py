"""The loader on official-layout folders: clear errors before compute, presets, import hygiene."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
import torch

import wan_engine
from tests.conftest import ORACLE_DIR
from wan_engine.loading import CheckpointError
from wan_engine.pipeline import MemoryPlan, plan_memory
from wan_engine.tiny import materialise_tiny


@pytest.fixture()
def t2v_copy(tmp_path):
    dst = tmp_path / "Wan2.2-T2V-A14B"
    shutil.copytree(ORACLE_DIR / "t2v-A14B-tiny", dst)
    return dst


@pytest.mark.parametrize("rel", [
    "low_noise_model/diffusion_pytorch_model.safetensors",
    "low_noise_model/config.json",
    "models_t5_umt5-xxl-enc-bf16.pth",
    "Wan2.1_VAE.pth",
    "google/umt5-xxl/tokenizer.json",
])
def test_missing_file_is_named(t2v_copy, rel):
    (t2v_copy / rel).unlink()
    with pytest.raises((CheckpointError, FileNotFoundError), match=rel.split("/")[-1].replace(".", r"\.")):
        wan_engine.load_pipeline(t2v_copy, dtype=torch.float32)


@pytest.mark.parametrize("rel", ["high_noise_model/diffusion_pytorch_model.safetensors",
                                 "models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth"])
def test_truncated_file_is_named(t2v_copy, rel):
    path = t2v_copy / rel
    data = path.read_bytes()
    path.unlink()   # the fixture's files are hard links: write a new file, not through the link
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=path.name.replace(".", r"\.")):
        wan_engine.load_pipeline(t2v_copy, dtype=torch.float32)


def test_mismatched_expert_names_tensor_and_shapes(t2v_copy):
    cfg_path = t2v_copy / "high_noise_model" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.unlink()
    cfg["ffn_dim"] = 96
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"high_noise_model.*ffn.*\(128, 64\).*\(96, 64\)"):
        wan_engine.load_pipeline(t2v_copy, dtype=torch.float32)


def test_sharded_dit_loads_like_a_single_file(t2v_copy):
    from safetensors.torch import load_file, save_file

    folder = t2v_copy / "low_noise_model"
    single = folder / "diffusion_pytorch_model.safetensors"
    sd = load_file(single)
    keys = sorted(sd)
    half = len(keys) // 2
    names = ["diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]
    save_file({k: sd[k] for k in keys[:half]}, folder / names[0])
    save_file({k: sd[k] for k in keys[half:]}, folder / names[1])
    index = {"metadata": {}, "weight_map": {k: names[i >= half] for i, k in enumerate(keys)}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    single.unlink()
    sharded = wan_engine.load_pipeline(t2v_copy, dtype=torch.float32)
    reference = wan_engine.load_pipeline(ORACLE_DIR / "t2v-A14B-tiny", dtype=torch.float32)
    for (k, a), b in zip(sharded.experts["low_noise"].state_dict().items(),
                         reference.experts["low_noise"].state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_unknown_folder_and_presets():
    with pytest.raises(CheckpointError, match="does not exist"):
        wan_engine.load_pipeline("/nonexistent/Wan2.2-T2V-A14B")
    with pytest.raises(CheckpointError, match="checkpoint folder"):
        wan_engine.load_pipeline("t2v-A14B")


def test_bf16_load_casts_dits_and_keeps_vae_float32():
    pipe = wan_engine.load_pipeline(ORACLE_DIR / "t2v-A14B-tiny", dtype=torch.bfloat16)
    assert pipe.spec.name == "t2v-A14B"
    assert {p.dtype for p in pipe.experts["high_noise"].parameters()} == {torch.bfloat16}
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.float32}
    assert not any(p.is_meta for p in pipe.experts["low_noise"].parameters())


def test_tiny_preset_is_deterministic_and_fast(tmp_path, monkeypatch):
    a = materialise_tiny("tiny", seed=7, cache_dir=tmp_path / "a")
    b = materialise_tiny("tiny", seed=7, cache_dir=tmp_path / "b")
    for f in sorted(p.relative_to(a) for p in a.rglob("*") if p.suffix in (".safetensors", ".json")):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    monkeypatch.setenv("WAN_CACHE_DIR", str(tmp_path / "a"))
    t0 = time.perf_counter()
    pipe = wan_engine.load_pipeline("tiny", dtype=torch.float32)
    result = pipe.generate("a cat walks along the sea, cinematic", size=(64, 64), frame_num=5, seed=0)
    elapsed = time.perf_counter() - t0
    assert result.frames.shape == (5, 64, 64, 3)
    assert elapsed < 20, f"tiny 5-frame 64x64 generation took {elapsed:.1f}s"
    again = pipe.generate("a cat walks along the sea, cinematic", size=(64, 64), frame_num=5, seed=0)
    assert torch.equal(again.latents, result.latents)


def test_tiny_i2v_preset_generates(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("WAN_CACHE_DIR", str(tmp_path))
    pipe = wan_engine.load_pipeline("tiny-i2v", dtype=torch.float32)
    result = pipe.generate("a dog", image=Image.new("RGB", (128, 96), (200, 30, 30)), size=(64, 64),
                           frame_num=5, steps=2)
    assert result.frames.shape[0] == 5 and result.frames.shape[-1] == 3
    with pytest.raises(ValueError, match="image"):
        pipe.generate("a dog", size=(64, 64), frame_num=5)


def test_memory_plan_prefers_resident_experts():
    gib = 1 << 30
    assert plan_memory(None, 28 * gib, 2, 11 * gib, gib, 10 * gib) == MemoryPlan(True, True)
    assert plan_memory(140 * gib, 28 * gib, 2, 11 * gib, gib, 10 * gib) == MemoryPlan(True, True)
    assert plan_memory(75 * gib, 28 * gib, 2, 11 * gib, gib, 10 * gib) == MemoryPlan(True, False)
    assert plan_memory(60 * gib, 28 * gib, 2, 11 * gib, gib, 10 * gib) == MemoryPlan(False, False)


def test_wan_engine_never_imports_prefect():
    code = ("import sys; sys.modules['prefect'] = None; sys.modules['flows'] = None; sys.modules['tasks'] = None;"
            "sys.modules['patches'] = None; import wan_engine, wan_engine.loading, wan_engine.tiny; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
