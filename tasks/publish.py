"""The `publish` task: the video and its record into outputs/, then Prefect artifacts about it.

A video lands as `<outputs>/<date>/<slug>-<short id>/` holding `video.mp4` and
`metadata.json`. Both are written into the run's staging folder under `<outputs>/.staging/`
(the encode task put the MP4 there) and the folder is renamed into place (atomic on one
filesystem), so a reader never sees half a result; staging folders of this host's processes
that died are swept on the next publish (tasks/staging.py).
"""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import shutil
import unicodedata
import uuid
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path

import imageio_ffmpeg
from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext

from tasks.encode import EncodedVideo
from tasks.gpu_phase import Denoised
from tasks.markdown import code, literal
from tasks.preview import preview_markdown
from tasks.runs import RunDescription
from tasks.staging import STAGING, sweep_dead_staging
from tasks.warmup import WarmUp


@dataclass(frozen=True)
class Published:
    """Where a generated video and its record went."""

    folder: Path
    video: Path
    metadata: Path
    seed: int


def slugify(text: str, max_len: int = 40) -> str:
    """A file-name-safe slug of a prompt ("video" when nothing ASCII is left)."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    words = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return words[:max_len].rstrip("-") or "video"


def versions() -> dict[str, str]:
    """Versions that decide what a video looks like and how it was made."""
    found = {"python": platform.python_version(), "ffmpeg": imageio_ffmpeg.get_ffmpeg_version()}
    for package in ("wanflow", "torch", "prefect", "numpy"):
        try:
            found[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def publish_files(video_path: Path, record: dict, outputs_dir: Path, name: str, day: dt.date) -> Path:
    """Write metadata.json beside the staged MP4 and rename its staging folder to `<outputs_dir>/<day>/<name>/`."""
    staging = video_path.parent
    if staging.parent != outputs_dir / STAGING or video_path.name != "video.mp4":
        raise ValueError(f"{video_path} is not a video.mp4 staged under {outputs_dir / STAGING}: "
                         "encode and publish must be given the same outputs folder")
    sweep_dead_staging(outputs_dir)
    final = outputs_dir / day.isoformat() / name
    try:
        with open(staging / "metadata.json", "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def build_record(run: RunDescription, denoised: Denoised, video: EncodedVideo, run_id: str,
                 warm: WarmUp | None = None) -> dict:
    """metadata.json: enough to reproduce the video and to see where its time went."""
    allocation = run.allocation
    timings = dict(denoised.timings)
    if warm is not None and warm.compiled:  # the warm-up loaded the pipeline, then compiled it
        timings["load"] = timings.get("load", 0.0) + warm.load_s
        timings = {"compile_warm_up": warm.seconds, **timings}
    timings.update(vae_decode=video.decode_s, mp4_write=video.write_s)
    return {
        "run_id": run_id,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "request": run.request,
        "seed": denoised.seed,
        "sampling": denoised.settings,
        "tier": run.tier,
        "patches": denoised.tier.get("patches", []),
        "loras": denoised.loras,   # each LoRA file applied, with its sha256, strength and experts
        "compile": warm.record() if warm is not None else None,
        "step_cache": denoised.step_cache,
        "model_calls": denoised.model_calls,
        "prompt_tokens": denoised.prompt_tokens,
        "video": {"file": "video.mp4", "frames": video.frames, "width": video.width, "height": video.height,
                  "fps": video.fps, "seconds": round((video.frames - 1) / video.fps, 3), "codec": "h264/yuv420p"},
        "gpus": [{"index": g.index, "name": g.name, "tag": tag, "total_gb": round(g.total_bytes / 1e9, 1)}
                 for g, tag in zip(allocation.gpus, allocation.tags, strict=True)],
        "device": allocation.device,
        "gpu_wait_s": round(allocation.waited_s, 3),
        "gpu_hold": {"acquired_unix": allocation.acquired_unix, "released_unix": allocation.released_unix},
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "energy": denoised.energy,
        "engine": denoised.engine,  # where it computed, the parallel plan (degrees, GPUs) and per-rank seconds
        "step_seconds": [round(s, 4) for s in denoised.step_seconds],
        "experts_per_step": denoised.experts_per_step,
        "block_stack_per_step": denoised.block_stack,
        "skipped_steps": denoised.skipped_steps,
        "versions": versions(),
    }


@task(name="publish", retries=0, cache_policy=NO_CACHE)
def publish(run: RunDescription, denoised: Denoised, video: EncodedVideo, outputs_dir: str,
            warm: WarmUp | None = None) -> Published:
    """Publish the video with its metadata and describe it in Prefect artifacts (after the run's GPUs were
    released: the record holds when they were)."""
    flow_run = FlowRunContext.get()
    run_id = str(flow_run.flow_run.id) if flow_run else str(uuid.uuid4())
    name = f"{slugify(run.prompt)}-{run_id[:8]}"
    record = build_record(run, denoised, video, run_id, warm)
    folder = publish_files(video.path, record, Path(outputs_dir).resolve(), name, dt.date.today())
    published = Published(folder=folder, video=folder / "video.mp4", metadata=folder / "metadata.json",
                          seed=denoised.seed)
    if flow_run:  # the artifacts belong on the run's page; outside a flow run there is none
        _describe(published, record, video.preview)
    get_run_logger().info("published %s", published.video)
    return published


def _describe(published: Published, record: dict, preview: bytes) -> None:
    create_markdown_artifact(describe_markdown(published, record), key="generated-video",
                             description=artifact_description(preview))
    rows = [{"phase": k, "seconds": v, "block stack": ""} for k, v in record["timings_s"].items()]
    rows += [{"phase": f"step {i + 1}", "seconds": s, "block stack": what}
             for i, (s, what) in enumerate(zip(record["step_seconds"], record["block_stack_per_step"], strict=True))]
    create_table_artifact(rows, key="generation-timings", description="Seconds per phase and per denoising step")
    create_link_artifact(published.video.as_uri(), link_text="video.mp4", key="video-file")


def artifact_description(preview: bytes) -> str:
    """The video's artifact description: its preview first, because a run page's artifact card shows (as
    markdown) only the first line of a description, and the artifact's page shows it above the text."""
    return f"{preview_markdown(preview)}\n\nThe published video" if preview else "The published video"


def describe_markdown(published: Published, record: dict) -> str:
    """The run's markdown artifact: what was generated, where it went, how and how fast. Every value that
    someone typed (prompt, paths, GPU names) is escaped so that it shows as text (tasks/markdown.py)."""
    request, video = record["request"], record["video"]
    gpus = ", ".join(f"{g['tag']} ({g['name']})" for g in record["gpus"]) or record["device"]
    return "\n".join([
        f"# {literal(request['task'])}: {literal(request['prompt'][:80])}",
        "",
        f"- video: {code(str(published.video))}",
        f"- {video['frames']} frames, {video['width']}x{video['height']}, {video['fps']} fps ({video['seconds']} s)",
        f"- seed {record['seed']}, {request['steps']} steps, solver {literal(request['solver'])}, "
        f"tier {literal(str(record['tier']))}",
        f"- ran on {literal(gpus)}",
        *_engine_lines(record),
        *_prompt_lines(record),
        *_tier_lines(record),
        f"- {', '.join(f'{k} {v:.2f} s' for k, v in record['timings_s'].items())}",
        *_energy_lines(record),
    ])


def _engine_lines(record: dict) -> list[str]:
    """The parallel plan and each rank's denoising seconds, and whether a resident engine worker computed."""
    engine = record.get("engine") or {}
    if not engine:
        return []
    plan = engine["parallel"]
    where = ("resident engine worker(s)" if engine["resident"] else
             "the run's own rank processes" if plan["world_size"] > 1 else "the run's own process")
    ranks = ", ".join(f"rank {r['rank']} {r['denoise_s']:.2f} s" for r in engine["ranks"])
    return [f"- {plan['world_size']} rank(s) (Ulysses {plan['ulysses']} x CFG {plan['cfg']}) on {where}, "
            f"pipelines loaded there so far: {engine['loads']}; denoising per rank: {ranks}"]


def _energy_lines(record: dict) -> list[str]:
    energy = record["energy"]
    if energy is None:
        return []
    return [f"- the GPU drew {energy['joules'] / 1e3:,.1f} kJ while denoising ({energy['mean_watts']:.0f} W mean, "
            f"SM clock {energy['mean_sm_mhz']:,} MHz, {energy['power_capped']:.0%} of the time at its power limit)"]


def _prompt_lines(record: dict) -> list[str]:
    """A line for each prompt that the text encoder's token limit cut."""
    return [f"- the {name.replace('_', ' ')} was cut to its first {count['kept']} of {count['tokens']} tokens "
            "(the text encoder's limit): the rest had no effect"
            for name, count in record["prompt_tokens"].items() if count["truncated"]]


def _tier_lines(record: dict) -> list[str]:
    """The markdown lines on the tier: its patches, the compile warm-up, the model calls computed."""
    applied = [literal(p["name"]) for p in record["patches"] if p["on"]]
    off = [f"{literal(p['name'])} ({literal(p['detail'])})" for p in record["patches"] if not p["on"]]
    lines = [f"- tier {literal(str(record['tier']))}: {', '.join(applied) or 'no patches'}"
             + (f"; off: {'; '.join(off)}" if off else "")]
    if record["compile"] is not None:
        warm = record["compile"]
        lines.append(f"- compile warm-up {warm['seconds']:.1f} s: {literal(warm['detail'])}" if warm["compiled"]
                     else f"- no compile warm-up: {literal(warm['detail'])}")
    calls, cache = record["model_calls"], record["step_cache"]
    if cache is None:
        lines.append(f"- {calls['computed']}/{calls['total']} model calls computed (no step cache)")
    else:
        skipped = ", ".join(str(i + 1) for i in record["skipped_steps"]) or "none"
        lines.append(f"- {literal(cache['method'])}: {calls['computed']}/{calls['total']} model calls computed, "
                     f"{calls['skipped']} skipped; steps that reused the cache entirely: {skipped}")
    return lines
