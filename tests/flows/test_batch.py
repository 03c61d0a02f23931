"""batch-generate: a manifest is validated whole, generated group by group, and resumed on a re-run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterParentFlowRunId,
)

from flows.batch import (
    ManifestError,
    batch_generate,
    entry_key,
    lane_count,
    load_manifest,
    plan_groups,
    read_manifest,
)
from flows.cli import main
from flows.request import GenerationRequest
from tasks import pipelines
from tasks.gpus import GpuInfo, GpuProfile, SimulatedGpu, read_gpu_profile

QUICK = {"task": "tiny", "size": "64*64", "frame_count": 5, "steps": 2}
NO_GPU = read_gpu_profile([])


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


BAD_YAML = """\
defaults: {task: tiny, frame_count: 5}
entries:
  - prompt: a lighthouse at dusk
  - prompt: a fox in fresh snow
    size: 1280*720
  - {prompt: a paper boat, steps: 0}
  - prompt: a lighthouse at dusk
"""


def test_a_bad_yaml_manifest_is_rejected_whole_with_line_numbers(wan_env, tmp_path):
    with pytest.raises(ManifestError) as rejected:
        load_manifest(_write(tmp_path / "m.yaml", BAD_YAML), profile=NO_GPU)
    message = str(rejected.value)
    assert "3 problem(s), nothing was generated" in message
    assert "line 5: size: '1280*720' is not offered by task 'tiny'" in message
    assert "line 6: steps: Input should be greater than or equal to 1" in message
    assert "line 7: asks for the same video as line 3" in message


def test_jsonl_manifest_takes_a_defaults_line_and_reports_lines(wan_env, tmp_path):
    good = _write(tmp_path / "m.jsonl", '{"defaults": {"task": "tiny", "frame_count": 5}}\n\n'
                                        '{"prompt": "one"}\n{"prompt": "two", "seed": 4}\n')
    entries = load_manifest(good, profile=NO_GPU)
    assert [(e.line, e.request.prompt, e.request.task, e.request.frame_count) for e in entries] == [
        (3, "one", "tiny", 5), (4, "two", "tiny", 5)]
    bad = _write(tmp_path / "bad.jsonl", '{"prompt": "one", "task": "tiny"}\n{"prompt": "two", "task": "tiny"\n'
                                         '{"defaults": {"task": "tiny"}}\n')
    with pytest.raises(ManifestError, match=r"(?s)line 2: not JSON.*line 3: the defaults line must come before"):
        load_manifest(bad, profile=NO_GPU)


def test_defaults_merge_and_seeds_come_from_the_entry_content(wan_env, tmp_path):
    path = _write(tmp_path / "m.yaml", "defaults: {frame_count: 5}\nentries:\n  - {prompt: one, steps: 3}\n")
    [entry] = load_manifest(path, defaults={"task": "tiny", "steps": 7}, profile=NO_GPU)
    assert (entry.request.task, entry.request.steps, entry.request.frame_count) == ("tiny", 3, 5)
    [again] = load_manifest(path, defaults={"task": "tiny", "strategy": "max_speed"}, profile=NO_GPU)
    assert again.request.seed == entry.request.seed is not None  # a re-run makes the same video
    moved = GenerationRequest.for_hardware(NO_GPU, **{**QUICK, "strategy": "concurrent", "gpus_per_job": 1})
    assert entry_key(moved) == entry_key(GenerationRequest.for_hardware(NO_GPU, **QUICK))  # same video anywhere


def test_a_manifest_that_is_not_text_or_uses_a_list_as_key_is_reported_not_crashed(wan_env, tmp_path):
    (tmp_path / "m.jsonl").write_bytes(b"\xff\xfe{")
    with pytest.raises(ManifestError, match="not UTF-8 text"):
        load_manifest(tmp_path / "m.jsonl", profile=NO_GPU)
    with pytest.raises(ManifestError, match="line 1: not valid YAML"):
        load_manifest(_write(tmp_path / "c.yaml", "entries: [\x07]\n"), profile=NO_GPU)
    with pytest.raises(ManifestError, match="line 1: not valid YAML \\(found unhashable key\\)"):
        load_manifest(_write(tmp_path / "k.yaml", "? [a, b]\n: 1\nentries: [{prompt: x, task: tiny}]\n"),
                      profile=NO_GPU)
    with pytest.raises(ManifestError, match="defaults: an object of request fields"):
        load_manifest(_write(tmp_path / "d.yaml", "- {prompt: x}\n"), defaults=["tiny"], profile=NO_GPU)


def test_lanes_follow_the_strategy():
    four = GpuProfile(source="nvml", gpus=[
        GpuInfo(index=i, device=f"cuda:{i}", name="H100", total_bytes=80 * 10**9, free_bytes=80 * 10**9,
                compute_capability=(9, 0)) for i in range(4)])

    def lanes(profile=four, **fields):
        return lane_count(GenerationRequest.for_hardware(profile, **QUICK, **fields), profile)

    assert lanes(strategy="concurrent") == 4
    assert lanes(strategy="concurrent", gpu_ids=[1, 2, 3]) == 3
    assert lanes(strategy="auto") == 1  # each run takes the largest set it computes on: all 4 for the tiny DiT
    assert lanes(strategy="auto", guide_scale=1) == 2  # unguided: Ulysses only, over at most its 2 heads
    assert lanes(strategy="max_speed", gpu_ids=[2]) == 1
    assert lanes(NO_GPU, strategy="concurrent") == 1
    assert lanes(read_gpu_profile([SimulatedGpu()] * 4), strategy="concurrent") == 1  # all on the CPU


def test_groups_keep_a_checkpoint_together(wan_env, tmp_path):
    image = tmp_path / "frame.png"
    Image.new("RGB", (64, 64)).save(image)
    lines = [f"  - {{prompt: p{i}, task: {task}{', image: ' + str(image) if task == 'tiny-i2v' else ''}}}"
             for i, task in enumerate(["tiny", "tiny-i2v", "tiny", "tiny-i2v"])]
    entries = load_manifest(_write(tmp_path / "m.yaml", "defaults: {frame_count: 5}\nentries:\n" + "\n".join(lines)),
                            profile=NO_GPU)
    groups = plan_groups(entries)
    assert [[e.request.prompt for e in group] for group in groups] == [["p0", "p2"], ["p1", "p3"]]


def test_ti2v_entries_with_and_without_an_image_are_two_videos_of_one_group(wan_env, tmp_path):
    image = tmp_path / "frame.png"
    Image.new("RGB", (80, 60)).save(image)
    manifest = _write(tmp_path / "m.yaml", "defaults: {task: tiny-ti2v, frame_count: 5}\nentries:\n"
                      "  - {prompt: a heron}\n"
                      f"  - {{prompt: a heron, image: {image}}}\n")
    text_only, with_image = load_manifest(manifest, profile=NO_GPU)
    assert (text_only.request.image, with_image.request.image) == (None, str(image))
    assert entry_key(text_only.request) != entry_key(with_image.request)
    assert [len(group) for group in plan_groups([text_only, with_image])] == [2]   # one checkpoint loaded once


def test_a_bad_entry_fails_the_run_before_any_generation(prefect_server, wan_env, tmp_path):
    state = batch_generate(_write(tmp_path / "m.yaml", BAD_YAML), return_state=True)
    assert state.is_failed() and "line 5: size" in state.message
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id])))
    assert children == [] and not wan_env.exists()


def test_cli_batch_generates_then_skips(prefect_server, wan_env, tmp_path, capsys):
    manifest = _write(tmp_path / "m.jsonl", json.dumps({**QUICK, "prompt": "a red kite over the dunes"}) + "\n")
    assert main(["batch", manifest]) == 0
    [first] = capsys.readouterr().out.splitlines()
    assert "completed" in first and Path(first.split()[-1]).is_file()
    assert main(["batch", manifest]) == 0
    assert capsys.readouterr().out.split()[2:] == ["skipped", "0.0", "s", first.split()[-1]]
    assert main(["batch", _write(tmp_path / "bad.yaml", BAD_YAML)]) == 2
    assert "line 5: size" in capsys.readouterr().err


@pytest.mark.slow
def test_six_entries_complete_then_a_rerun_skips_all_six(prefect_server, wan_env, tmp_path, monkeypatch,
                                                          fresh_engines):
    image = tmp_path / "frame.png"
    Image.new("RGB", (64, 64), (180, 60, 40)).save(image)
    manifest = _write(tmp_path / "six.yaml", "\n".join([
        "defaults: {task: tiny, size: 64*64, frame_count: 5, steps: 2}",
        "entries:",
        *(f"  - prompt: clip {i}" for i in range(4)),
        *(f"  - {{prompt: still {i}, task: tiny-i2v, image: {image}}}" for i in range(2)),
    ]))
    loads = []
    load_pipeline = pipelines.wan_engine.load_pipeline
    monkeypatch.setattr(pipelines.wan_engine, "load_pipeline",
                        lambda checkpoint, **kw: loads.append(checkpoint) or load_pipeline(checkpoint, **kw))

    state = batch_generate(manifest, return_state=True)
    assert state.is_completed(), state.message
    rows = state.result()
    assert [(row["line"], row["status"]) for row in rows] == [(line, "completed") for line in range(3, 9)]
    assert all(Path(row["output"]).is_file() for row in rows)
    assert loads == ["tiny", "tiny-i2v"]  # once per checkpoint group, not once per prompt
    with get_client(sync_client=True) as client:
        flow_run_id = state.state_details.flow_run_id
        [summary] = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
    assert summary.key == "batch-summary" and summary.type == "table"
    table = json.loads(summary.data)
    assert [row["status"] for row in table] == ["completed"] * 6 and {"prompt", "duration_s", "output"} <= set(table[0])
    assert len(children) == 6 and all(child.state.is_completed() for child in children)

    again = batch_generate(manifest, return_state=True)
    assert again.is_completed()
    assert [(row["status"], row["output"]) for row in again.result()] == [("skipped", row["output"]) for row in rows]
    assert loads == ["tiny", "tiny-i2v"]
    assert len(list(wan_env.glob("*/*/video.mp4"))) == 6


class _OutOfMemoryPipeline:
    def generate(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_a_failed_entry_fails_the_batch_after_the_others_with_its_row(prefect_server, wan_env, tmp_path,
                                                                       monkeypatch, capsys, fresh_engines):
    manifest = _write(tmp_path / "m.yaml", "defaults: {task: tiny, frame_count: 5}\n"
                                           "entries:\n  - prompt: one\n  - prompt: two\n")
    monkeypatch.setattr(pipelines.wan_engine, "load_pipeline", lambda *a, **k: _OutOfMemoryPipeline())
    assert main(["batch", manifest]) == 1
    out, err = capsys.readouterr()
    assert [line.split()[:3] for line in out.splitlines()] == [["line", "3", "failed"], ["line", "4", "failed"]]
    assert "batch ended failed: 2 of 2 entries did not complete: line 3 (failed), line 4 (failed)" in err
    assert not (wan_env / "batch-records").exists()  # nothing to skip on the next run


def test_the_read_manifest_body_validates_every_entry(no_prefect_server, wan_env, tmp_path):
    manifest = _write(tmp_path / "m.yaml", "defaults: {task: tiny, frame_count: 5}\n"
                                           "entries:\n  - prompt: one\n  - {prompt: two, seed: 3}\n")
    entries = read_manifest.fn(manifest)
    assert [(e.line, e.request.prompt, e.request.frame_count) for e in entries] == [(3, "one", 5), (4, "two", 5)]
    assert entries[1].request.seed == 3 and entries[0].request.seed is not None  # a seed derived from its key
    with pytest.raises(ManifestError, match="line 4: frame_count"):
        read_manifest.fn(_write(tmp_path / "bad.yaml", "defaults: {task: tiny}\nentries:\n  - prompt: one\n"
                                                       "  - {prompt: two, frame_count: 6}\n"))
