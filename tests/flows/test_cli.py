"""The wanflow command line: every request field is an option; demo prints where the video is."""
from __future__ import annotations

import json
from pathlib import Path

import imageio_ffmpeg
import pytest

from flows.cli import main
from flows.request import GenerationRequest
from flows.settings import get_settings


def test_every_request_field_is_a_generate_option(capsys):
    with pytest.raises(SystemExit) as done:
        main(["generate", "--help"])
    assert done.value.code == 0
    usage = capsys.readouterr().out
    for name in GenerationRequest.model_fields:
        assert f"--{name.replace('_', '-')}" in usage


def test_invalid_request_is_refused_before_any_run(wan_env, capsys):
    assert main(["generate", "--task", "tiny", "--size", "1280*720"]) == 2
    assert "size: '1280*720' is not offered by task 'tiny'" in capsys.readouterr().err


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
