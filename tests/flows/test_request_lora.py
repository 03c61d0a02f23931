"""LoRA and distilled fields of a request: a LoRA by name in WAN_LORA_DIR or by path inside the input roots,
strength 0-2, which expert; a bad file is refused at validation; distilled mode fills the Lightning settings."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from flows.request import GenerationRequest
from tasks.allocate import Allocation
from tasks.gpus import GpuProfile
from tests.flows.fixtures import wan_env  # noqa: F401  (pytest fixture)
from tests.lora_files import in_layout, official_lora, write_lora

NO_GPU = GpuProfile(source="none", reason="test")


@pytest.fixture
def lora_env(wan_env, tmp_path, monkeypatch):  # noqa: F811
    from tasks.settings import get_settings
    lora_dir = tmp_path / "loras"
    write_lora(lora_dir / "style.safetensors", in_layout(official_lora(1), "official"))
    monkeypatch.setenv("WAN_LORA_DIR", str(lora_dir))
    monkeypatch.setenv("WAN_INPUT_ROOTS", str(tmp_path / "inputs"))
    get_settings.cache_clear()
    return tmp_path


def _error(**fields) -> str:
    with pytest.raises(ValidationError) as caught:
        GenerationRequest.for_hardware(NO_GPU, **fields)
    return str(caught.value)


def test_loras_by_name_or_by_path_inside_the_roots(lora_env):
    inside = write_lora(lora_env / "inputs" / "mine.safetensors", in_layout(official_lora(2), "diffusers"))
    request = GenerationRequest.for_hardware(NO_GPU, task="tiny", loras=[
        {"file": "style", "strength": 0.5, "expert": "high"}, {"file": str(inside)}])
    assert [lora.file for lora in request.loras] == [str(lora_env / "loras" / "style.safetensors"), str(inside)]
    choices = request.lora_choices()
    assert (choices[0].strength, choices[0].expert, choices[1].expert) == (0.5, "high", "both")
    assert request.describe_run(0, Allocation()).loras == choices


def test_bad_loras_are_refused_with_their_field(lora_env):
    outside = write_lora(lora_env / "elsewhere" / "x.safetensors", in_layout(official_lora(3), "official"))
    assert "loras.0.strength" in _error(task="tiny", loras=[{"file": "style", "strength": 2.5}])
    assert "loras[0].file" in _error(task="tiny", loras=[{"file": str(outside)}]) and "outside" in _error(
        task="tiny", loras=[{"file": str(outside)}])
    locon = dict(official_lora(4), **{"blocks.0.ffn.0.lora_mid.weight": official_lora(4)["blocks.0.ffn.0.alpha"]})
    write_lora(lora_env / "loras" / "locon.safetensors", in_layout(locon, "official"))
    assert "kind we do not support" in _error(task="tiny", loras=[{"file": "locon"}])
    assert "loras[0].file" in _error(task="tiny", loras=[{"file": "missing"}])


def test_distilled_fills_the_lightning_settings(lora_env):
    request = GenerationRequest.for_hardware(NO_GPU, task="tiny", distilled=True, loras=[{"file": "style"}])
    assert (request.steps, request.shift, request.guide_scale, request.solver) == (4, 5.0, 1.0, "lightning")
    assert "distilled: the distilled mode runs 4 steps" in _error(task="tiny", distilled=True, steps=40)


def test_a_manifest_takes_the_same_fields(lora_env):
    from flows.batch import load_manifest
    manifest = lora_env / "inputs" / "m.yaml"
    manifest.parent.mkdir(exist_ok=True)
    manifest.write_text("defaults: {task: tiny, frame_count: 5, distilled: true}\nentries:\n"
                        "  - {prompt: a, loras: [{file: style, strength: 1.5, expert: low}]}\n"
                        "  - {prompt: b, loras: [{file: style, strength: 3}]}\n")
    with pytest.raises(ValueError, match="line 4: loras.0.strength: Input should be less than or equal to 2"):
        load_manifest(manifest, profile=NO_GPU)
    manifest.write_text(manifest.read_text().replace("strength: 3", "strength: 0"))
    first, second = load_manifest(manifest, profile=NO_GPU)
    assert first.request.lora_choices()[0].strength == 1.5 and first.request.solver == "lightning"
