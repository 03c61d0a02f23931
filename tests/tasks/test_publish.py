"""publish: a video and its record appear in outputs/ all at once or not at all."""
from __future__ import annotations

import datetime as dt
import json

import pytest
import torch

from tasks import publish as publish_module
from tasks.allocate import Allocation
from tasks.denoise import Denoised, energy_record
from tasks.encode import EncodedVideo
from tasks.power import PowerReading
from tasks.publish import STAGING, build_record, publish_files, slugify
from tasks.warmup import WarmUp

DAY = dt.date(2026, 3, 14)


def _video(tmp_path):
    path = tmp_path / "encoded.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42")
    return path


def test_publish_writes_video_and_metadata(tmp_path):
    outputs = tmp_path / "outputs"
    folder = publish_files(_video(tmp_path), {"seed": 7, "prompt": "雪の中の狐"}, outputs, "fox-1a2b3c4d", DAY)
    assert folder == outputs / "2026-03-14" / "fox-1a2b3c4d"
    assert sorted(p.name for p in folder.iterdir()) == ["metadata.json", "video.mp4"]
    assert json.loads((folder / "metadata.json").read_text(encoding="utf-8")) == {"seed": 7, "prompt": "雪の中の狐"}
    assert not (tmp_path / "encoded.mp4").exists()  # moved, not copied
    assert list((outputs / STAGING).iterdir()) == []


def test_failed_publish_leaves_nothing_behind(tmp_path, monkeypatch):
    outputs = tmp_path / "outputs"

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(publish_module.json, "dump", full_disk)
    with pytest.raises(OSError, match="No space left"):
        publish_files(_video(tmp_path), {"seed": 7}, outputs, "fox-1a2b3c4d", DAY)
    assert not (outputs / "2026-03-14" / "fox-1a2b3c4d").exists()
    assert list((outputs / STAGING).iterdir()) == []


def test_staging_of_dead_processes_is_swept(tmp_path):
    outputs = tmp_path / "outputs"
    dead = outputs / STAGING / "old-run.999999999"  # no such pid
    dead.mkdir(parents=True)
    (dead / "video.mp4").write_bytes(b"half")
    publish_files(_video(tmp_path), {}, outputs, "new-run", DAY)
    assert not dead.exists()


def test_slugify():
    assert slugify("A red fox, trotting through SNOW!") == "a-red-fox-trotting-through-snow"
    assert slugify("色调艳丽") == "video"
    assert len(slugify("x" * 100)) == 40


def test_record_holds_the_tier_its_patches_and_the_steps_it_skipped(tmp_path):
    schedule = {"method": "teacache", "computed_steps": {"cond": [0, 1, 3], "uncond": [0, 1, 3]},
                "skipped_steps": {"cond": [2], "uncond": [2]}, "computed": 6, "skipped": 2, "total": 8}
    denoised = Denoised(latents=torch.zeros(16, 2, 8, 8), seed=4, settings={"steps": 4}, timings={"load": 1.0},
                        step_seconds=[0.5, 0.5, 0.01, 0.5], experts_per_step=["high_noise"] * 4,
                        tier={"tier": "speed", "patches": [{"name": "teacache", "on": True, "detail": "0.3"}]},
                        step_cache=schedule, block_stack=["computed", "computed", "reused", "computed"])
    video = EncodedVideo(tmp_path / "v.mp4", frames=5, width=64, height=64, fps=16, decode_s=0.2, write_s=0.1)
    warm = WarmUp("speed", True, 12.5, 3.0, "torch.compile (inductor) of the repeated blocks")
    record = build_record({"tier": "speed", "prompt": "p"}, denoised, video, Allocation(), "run", warm)
    assert record["tier"] == "speed" and record["patches"] == denoised.tier["patches"]
    assert record["compile"] == {"compiled": True, "seconds": 12.5, "detail": warm.detail}
    assert record["timings_s"]["compile_warm_up"] == 12.5 and record["timings_s"]["load"] == 4.0
    assert record["step_cache"] == schedule and record["skipped_steps"] == [2]
    assert record["model_calls"] == {"computed": 6, "skipped": 2, "total": 8}
    assert record["block_stack_per_step"][2] == "reused"
    markdown = "\n".join(publish_module._tier_lines(record))
    assert "teacache: 6/8 model calls computed, 2 skipped" in markdown and "compile warm-up 12.5 s" in markdown
    assert record["energy"] is None and publish_module._energy_lines(record) == []


def test_record_reports_the_gpu_energy_of_the_denoising(tmp_path):
    reading = PowerReading(joules=77_040.0, seconds=112.0, sm_mhz=1603.4, power_capped=0.98, samples=9000)
    denoised = Denoised(latents=torch.zeros(16, 2, 8, 8), seed=4, settings={"steps": 4}, timings={"load": 1.0},
                        step_seconds=[0.5] * 4, energy=energy_record(reading))
    video = EncodedVideo(tmp_path / "v.mp4", frames=5, width=64, height=64, fps=16, decode_s=0.2, write_s=0.1)
    record = build_record({"tier": "quality", "prompt": "p"}, denoised, video, Allocation(), "run")
    assert record["energy"] == {"joules": 77040.0, "mean_watts": 687.9, "mean_sm_mhz": 1603, "power_capped": 0.98}
    assert publish_module._energy_lines(record) == [
        "- the GPU drew 77.0 kJ while denoising (688 W mean, SM clock 1,603 MHz, 98% of the time at its power limit)"]
