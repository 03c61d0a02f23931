"""LoRA conformance with the test-only oracles (refs/f_lora.pt, written by tests/oracle/make_lora_refs.py):
merged weights equal diffusers 0.42.1's Wan LoRA loader for a LoRA in each layout, and the 4-step distilled
(Wan2.2-Lightning) loop on LoRA-merged experts equals the official WanModel's loop within 1e-4. Also the
distilled plan itself: the Lightning timesteps, the expert switch of T2V and I2V, one forward per step and
no negative prompt encoded."""
from __future__ import annotations

import hashlib

import pytest
import torch

import wan_engine
from patches.lora import LoraConfig, apply_loras
from tests.conftest import ORACLE_DIR, load_ref, rel_err
from tests.lora_files import in_layout, official_lora, write_lora
from wan_engine.configs import DISTILLED, MODEL_SPECS
from wan_engine.lora import LoraChoice
from wan_engine.plan import HIGH_NOISE, LOW_NOISE, plan_steps


@pytest.fixture(scope="module")
def ref():
    return load_ref("f_lora.pt")


@pytest.fixture(scope="module")
def pipe():
    return wan_engine.load_pipeline(ORACLE_DIR / "t2v-A14B-tiny", device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("layout", ["official", "diffusers", "comfy"])
def test_merged_weights_equal_diffusers_loader(pipe, ref, tmp_path, layout):
    case = ref["merges"][layout]
    path = write_lora(tmp_path / f"{layout}.safetensors",
                      in_layout(official_lora(case["seed"], diff_b=case["diff_b"]), layout))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == case["sha256"]   # the file the oracle loaded
    with apply_loras(pipe, LoraConfig((LoraChoice(str(path), ref["strength"], "high"),))):
        merged = pipe.experts["high_noise"].state_dict()
        worst = max((merged[k] - v).abs().max().item() for k, v in case["weights"].items())
    assert worst <= 1e-6


def test_distilled_plan_is_lightnings():
    for name in ("t2v-A14B", "i2v-A14B", "tiny", "tiny-i2v"):
        steps = plan_steps(MODEL_SPECS[name], **DISTILLED.sampling())
        assert steps.timesteps == (1000.0, 937.5, 833.3333129882812, 625.0)
        assert steps.experts == (HIGH_NOISE, HIGH_NOISE, LOW_NOISE, LOW_NOISE)   # boundary 0.875 / 0.900
        assert steps.guide_scales == (1.0,) * 4 and steps.shift == 5.0


def test_distilled_runs_one_forward_per_step_without_negative_prompt(pipe):
    plan = pipe.plan(size=(64, 64), frame_num=5, **DISTILLED.sampling())
    assert plan.cfg == "none" and plan.branches == ("cond",)
    text = pipe.encode_prompt(plan, "a cat", negative_prompt="blurry")
    assert text.context.shape[0] == 1 and set(text.tokens) == {"prompt"}
    calls = []
    for dit in pipe.experts.values():
        calls.append(dit.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0])))
    try:
        pipe.sample(plan, text.context)
    finally:
        for handle in calls[:2]:
            handle.remove()
    assert calls[2:] == [1, 1, 1, 1]   # four batch-1 forwards


def test_distilled_loop_on_merged_loras_equals_official(pipe, ref, tmp_path):
    loop = ref["loop"]
    choices = []
    for sub, expert in (("high_noise_model", "high"), ("low_noise_model", "low")):
        spec = loop["loras"][sub]
        path = write_lora(tmp_path / f"{sub}.safetensors",
                          in_layout(official_lora(spec["seed"], extras=spec["extras"]), "official"))
        choices.append(LoraChoice(str(path), 1.0, expert))
    with apply_loras(pipe, LoraConfig(tuple(choices))):
        plan = pipe.plan(size=loop["size"], frame_num=loop["frame_num"], noise=loop["noise"], **DISTILLED.sampling())
        assert torch.equal(torch.tensor(plan.steps.timesteps), loop["timesteps"])
        latents = pipe.sample(plan, loop["context"][None]).latents[0]
    assert rel_err(latents, loop["final_latents"]) < 1e-4
