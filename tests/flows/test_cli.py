"""The wanflow command line: every request field is an option; demo prints where the video is."""
from __future__ import annotations

import json
from pathlib import Path

import imageio_ffmpeg
import pytest

import flows.cli
import flows.generate
from flows.cli import main
from flows.request import GenerationRequest
from tasks.settings import get_settings
from tests.lora_files import in_layout, official_lora, write_lora


def test_every_request_field_is_a_generate_option(capsys):
    with pytest.raises(SystemExit) as done:
        main(["generate", "--help"])
    assert done.value.code == 0
    usage = capsys.readouterr().out
    options = {"loras": "--lora NAME_OR_PATH[:STRENGTH[:EXPERT]]"}  # one option per LoRA
    for name in GenerationRequest.model_fields:
        assert options.get(name, f"--{name.replace('_', '-')}") in usage


def test_invalid_request_is_refused_before_any_run(wan_env, capsys):
    assert main(["generate", "--prompt", "a cat", "--task", "tiny", "--size", "1280*720"]) == 2
    assert "size: '1280*720' is not offered by task 'tiny'" in capsys.readouterr().err


@pytest.fixture
def no_run(monkeypatch):
    """Fails the test if the CLI gets as far as starting a run (and with it Prefect)."""
    monkeypatch.setattr(flows.generate, "generate_video", lambda *a: pytest.fail("the CLI started a run"))


def test_a_bad_checkpoint_or_image_is_one_line_and_exit_2(wan_env, tmp_path, capsys, no_run):
    (tmp_path / "empty").mkdir()
    (tmp_path / "photo.png").write_text("a text file named .png\n")
    cases = {("--task", "t2v-A14B", "--checkpoint", "empty"): "invalid request: checkpoint: missing DiT config in ",
             ("--task", "tiny-i2v", "--image", "photo.png"): "invalid request: image: 'photo.png' is not a PNG, JPEG, "
                                                              "WEBP or BMP image (the formats allowed)"}
    for options, line in cases.items():
        assert main(["generate", "--prompt", "a cat", *options]) == 2
        [printed] = capsys.readouterr().err.splitlines()
        assert printed.startswith(line)


def test_generate_asks_for_a_prompt_and_refuses_an_empty_one(wan_env, capsys, no_run):
    with pytest.raises(SystemExit) as done:
        main(["generate", "--task", "tiny"])
    assert done.value.code == 2 and "the following arguments are required: --prompt" in capsys.readouterr().err
    assert main(["generate", "--task", "tiny", "--prompt", "  "]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "invalid request: prompt: is only whitespace; say what the video shows"]


@pytest.fixture
def lora_dir(wan_env, tmp_path, monkeypatch):
    """WAN_LORA_DIR holding style.safetensors (for the tiny DiT)."""
    write_lora(tmp_path / "loras" / "style.safetensors", in_layout(official_lora(1), "official"))
    monkeypatch.setenv("WAN_LORA_DIR", str(tmp_path / "loras"))
    get_settings.cache_clear()
    return tmp_path / "loras"


@pytest.fixture
def requested(monkeypatch) -> list[GenerationRequest]:
    """The requests the CLI would run (none is)."""
    requests = []
    monkeypatch.setattr(flows.cli, "_run", lambda request, verbose: requests.append(request) or 0)
    return requests


def test_lora_options_stack_in_order_and_distilled_fills_the_lightning_settings(lora_dir, requested):
    assert main(["generate", "--prompt", "a cat", "--task", "tiny", "--lora", "style:0.5:high",
                 "--lora", f"{lora_dir / 'style.safetensors'}::low", "--lora", "style", "--distilled"]) == 0
    [request] = requested
    file = str(lora_dir / "style.safetensors")
    assert [(lora.file, lora.strength, lora.expert) for lora in request.loras] == [
        (file, 0.5, "high"), (file, 1.0, "low"), (file, 1.0, "both")]
    assert request.distilled and (request.steps, request.shift, request.guide_scale, request.solver) == (
        4, 5.0, 1.0, "lightning")
    assert main(["generate", "--prompt", "a cat", "--task", "tiny"]) == 0
    assert requested[1].loras == [] and not requested[1].distilled


@pytest.mark.parametrize(("lora", "line"), [
    ("style:strong", "invalid --lora 'style:strong': STRENGTH 'strong' is not a number; the form is "
                     "NAME_OR_PATH[:STRENGTH[:EXPERT]], STRENGTH 0-2 (default 1), EXPERT both, high or low (default "
                     "both)"),
    ("style:1:middle", "invalid --lora 'style:1:middle': EXPERT 'middle' is not both, high or low; the form is "),
    (":0.5", "invalid --lora ':0.5': NAME_OR_PATH is empty; the form is "),
    ("style:2.5", "invalid request: loras.0.strength: Input should be less than or equal to 2"),
    ("nosuch", "invalid request: loras[0].file: "),
])
def test_a_bad_lora_option_is_one_line_and_exit_2(lora_dir, requested, capsys, lora, line):
    assert main(["generate", "--prompt", "a cat", "--task", "tiny", "--lora", lora]) == 2
    [printed] = capsys.readouterr().err.splitlines()
    assert printed.startswith(line) and requested == []


def test_distilled_with_other_sampling_settings_is_one_line_and_exit_2(wan_env, requested, capsys):
    assert main(["generate", "--prompt", "a cat", "--task", "tiny", "--distilled", "--steps", "8"]) == 2
    [printed] = capsys.readouterr().err.splitlines()
    assert printed.startswith("invalid request: distilled: the distilled mode runs 4 steps") and "steps=8" in printed


def test_batch_blames_bad_defaults_on_defaults(wan_env, tmp_path, capsys):
    (tmp_path / "m.yaml").write_text("- {prompt: one, task: tiny}\n")
    assert main(["batch", "m.yaml", "--defaults", "{task: tiny}"]) == 2
    assert capsys.readouterr().err.startswith("invalid --defaults: not JSON (")
    assert main(["batch", "m.yaml", "--defaults", '["tiny"]']) == 2
    assert capsys.readouterr().err.startswith("invalid --defaults: an object of request fields")


def test_gpus_prints_the_profile(wan_env, monkeypatch, capsys):
    monkeypatch.setenv("WAN_GPU_INVENTORY", '[{"name": "H200", "total_gb": 150}]')
    get_settings.cache_clear()
    assert main(["gpus", "--json"]) == 0
    profile = json.loads(capsys.readouterr().out)
    assert profile["source"] == "inventory" and profile["gpus"][0]["name"] == "H200"
    assert main(["gpus"]) == 0
    assert "gpu 0 (cpu): H200, 150.0 GB total" in capsys.readouterr().out


def test_demo_runs_the_tiny_preset_end_to_end(prefect_server, wan_env, capsys):
    assert main(["demo"]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    video = Path(lines["video"])
    assert video.is_file() and video.is_relative_to(wan_env.resolve())
    reader = imageio_ffmpeg.read_frames(str(video))
    meta = next(reader)
    assert (meta["size"], sum(1 for _ in reader)) == ((64, 64), 33)  # 2 s at 16 fps
