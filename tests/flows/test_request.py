"""GenerationRequest: what a user may ask for, and the messages when they ask for too much."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
from PIL import Image
from pydantic import ValidationError

from flows.request import GenerationRequest, problems
from tasks.gpus import GpuProfile, SimulatedGpu, read_gpu_profile
from wan_engine.sizes import Size

NO_GPU = GpuProfile(source="none", reason="test")
H100S = read_gpu_profile([SimulatedGpu(name="H100", total_gb=85.5)] * 2)
L40S = read_gpu_profile([SimulatedGpu(name="L40S", total_gb=48.0)])
TINY_T2V_CHECKPOINT = Path(__file__).parents[1] / "fixtures" / "oracle" / "t2v-A14B-tiny"  # official layout
TINY_TI2V_CHECKPOINT = Path(__file__).parents[1] / "fixtures" / "oracle" / "ti2v-5B-tiny"


def _release_folder(parent: Path) -> Path:
    """A checkpoint folder the loader accepts, named as the T2V release (the tiny oracle model's files)."""
    return Path(shutil.copytree(TINY_T2V_CHECKPOINT, parent / "Wan2.2-T2V-A14B"))


def _error(profile: GpuProfile = NO_GPU, **fields) -> str:
    with pytest.raises(ValidationError) as caught:
        GenerationRequest.for_hardware(profile, **fields)
    return str(caught.value)


def test_tiny_request_is_completed_from_the_task_defaults(wan_env):
    request = GenerationRequest.for_hardware(NO_GPU, prompt="a cat", duration_s=2)
    assert (request.task, request.size, request.frame_count, request.steps) == ("tiny", "64*64", 33, 10)
    assert (request.tier, request.strategy, request.checkpoint) == ("quality", "auto", "tiny")
    assert request.video_size == Size(64, 64) and request.video_size.pixels == 64 * 64


def test_validated_request_validates_again_unchanged(wan_env):
    """Prefect validates flow parameters again; a completed request must survive that."""
    request = GenerationRequest.for_hardware(NO_GPU, task="tiny", duration_s=1.3)
    again = GenerationRequest.for_hardware(NO_GPU, **request.model_dump())
    assert again == request
    assert request.frame_count == 21  # 1.3 s * 16 fps -> 20.8 -> 4k+1


def test_unknown_task_names_the_allowed_tasks(wan_env):
    message = _error(task="t2v-1.3B")
    assert "task" in message and "t2v-1.3B" in message and "'t2v-A14B'" in message and "'tiny'" in message


def test_size_the_task_does_not_offer(wan_env):
    message = _error(task="tiny", size="1280*720")
    assert "size: '1280*720' is not offered by task 'tiny'" in message and "64*64" in message


def test_duration_range_by_hardware(wan_env, tmp_path):
    checkpoint = _release_folder(tmp_path)
    a14b = {"task": "t2v-A14B", "checkpoint": str(checkpoint)}
    message = _error(L40S, **a14b, duration_s=15)
    assert "duration_s: 15" in message and "outside 2-10 s" in message and "no GPU with >= 80 GB" in message
    assert GenerationRequest.for_hardware(H100S, **a14b, duration_s=15).frame_count == 241
    message = _error(H100S, **a14b, size="1280*720", duration_s=30)
    assert "outside 5-21 s" in message
    assert GenerationRequest.for_hardware(H100S, **a14b, size="832*480", duration_s=30).frame_count == 481
    assert "outside 5-33 s" in _error(H100S, **a14b, size="832*480", duration_s=3)


def test_ti2v_takes_an_image_or_none_at_24_fps_with_its_durations_by_vram(wan_env, tmp_path, monkeypatch):
    from tasks.settings import get_settings

    tiny = GenerationRequest.for_hardware(NO_GPU, task="tiny-ti2v", duration_s=2)
    assert (tiny.image, tiny.frame_count, tiny.steps, tiny.shift) == (None, 49, 10, 5.0)   # 2 s at 24 fps
    assert GenerationRequest.for_hardware(NO_GPU, task="tiny-ti2v", frame_count=5).duration_s == 4 / 24
    Image.new("RGB", (80, 60)).save(tmp_path / "first.png")
    assert GenerationRequest.for_hardware(NO_GPU, task="tiny-ti2v", image=str(tmp_path / "first.png")).image

    shutil.copytree(TINY_TI2V_CHECKPOINT, tmp_path / "Wan2.2-TI2V-5B")
    monkeypatch.setenv("WAN_CHECKPOINT_ROOT", str(tmp_path))
    get_settings.cache_clear()
    release = GenerationRequest.for_hardware(L40S, task="ti2v-5B")
    assert (release.size, release.frame_count, release.steps, release.shift) == ("1280*704", 121, 50, 5.0)
    assert release.checkpoint == str(tmp_path / "Wan2.2-TI2V-5B") and release.duration_s == 5
    assert "outside 2-10 s, the range for ti2v-5B at 1280*704" in _error(L40S, task="ti2v-5B", duration_s=15)
    assert GenerationRequest.for_hardware(H100S, task="ti2v-5B", duration_s=15).frame_count == 361
    assert "outside 2-20 s" in _error(H100S, task="ti2v-5B", duration_s=25)
    assert "size: '832*480' is not offered by task 'ti2v-5B'; allowed: 1280*704, 704*1280" in _error(
        H100S, task="ti2v-5B", size="832*480")


def test_frame_count_must_be_4k_plus_1_and_agree_with_duration(wan_env):
    assert "frame_count: 20 is not 4k+1; nearest allowed: 17 or 21" in _error(task="tiny", frame_count=20)
    assert "disagree" in _error(task="tiny", duration_s=2, frame_count=21)
    assert "frame_count: 641" in _error(task="tiny", frame_count=641)  # 40 s


def test_i2v_needs_an_image_and_t2v_takes_none(wan_env, tmp_path):
    assert "image: task 'tiny-i2v' turns an image into a video" in _error(task="tiny-i2v")
    image = tmp_path / "first.png"
    Image.new("RGB", (64, 48)).save(image)
    assert "image: task 'tiny' takes no image" in _error(task="tiny", image=str(image))
    assert "is not a file" in _error(task="tiny-i2v", image=str(tmp_path / "missing.png"))
    assert GenerationRequest.for_hardware(NO_GPU, task="tiny-i2v", image=str(image)).image == str(image)


def test_teacache_threshold_range(wan_env):
    message = _error(task="tiny", teacache_threshold=0.9)
    assert "teacache_threshold" in message and "less than or equal to 0.5" in message and "0.9" in message
    assert "greater than or equal to 0.05" in _error(task="tiny", teacache_threshold=0.01)


def test_checkpoint_folder_must_exist(wan_env, tmp_path):
    message = _error(task="t2v-A14B", checkpoint=str(tmp_path / "nowhere"))
    assert "checkpoint: folder" in message and "nowhere" in message and "does not exist" in message
    Image.new("RGB", (64, 48)).save(tmp_path / "first.png")
    assert "WAN_CHECKPOINT_ROOT is unset" in _error(task="i2v-A14B", image="first.png")


def test_checkpoint_root_gives_the_release_folder(wan_env, tmp_path, monkeypatch):
    from tasks.settings import get_settings

    _release_folder(tmp_path)
    monkeypatch.setenv("WAN_CHECKPOINT_ROOT", str(tmp_path))
    get_settings.cache_clear()
    request = GenerationRequest.for_hardware(NO_GPU, task="t2v-A14B")
    assert request.checkpoint == str(tmp_path / "Wan2.2-T2V-A14B")
    assert request.frame_count == 81 and request.size == "1280*720" and request.steps == 40


def test_a_default_task_that_is_no_task_refuses_the_requests_that_fall_back_to_it(wan_env, monkeypatch):
    from tasks.settings import get_settings

    monkeypatch.setenv("WAN_DEFAULT_TASK", "t2v-5B")
    get_settings.cache_clear()
    assert "WAN_DEFAULT_TASK='t2v-5B' is not a task; allowed: t2v-A14B" in _error(prompt="a heron")
    assert GenerationRequest.for_hardware(NO_GPU, task="tiny").task == "tiny"  # a request naming its task runs


def test_gpu_selection_is_checked_against_the_host(wan_env):
    assert "gpu_ids: [5] not on this host; detected GPUs: [0, 1]" in _error(H100S, task="tiny", gpu_ids=[5])
    assert "gpus_per_job: 3 is more than the 2 selected" in _error(H100S, task="tiny", gpus_per_job=3)
    assert GenerationRequest.for_hardware(H100S, task="tiny", gpu_ids=[1, 0, 1]).gpu_ids == [0, 1]


def test_a_strategy_that_would_hold_gpus_the_job_cannot_compute_on_is_refused(wan_env):
    """A run never holds a GPU it does not compute on, and learns so before it waits for any: one job splits over
    GPU counts whose Ulysses degree divides the model's heads (the tiny DiT has 2), with the two CFG branches on
    two halves when the run is guided."""
    four = read_gpu_profile([SimulatedGpu(name="H100", total_gb=85.5)] * 4)
    assert GenerationRequest.for_hardware(four, task="tiny").job_world_sizes(four) == [1, 2, 4]
    assert GenerationRequest.for_hardware(four, task="tiny", guide_scale=1).job_world_sizes(four) == [1, 2]
    refused = _error(four, task="tiny", strategy="max_speed", gpu_ids=[0, 1, 2])
    assert "gpu_ids: max_speed would hold 3 GPUs, but one tiny job computes on 1, 2 GPU(s) here" in refused
    assert "choose one of those counts" in refused
    assert "gpus_per_job: concurrent would hold 4 GPUs, but one tiny job computes on 1, 2 GPU(s)" in _error(
        four, task="tiny", strategy="concurrent", gpus_per_job=4, guide_scale=1)
    assert GenerationRequest.for_hardware(four, task="tiny", strategy="max_speed").strategy == "max_speed"
    assert GenerationRequest.for_hardware(H100S, task="tiny", strategy="concurrent", gpus_per_job=2).gpus_per_job == 2
    assert GenerationRequest.for_hardware(NO_GPU, task="tiny", strategy="max_speed").strategy == "max_speed"


def test_a_checkpoint_s_heads_decide_how_many_gpus_one_job_uses(wan_env, tmp_path):
    """The A14B layout's config.json gives the heads: the tiny fixture's 2, whatever its task name says."""
    four = read_gpu_profile([SimulatedGpu(name="H100", total_gb=85.5)] * 4)
    request = GenerationRequest.for_hardware(four, task="t2v-A14B", checkpoint=str(_release_folder(tmp_path)),
                                             size="832*480", duration_s=5)
    assert request.job_world_sizes(four) == [1, 2, 4]


def test_a_prompt_of_only_whitespace_is_rejected(wan_env):
    for prompt in ("", "   ", "\n\t "):
        assert "prompt" in _error(task="tiny", prompt=prompt)
    assert "prompt\n  Value error, is only whitespace; say what the video shows" in _error(task="tiny", prompt=" ")
    assert GenerationRequest.for_hardware(NO_GPU, task="tiny", prompt=" a cat ").prompt == " a cat "


def test_unknown_fields_are_rejected(wan_env):
    assert "num_gpus" in _error(task="tiny", num_gpus=2)
    with pytest.raises(ValidationError) as caught:
        GenerationRequest.for_hardware(NO_GPU, task="tiny", num_gpus=2)
    [line] = problems(caught.value)
    assert line.startswith("num_gpus: not a request field; the fields: task, prompt, ") and "gpus_per_job" in line


def test_json_schema_has_dropdowns_and_ranges(wan_env):
    """The Prefect UI renders the flow parameter from this schema."""
    properties = GenerationRequest.model_json_schema()["properties"]

    def enum(name):
        return next(choice["enum"] for choice in properties[name]["anyOf"] if "enum" in choice)

    assert {"t2v-A14B", "i2v-A14B", "tiny"} <= set(enum("task"))
    assert {"1280*720", "832*480", "64*64"} <= set(enum("size"))
    assert enum("tier") == ["quality", "balanced", "speed"]
    assert enum("strategy") == ["auto", "max_speed", "concurrent"]
    assert properties["solver"]["enum"] == ["unipc", "dpm++", "euler", "lightning"]
    assert properties["distilled"]["type"] == "boolean" and properties["loras"]["type"] == "array"
    lora = GenerationRequest.model_json_schema()["$defs"]["LoraRequest"]["properties"]
    assert (lora["strength"]["minimum"], lora["strength"]["maximum"]) == (0, 2)
    assert lora["expert"]["enum"] == ["both", "high", "low"]
    assert (properties["teacache_threshold"]["minimum"], properties["teacache_threshold"]["maximum"]) == (0.05, 0.5)


def test_the_speed_tier_step_cache_is_a_choice():
    assert GenerationRequest(task="tiny", frame_count=5, step_cache="magcache").step_cache == "magcache"
    with pytest.raises(ValueError, match="step_cache"):
        GenerationRequest(task="tiny", frame_count=5, step_cache="fastcache")
    enum = GenerationRequest.model_json_schema()["properties"]["step_cache"]["enum"]
    assert enum == ["teacache", "magcache"]


def test_a_request_becomes_the_run_description_every_task_is_handed(wan_env):
    from tasks.allocate import Allocation

    request = GenerationRequest.for_hardware(NO_GPU, task="tiny", prompt="a heron", size="96*64", frame_count=9)
    run = request.describe_run(11, Allocation())
    assert run.size == Size(96, 64) and str(run.size) == "96*64" and run.fps == 16 and run.seed == 11
    assert (run.device, run.gpus, run.checkpoint, run.frame_count) == ("cpu", 1, "tiny", 9)
    assert run.request == request.model_dump(mode="json") and run.request["seed"] is None  # as it was asked
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.seed = 12
