"""The generate-video flow on the tiny preset: six visible tasks, a playable MP4, its record, artifacts."""
from __future__ import annotations

import json
import uuid

import imageio_ffmpeg
import pytest
import torch
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId
from prefect.context import FlowRunContext
from prefect.states import Cancelling

from flows.generate import generate_video
from flows.request import GenerationRequest
from flows.settings import get_settings
from tasks import denoise as denoise_module
from tasks import pipelines
from tasks.allocate import limit_name
from tasks.denoise import listen_to_steps

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


def test_cancelling_the_run_stops_between_steps_and_frees_the_gpus(prefect_server, wan_env, monkeypatch):
    """What the UI's Cancel does to a run that no worker kills: its state goes to Cancelling."""
    base = _simulate_two_gpus(monkeypatch)
    monkeypatch.setattr(denoise_module, "CANCEL_CHECK_SECONDS", 0.0)

    def cancel_after_step_2(info):
        if info.step == 1:
            with get_client(sync_client=True) as client:
                client.set_flow_run_state(FlowRunContext.get().flow_run.id, Cancelling(), force=True)

    with listen_to_steps(cancel_after_step_2):
        state = generate_video(GenerationRequest(task="tiny", frame_count=5, strategy="max_speed"), return_state=True)
    assert state.is_cancelled() and "cancelled before step 3/10" in state.message
    assert _task_runs(state.state_details.flow_run_id)["denoise"].state.is_cancelled()
    assert _active_slots(base) == [0, 0]
    assert not list(wan_env.glob("*/*/video.mp4"))


class _OutOfMemoryPipeline:
    def generate(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_out_of_memory_fails_with_next_steps_and_frees_the_gpus(prefect_server, wan_env, monkeypatch):
    base = _simulate_two_gpus(monkeypatch)
    monkeypatch.setattr(pipelines, "_PIPELINES", {})
    monkeypatch.setattr(pipelines.wan_engine, "load_pipeline", lambda *a, **k: _OutOfMemoryPipeline())
    state = generate_video(GenerationRequest(task="tiny", frame_count=5, strategy="concurrent"), return_state=True)
    assert state.is_failed()
    for advice in ("ran out of memory", "shorter video", "lower resolution", "more GPUs", "offload"):
        assert advice in state.message
    assert _active_slots(base) == [0, 0]
    assert pipelines._PIPELINES == {}  # the pipeline's memory was given back too


@pytest.mark.parametrize("field, value", [("size", "1280*720"), ("frame_count", 7)])
def test_invalid_parameters_fail_the_run_before_any_task(prefect_server, wan_env, field, value):
    """A run started from the UI or a deployment passes a dict: it is validated in the flow process."""
    state = generate_video({"task": "tiny", field: value}, return_state=True)
    assert state.is_failed() and field in state.message
    assert _task_runs(state.state_details.flow_run_id) == {}


def test_flow_parameter_schema_gives_the_ui_dropdowns():
    request = generate_video.parameters.model_dump()["definitions"]["GenerationRequest"]["properties"]
    assert {"tiny", "t2v-A14B"} <= set(request["task"]["anyOf"][0]["enum"])
    assert request["strategy"]["anyOf"][0]["enum"] == ["auto", "max_speed", "concurrent"]
