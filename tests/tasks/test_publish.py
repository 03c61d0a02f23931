"""publish: a video and its record appear in outputs/ all at once or not at all."""
from __future__ import annotations

import datetime as dt
import json
import os

import pytest
import torch

from patches.power import PowerReading
from tasks import publish as publish_module
from tasks.allocate import Allocation
from tasks.encode import EncodedVideo
from tasks.gpu_phase import Denoised, energy_record
from tasks.publish import Published, build_record, describe_markdown, publish, publish_files, slugify
from tasks.staging import STAGING, host_id, new_staging_folder, process_start
from tasks.warmup import WarmUp
from tests.tasks.rendering import render
from tests.tasks.runs import tiny_run

DAY = dt.date(2026, 3, 14)


def _video(outputs):
    """An MP4 as the encode task leaves it: in a staging folder of its own."""
    path = new_staging_folder(outputs) / "video.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42")
    return path


def test_publish_writes_video_and_metadata(tmp_path):
    outputs = tmp_path / "outputs"
    folder = publish_files(_video(outputs), {"seed": 7, "prompt": "雪の中の狐"}, outputs, "fox-1a2b3c4d", DAY)
    assert folder == outputs / "2026-03-14" / "fox-1a2b3c4d"
    assert sorted(p.name for p in folder.iterdir()) == ["metadata.json", "video.mp4"]
    assert json.loads((folder / "metadata.json").read_text(encoding="utf-8")) == {"seed": 7, "prompt": "雪の中の狐"}
    assert list((outputs / STAGING).iterdir()) == []  # the staging folder was renamed into place


def test_publish_refuses_a_video_staged_elsewhere(tmp_path):
    elsewhere = _video(tmp_path / "other-outputs")
    with pytest.raises(ValueError, match="same outputs folder"):
        publish_files(elsewhere, {}, tmp_path / "outputs", "fox-1a2b3c4d", DAY)
    assert elsewhere.is_file()


def test_failed_publish_leaves_nothing_behind(tmp_path, monkeypatch):
    outputs = tmp_path / "outputs"

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(publish_module.json, "dump", full_disk)
    with pytest.raises(OSError, match="No space left"):
        publish_files(_video(outputs), {"seed": 7}, outputs, "fox-1a2b3c4d", DAY)
    assert not (outputs / "2026-03-14" / "fox-1a2b3c4d").exists()
    assert list((outputs / STAGING).iterdir()) == []


def _staging(outputs, name):
    folder = outputs / STAGING / name
    folder.mkdir(parents=True)
    (folder / "video.mp4").write_bytes(b"half")
    return folder


def test_staging_of_dead_processes_of_this_host_is_swept(tmp_path):
    outputs = tmp_path / "outputs"
    dead = _staging(outputs, f"{host_id()}.0a1b2c3d4e5f.12345.999999999")  # no such pid
    publish_files(_video(outputs), {}, outputs, "new-run", DAY)
    assert not dead.exists()


@pytest.mark.parametrize("host", ["gpu-b+4026531836", f"{host_id().split('+')[0]}+1"],
                         ids=["another host", "this host name, another pid namespace"])
def test_staging_of_another_host_is_left_alone(tmp_path, host):
    """With outputs shared between hosts, a pid that is dead here may be publishing there."""
    outputs = tmp_path / "outputs"
    elsewhere = _staging(outputs, f"{host}.0a1b2c3d4e5f.12345.999999999")
    publish_files(_video(outputs), {}, outputs, "new-run", DAY)
    assert (elsewhere / "video.mp4").read_bytes() == b"half"


def test_staging_whose_pid_now_belongs_to_another_process_is_swept(tmp_path):
    outputs = tmp_path / "outputs"
    pid = os.getpid()
    reused = _staging(outputs, f"{host_id()}.0a1b2c3d4e5f.1.{pid}")  # this pid, started at another time
    live = _staging(outputs, f"{host_id()}.0a1b2c3d4e5f.{process_start(pid)}.{pid}")  # this process, staging
    publish_files(_video(outputs), {}, outputs, "new-run", DAY)
    assert not reused.exists() and live.exists()


def test_slugify():
    assert slugify("A red fox, trotting through SNOW!") == "a-red-fox-trotting-through-snow"
    assert slugify("色调艳丽") == "video"
    assert len(slugify("x" * 100)) == 40


def _published_at(folder) -> Published:
    return Published(folder=folder, video=folder / "video.mp4", metadata=folder / "metadata.json", seed=4)


def test_record_holds_the_tier_its_patches_and_the_steps_it_skipped(tmp_path):
    schedule = {"method": "teacache", "computed_steps": {"cond": [0, 1, 3], "uncond": [0, 1, 3]},
                "skipped_steps": {"cond": [2], "uncond": [2]}, "computed": 6, "skipped": 2, "total": 8}
    denoised = Denoised(latents=torch.zeros(16, 2, 8, 8), seed=4, settings={"steps": 4}, timings={"load": 1.0},
                        step_seconds=[0.5, 0.5, 0.01, 0.5], experts_per_step=["high_noise"] * 4,
                        tier={"tier": "speed", "patches": [{"name": "teacache", "on": True, "detail": "0.3"}]},
                        step_cache=schedule, block_stack=["computed", "computed", "reused", "computed"])
    video = EncodedVideo(tmp_path / "v.mp4", frames=5, width=64, height=64, fps=16, decode_s=0.2, write_s=0.1)
    warm = WarmUp("speed", True, 12.5, 3.0, "torch.compile (inductor) of the repeated blocks")
    record = build_record(tiny_run(tier="speed"), denoised, video, "run", warm)
    assert record["tier"] == "speed" and record["patches"] == denoised.tier["patches"]
    assert record["compile"] == {"compiled": True, "seconds": 12.5, "detail": warm.detail}
    assert record["timings_s"]["compile_warm_up"] == 12.5 and record["timings_s"]["load"] == 4.0
    assert record["step_cache"] == schedule and record["skipped_steps"] == [2]
    assert record["model_calls"] == {"computed": 6, "skipped": 2, "total": 8}
    assert record["block_stack_per_step"][2] == "reused"
    markdown = describe_markdown(_published_at(tmp_path), record)
    assert "teacache: 6/8 model calls computed, 2 skipped" in markdown and "compile warm-up 12.5 s" in markdown
    assert record["energy"] is None and "the GPU drew" not in markdown


def test_record_and_page_show_the_parallel_plan_and_each_ranks_seconds(tmp_path):
    engine = {"resident": True, "pid": 7, "loads": 1, "parallel": {"ulysses": 2, "cfg": 2, "gpus": [0, 1, 2, 3],
              "world_size": 4}, "ranks": [{"rank": r, "device": f"cuda:{r}", "denoise_s": 1.5 + r} for r in range(4)]}
    denoised = Denoised(latents=torch.zeros(16, 2, 8, 8), seed=4, settings={"steps": 4}, timings={"load": 0.0},
                        step_seconds=[0.5] * 4, block_stack=["computed"] * 4, engine=engine)
    video = EncodedVideo(tmp_path / "v.mp4", frames=5, width=64, height=64, fps=16, decode_s=0.2, write_s=0.1)
    record = build_record(tiny_run(), denoised, video, "run")
    assert record["engine"] == engine
    markdown = describe_markdown(_published_at(tmp_path), record)
    assert ("4 rank(s) (Ulysses 2 x CFG 2) on resident engine worker(s), pipelines loaded there so far: 1; "
            "denoising per rank: rank 0 1.50 s, rank 1 2.50 s, rank 2 3.50 s, rank 3 4.50 s") in markdown


def test_record_reports_the_gpu_energy_of_the_denoising(tmp_path):
    reading = PowerReading(joules=77_040.0, seconds=112.0, sm_mhz=1603.4, power_capped=0.98, samples=9000)
    denoised = Denoised(latents=torch.zeros(16, 2, 8, 8), seed=4, settings={"steps": 4}, timings={"load": 1.0},
                        step_seconds=[0.5] * 4, energy=energy_record(reading))
    video = EncodedVideo(tmp_path / "v.mp4", frames=5, width=64, height=64, fps=16, decode_s=0.2, write_s=0.1)
    record = build_record(tiny_run(), denoised, video, "run")
    assert record["energy"] == {"joules": 77040.0, "mean_watts": 687.9, "mean_sm_mhz": 1603, "power_capped": 0.98}
    assert ("\n- the GPU drew 77.0 kJ while denoising (688 W mean, SM clock 1,603 MHz, 98% of the time at its power "
            "limit)") in describe_markdown(_published_at(tmp_path), record)


HOSTILE_PROMPTS = [
    "<img src=x onerror=alert(1)> a fox",
    "<script>alert(1)</script>",
    "# heading",
    "a fox\n\n# a second heading\n\n<b>bold</b>",
    "[link](javascript:alert(1)) and ![image](http://example.com/x.png)",
    "`code` and ``more`` and \\`escaped\\`",
    "| a | b |\n|---|---|\n| c | d |",
    "**bold** _em_ ~~struck~~ &lt;b&gt; &amp; https://example.com",
    "1. listed\n> quoted\n---",
]


def _published(outputs, prompt: str) -> tuple[Published, dict]:
    denoised = Denoised(latents=torch.zeros(16, 2, 8, 8), seed=4, settings={"steps": 2}, timings={"load": 1.0},
                        step_seconds=[0.5, 0.5], block_stack=["computed", "computed"])
    video = EncodedVideo(outputs / "v.mp4", frames=5, width=64, height=64, fps=16, decode_s=0.2, write_s=0.1)
    run = tiny_run(prompt=prompt, negative_prompt=prompt, steps=2)
    folder = outputs / "2026-03-14" / "run"
    published = Published(folder=folder, video=folder / "video.mp4", metadata=folder / "metadata.json", seed=4)
    return published, build_record(run, denoised, video, "run")


@pytest.mark.parametrize("prompt", HOSTILE_PROMPTS)
def test_a_hostile_prompt_shows_as_literal_text_in_the_markdown_artifact(tmp_path, prompt):
    outputs = tmp_path / "<b>outputs</b> `x` [y](z)"  # the settings' folder: typed by someone too
    published, record = _published(outputs, prompt)
    rendered = render(describe_markdown(published, record))
    assert set(rendered.tags) <= {"h1", "ul", "li", "code"} and rendered.attributes == []
    assert rendered.text["h1"] == f"tiny: {' '.join(prompt[:80].split())}"
    assert rendered.text["code"] == str(published.video)


def test_the_publish_body_files_the_video_with_the_record_of_its_run(tmp_path, no_prefect_server):
    outputs = tmp_path / "outputs"
    allocation = Allocation(waited_s=1.5, acquired_unix=100.0, released_unix=160.0)
    run = tiny_run(seed=9, allocation=allocation)
    denoised = Denoised(latents=torch.zeros(16, 2, 8, 8), seed=9, settings={"steps": 4}, timings={"load": 1.0},
                        step_seconds=[0.5] * 4, block_stack=["computed"] * 4)
    video = EncodedVideo(_video(outputs), frames=5, width=64, height=64, fps=16, decode_s=0.2, write_s=0.1)
    published = publish.fn(run, denoised, video, str(outputs))
    assert published.folder.parent.parent == outputs.resolve() and published.video.is_file()
    assert published.folder.name.startswith("a-heron-in-the-reeds-") and published.seed == 9
    record = json.loads(published.metadata.read_text())
    assert record["request"] == run.request and (record["seed"], record["tier"]) == (9, "quality")
    assert (record["device"], record["gpus"], record["gpu_wait_s"]) == ("cpu", [], 1.5)
    assert record["gpu_hold"] == {"acquired_unix": 100.0, "released_unix": 160.0}
    assert list((outputs / STAGING).iterdir()) == []  # the staged video was renamed into place
