"""The generate-video flow on the tiny preset: six visible tasks, a playable MP4, its record, artifacts."""
from __future__ import annotations

import base64
import io
import json
import os
import uuid

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.context import FlowRunContext
from prefect.logging.handlers import APILogHandler
from prefect.states import Cancelling
from torch._dynamo.utils import counters

from flows.generate import generate_video
from flows.request import GenerationRequest
from patches.teacache import published_coefficients, teacache_rel_l1, teacache_schedule
from tasks import denoise as denoise_module
from tasks import pipelines
from tasks.allocate import limit_name
from tasks.denoise import listen_to_steps
from tasks.settings import get_settings
from wan_engine import plan_steps

TASKS = ["detect-gpus", "allocate-gpus", "warm-up-compile", "denoise", "encode", "publish"]


def _task_runs(flow_run_id) -> dict[str, object]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name.rsplit("-", 1)[0]: run for run in runs}  # "denoise-3fa" -> "denoise"


def _simulate_two_gpus(monkeypatch) -> str:
    """Two simulated GPUs guarded by tags of their own; returns the tag base."""
    base = f"g{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("WAN_GPU_INVENTORY", "[{}, {}]")
    monkeypatch.setenv("WAN_GPU_TAG_PREFIX", base)
    get_settings.cache_clear()
    return base


def _frames(video) -> np.ndarray:
    """The decoded frames of an MP4, as bytes."""
    reader = imageio_ffmpeg.read_frames(str(video))
    next(reader)  # the stream's metadata
    return np.frombuffer(b"".join(reader), dtype=np.uint8).astype(np.int16)


def _active_slots(base: str) -> list[int]:
    with get_client(sync_client=True) as client:
        return [client.read_global_concurrency_limit_by_name(limit_name(f"{base}-{i}")).active_slots for i in (0, 1)]


def test_tiny_generation_end_to_end(prefect_server, wan_env):
    request = GenerationRequest(task="tiny", prompt="A lighthouse at dusk, waves breaking", frame_count=5,
                                size="96*64", seed=3)
    state = generate_video(request, return_state=True)
    assert state.is_completed(), state.message
    published = state.result()
    flow_run_id = state.state_details.flow_run_id

    runs = _task_runs(flow_run_id)
    assert sorted(runs) == sorted(TASKS)
    assert all(run.state.is_completed() for run in runs.values())

    assert published.video.parent.parent.parent == wan_env.resolve()
    assert published.video.parent.name.startswith("a-lighthouse-at-dusk-waves-breaking-")
    reader = imageio_ffmpeg.read_frames(str(published.video))
    meta = next(reader)
    assert (meta["size"], meta["fps"], sum(1 for _ in reader)) == ((96, 64), 16, 5)

    record = json.loads(published.metadata.read_text())
    assert record["request"] == request.model_dump(mode="json")
    assert record["seed"] == 3 and record["run_id"] == str(flow_run_id)
    assert record["video"] == {"file": "video.mp4", "frames": 5, "width": 96, "height": 64, "fps": 16,
                               "seconds": 0.25, "codec": "h264/yuv420p"}
    assert len(record["step_seconds"]) == request.steps == record["sampling"]["steps"]
    assert {"load", "text", "denoise", "vae_decode", "mp4_write"} <= set(record["timings_s"])
    assert record["energy"] is None   # a CPU run: no GPU energy to read
    assert {"wanflow", "torch", "prefect", "python", "ffmpeg"} <= set(record["versions"])

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    by_key = {artifact.key: artifact for artifact in artifacts}
    assert set(by_key) == {None, "generated-video", "generation-timings", "video-file"}
    assert (by_key[None].type, by_key[None].data) == ("progress", 100.0)  # the denoising progress
    assert by_key["generated-video"].type == "markdown" and str(published.video) in by_key["generated-video"].data
    assert by_key["generation-timings"].type == "table"
    assert published.video.as_uri() in by_key["video-file"].data  # a link artifact
    preview, text = by_key["generated-video"].description.split("\n\n")  # the run page's card shows line one
    assert preview.startswith("![preview of the video](data:image/webp;base64,") and text == "The published video"
    image = Image.open(io.BytesIO(base64.b64decode(preview.removesuffix(")").split(",", 1)[1])))
    assert (image.format, image.size, image.n_frames) == ("WEBP", (96, 64), 3)  # 5 frames at 16 fps: 8 fps


@pytest.mark.parametrize("strategy", ["max_speed", "auto"])
def test_a_run_on_two_gpus_computes_on_both_as_two_ranks_and_records_its_parallel_plan(prefect_server, wan_env,
                                                                                       monkeypatch, strategy):
    """max_speed takes every selected GPU, auto the largest free set the parallel plan can use: both GPUs for
    the tiny DiT (2 heads, guided: one CFG branch per GPU). Without `wanflow worker` the run starts its own
    two rank processes; the video is the one a run on one GPU makes."""
    base = _simulate_two_gpus(monkeypatch)
    request = dict(task="tiny", frame_count=5, steps=3, seed=11)
    state = generate_video(GenerationRequest(**request, strategy=strategy), return_state=True)
    assert state.is_completed(), state.message
    record = json.loads(state.result().metadata.read_text())
    assert [g["index"] for g in record["gpus"]] == [0, 1]
    engine = record["engine"]
    assert engine["parallel"] == {"ulysses": 1, "cfg": 2, "gpus": [0, 1], "world_size": 2}
    assert not engine["resident"] and engine["pid"] != os.getpid()  # rank 0 ran in a child of this process
    assert [r["rank"] for r in engine["ranks"]] == [0, 1] and all(r["denoise_s"] > 0 for r in engine["ranks"])
    assert _active_slots(base) == [0, 0]
    if strategy == "auto":
        return  # same ranks as max_speed: the video is compared once
    one = generate_video(GenerationRequest(**request, strategy="concurrent"), return_state=True).result()
    assert json.loads(one.metadata.read_text())["engine"]["parallel"]["world_size"] == 1
    # the latents agree within 1e-5 (tests/tasks/test_engine_ranks.py); after uint8 rounding and H.264 a few
    # pixels move (seen: 0.3% by more than 1, mean 0.01), a wrong rank would move them all
    assert np.abs(_frames(state.result().video) - _frames(one.video)).mean() < 0.05


def test_cancelling_the_run_stops_between_steps_and_frees_the_gpus(prefect_server, wan_env, monkeypatch):
    """What the UI's Cancel does to a run that no worker kills: its state goes to Cancelling."""
    base = _simulate_two_gpus(monkeypatch)
    monkeypatch.setattr(denoise_module, "CANCEL_CHECK_SECONDS", 0.0)

    def cancel_after_step_2(info):
        if info.step == 1:
            with get_client(sync_client=True) as client:
                client.set_flow_run_state(FlowRunContext.get().flow_run.id, Cancelling(), force=True)

    with listen_to_steps(cancel_after_step_2):
        state = generate_video(GenerationRequest(task="tiny", frame_count=5, strategy="concurrent"), return_state=True)
    assert state.is_cancelled() and "cancelled before step 3/10" in state.message
    assert _task_runs(state.state_details.flow_run_id)["denoise"].state.is_cancelled()
    assert _active_slots(base) == [0, 0]
    assert not list(wan_env.glob("*/*/video.mp4"))


def _out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_out_of_memory_fails_with_next_steps_and_frees_the_gpus(prefect_server, wan_env, monkeypatch, fresh_engines):
    base = _simulate_two_gpus(monkeypatch)
    load_pipeline = pipelines.wan_engine.load_pipeline

    def out_of_memory_pipeline(*args, **kwargs):  # a real pipeline (the tier applies to it) that runs out
        pipe = load_pipeline(*args, **kwargs)
        pipe.generate = _out_of_memory
        return pipe

    monkeypatch.setattr(pipelines.wan_engine, "load_pipeline", out_of_memory_pipeline)
    state = generate_video(GenerationRequest(task="tiny", frame_count=5, strategy="concurrent"), return_state=True)
    assert state.is_failed()
    for advice in ("ran out of memory", "shorter video", "lower resolution", "more GPUs", "offload"):
        assert advice in state.message
    assert _active_slots(base) == [0, 0]
    assert not fresh_engines.holds("tiny", "cpu")  # the pipeline's memory was given back too


@pytest.mark.parametrize("field, value", [("size", "1280*720"), ("frame_count", 7)])
def test_invalid_parameters_fail_the_run_before_any_task(prefect_server, wan_env, field, value):
    """A run started from the UI or a deployment passes a dict: it is validated in the flow process."""
    state = generate_video({"task": "tiny", field: value}, return_state=True)
    assert state.is_failed() and field in state.message
    assert _task_runs(state.state_details.flow_run_id) == {}


def test_flow_parameter_schema_gives_the_ui_dropdowns():
    request = generate_video.parameters.model_dump()["definitions"]["GenerationRequest"]["properties"]
    assert {"tiny", "t2v-A14B", "ti2v-5B", "tiny-ti2v"} <= set(request["task"]["anyOf"][0]["enum"])
    assert {"1280*720", "1280*704", "704*1280"} <= set(request["size"]["anyOf"][0]["enum"])
    assert request["strategy"]["anyOf"][0]["enum"] == ["auto", "max_speed", "concurrent"]


def _artifacts(flow_run_id) -> dict[str | None, object]:
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {artifact.key: artifact for artifact in artifacts}


def _run_log(flow_run_id) -> str:
    """Every line the run sent to the Prefect API (what its page in the UI shows)."""
    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


def test_speed_tier_skips_the_scheduled_steps_and_records_them(prefect_server, wan_env):
    request = GenerationRequest(task="tiny", prompt="a kite over the dunes", frame_count=5, size="64*64", seed=5,
                                tier="speed", teacache_threshold=0.25)
    state = generate_video(request, return_state=True)
    assert state.is_completed(), state.message
    record = json.loads(state.result().metadata.read_text())

    # The schedule, computed here from the published figures and the checkpoint's time embedding.
    pipe = pipelines.process_engines().pipeline("tiny", "cpu")
    plan = plan_steps(pipe.spec, request.steps, request.shift, request.solver)
    cache = record["step_cache"]
    expected = teacache_schedule(plan, teacache_rel_l1(pipe.experts, plan, "e0"), 0.25,
                                 published_coefficients("t2v-A14B", "e0"), batched=cache["batched"])
    assert (cache["method"], cache["settings"]["threshold"]) == ("teacache", 0.25)
    assert cache["computed_steps"] == expected.computed_steps() == cache["executed_computed_steps"]
    assert cache["matches_schedule"]
    assert record["model_calls"] == expected.counts() and record["model_calls"]["skipped"] > 0
    assert record["skipped_steps"] == expected.skipped_steps()["cond"] == expected.skipped_steps()["uncond"]
    assert [record["block_stack_per_step"][i] for i in record["skipped_steps"]] == ["reused"] * len(
        record["skipped_steps"])
    on = {p["name"]: p["detail"] for p in record["patches"] if p["on"]}
    assert list(on) == ["attention", "resident", "teacache"] and "threshold 0.25" in on["teacache"]
    assert record["compile"]["compiled"] is False and "no CUDA GPU" in record["compile"]["detail"]

    artifacts = _artifacts(state.state_details.flow_run_id)
    calls = record["model_calls"]
    assert (f"teacache: {calls['computed']}/{calls['total']} model calls computed, {calls['skipped']} skipped"
            in artifacts["generated-video"].data)
    table = json.loads(artifacts["generation-timings"].data)
    steps = [row for row in table if row["phase"].startswith("step ")]
    assert [row["block stack"] for row in steps] == record["block_stack_per_step"]
    assert "reused" in artifacts[None].description  # the progress artifact counts the reused steps


def test_speed_tier_runs_magcache_when_asked(prefect_server, wan_env):
    request = GenerationRequest(task="tiny", prompt="a kite over the dunes", frame_count=5, size="64*64", seed=5,
                                tier="speed", step_cache="magcache")
    state = generate_video(request, return_state=True)
    assert state.is_completed(), state.message
    record = json.loads(state.result().metadata.read_text())
    cache = record["step_cache"]
    assert cache["method"] == "magcache" and cache["matches_schedule"]
    assert record["model_calls"]["skipped"] > 0 and record["skipped_steps"]
    on = [p["name"] for p in record["patches"] if p["on"]]
    assert "magcache" in on and "teacache" not in on


def test_balanced_tier_on_a_cpu_says_why_compile_is_off_and_completes(prefect_server, wan_env):
    request = GenerationRequest(task="tiny", prompt="a tram in the fog", frame_count=5, size="64*64", steps=4,
                                seed=2, tier="balanced")
    state = generate_video(request, return_state=True)
    assert state.is_completed(), state.message
    record = json.loads(state.result().metadata.read_text())
    assert "warm-up skipped for tier balanced: compile is off on cpu: no CUDA GPU" in _run_log(
        state.state_details.flow_run_id)
    assert not record["compile"]["compiled"] and record["compile"]["seconds"] == 0
    assert "no CUDA GPU" in record["compile"]["detail"] and "compile_warm_up" not in record["timings_s"]
    compile_entry = next(p for p in record["patches"] if p["name"] == "compile")
    assert not compile_entry["on"] and "no CUDA GPU" in compile_entry["detail"]
    assert record["step_cache"] is None and record["skipped_steps"] == []  # MagCache is for I2V only
    assert record["model_calls"] == {"computed": 2 * request.steps, "skipped": 0, "total": 2 * request.steps}


def test_compile_warm_up_compiles_the_run_shape_once(prefect_server, wan_env, monkeypatch, tmp_path):
    """With a trace-only backend the compile path runs on a CPU: the warm-up compiles the shape the run
    then uses (an I2V latent grid from a non-square image, batched guidance), so denoising compiles nothing."""
    monkeypatch.setattr(pipelines, "COMPILE_BACKEND", "eager")
    image = tmp_path / "first.png"
    Image.new("RGB", (80, 48), (200, 120, 40)).save(image)  # latent grid 6x10, not the 8x8 of 64*64
    request = GenerationRequest(task="tiny-i2v", prompt="a lantern swaying", image=str(image), frame_count=5,
                                size="64*64", steps=4, seed=1, tier="balanced")
    torch.compiler.reset()
    graphs = counters["stats"]["unique_graphs"]
    state = generate_video(request, return_state=True)
    assert state.is_completed(), state.message
    record = json.loads(state.result().metadata.read_text())
    assert counters["stats"]["unique_graphs"] - graphs == 1  # one graph for every block, made in the warm-up
    warm = record["compile"]
    assert warm["compiled"] and warm["seconds"] > 0 and "latent grid 6x10" in warm["detail"]
    assert record["timings_s"]["compile_warm_up"] == pytest.approx(warm["seconds"], abs=1e-3)
    assert next(p for p in record["patches"] if p["name"] == "compile")["on"]
    cache = record["step_cache"]  # balanced applies MagCache to I2V
    assert cache["method"] == "magcache" and cache["matches_schedule"]
    assert f"compile warm-up {warm['seconds']:.1f} s" in _artifacts(
        state.state_details.flow_run_id)["generated-video"].data
