"""The `batch-generate` flow: a manifest of prompts in, one published video per entry out.

A manifest is YAML or JSONL, one GenerationRequest per entry, with defaults for the batch:

    defaults: {task: tiny, frame_count: 5}   # optional: fields every entry starts from
    entries:
      - prompt: a lighthouse at dusk
      - {prompt: a fox in fresh snow, seed: 7}

(a bare YAML list of entries works too). In JSONL each line is an entry, except a first
line `{"defaults": {...}}`. The manifest must lie inside WAN_INPUT_ROOTS (flows/inputs.py),
as must the images its entries name. Every entry is validated before any generation starts:
one bad entry rejects the whole manifest, and every problem is reported with its line number.

Entries run as `generate-video` subflows in this one process, grouped by checkpoint: the
process keeps what it loaded (tasks/pipelines.py), so a model is loaded once per GPU for
its group, then dropped before the next checkpoint's group. Within a group as many entries
run side by side as the strategy gives the GPUs jobs (the GPU slots decide which GPUs).

Re-running a manifest resumes it: a finished entry leaves a record
`<outputs>/batch-records/<key>.json`, `key` a hash of what the entry asks for (everything
but the scheduling fields), and an entry whose record and video exist is skipped. An entry
without a seed gets one derived from its key, so the batch is reproducible.

    python -m flows.batch deployments/manifests/example.yaml
"""
from __future__ import annotations

import contextvars
import hashlib
import json
import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed, State
from pydantic import ValidationError

from flows.generate import generate_video
from flows.inputs import InputError, confine
from flows.request import GenerationRequest, describe_error
from tasks.gpus import GpuProfile, read_gpu_profile
from tasks.markdown import literal, literal_cells
from tasks.pipelines import process_engines
from tasks.publish import slugify
from tasks.settings import get_settings

RECORDS_DIR = "batch-records"
SCHEDULING_FIELDS = frozenset({"strategy", "gpus_per_job", "gpu_ids"})  # where a video is made, not what it shows
MANIFEST_SUFFIXES = (".yaml", ".yml", ".jsonl")


class ManifestError(ValueError):
    """A manifest that cannot run; the message names every problem by its line."""


@dataclass(frozen=True)
class BatchEntry:
    """One validated manifest entry and the key of what it asks for."""

    line: int
    request: GenerationRequest
    key: str


@dataclass(frozen=True)
class _Parsed:
    defaults: dict
    entries: list[tuple[int, Any, dict[str, int]]]  # (line, entry as written, line of each of its fields)
    problems: list[tuple[int, str]]  # (line, what is wrong)


def load_manifest(path: str | Path, defaults: dict | None = None,
                  profile: GpuProfile | None = None) -> list[BatchEntry]:
    """Read and validate a manifest; raises ManifestError listing every bad entry by line.

    `defaults` sit under the manifest's own defaults; an entry's fields win over both.
    """
    if defaults is not None and not isinstance(defaults, dict):
        raise ManifestError(f"defaults: an object of request fields, not {type(defaults).__name__}")
    given = path
    path = Path(path)
    if path.suffix not in MANIFEST_SUFFIXES:
        raise ManifestError(f"{path}: a manifest is a {', '.join(MANIFEST_SUFFIXES)} file")
    try:
        path = confine(path, get_settings().input_roots, "WAN_INPUT_ROOTS")
    except InputError as exc:
        raise ManifestError(f"manifest: {exc}") from None
    if not path.is_file():
        raise ManifestError(f"{given}: no such manifest file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{given}: not UTF-8 text (byte {exc.start})") from None
    parsed = _parse_jsonl(text) if path.suffix == ".jsonl" else _parse_yaml(text)
    profile = profile or read_gpu_profile(get_settings().gpu_inventory)
    entries, problems = _validate(parsed, {**(defaults or {}), **parsed.defaults}, profile)
    if not parsed.entries and not problems:
        raise ManifestError(f"{path}: the manifest has no entries")
    if problems:
        listed = "\n  ".join(f"line {line}: {what}" for line, what in sorted(problems, key=lambda p: p[0]))
        raise ManifestError(f"{path}: {len(problems)} problem(s), nothing was generated:\n  {listed}")
    return entries


def _parse_jsonl(text: str) -> _Parsed:
    defaults, entries, problems = {}, [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append((number, f"not JSON ({exc.msg}, column {exc.colno})"))
            continue
        if isinstance(value, dict) and set(value) == {"defaults"}:
            if entries or problems:
                problems.append((number, "the defaults line must come before the entries"))
            elif not isinstance(value["defaults"], dict):
                problems.append((number, "defaults must be an object of request fields"))
            else:
                defaults = value["defaults"]
            continue
        entries.append((number, value, {}))
    return _Parsed(defaults, entries, problems)


def _parse_yaml(text: str) -> _Parsed:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)  # the nodes carry line numbers
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        return _Parsed({}, [], [(mark.line + 1, f"not valid YAML ({exc.problem})")])
    except yaml.YAMLError as exc:  # a character the reader refuses: a position and a reason, no mark
        line = text.count("\n", 0, getattr(exc, "position", 0)) + 1
        return _Parsed({}, [], [(line, f"not valid YAML ({getattr(exc, 'reason', None) or exc})")])
    if root is None:
        return _Parsed({}, [], [])
    if isinstance(root, yaml.SequenceNode):
        return _Parsed({}, _yaml_items(root, data), [])
    if not isinstance(root, yaml.MappingNode):
        return _Parsed({}, [], [(1, "a manifest is a list of entries or a mapping with `entries` (and `defaults`)")])
    nodes = {key.value: (key.start_mark.line + 1, value) for key, value in root.value}  # safe_load: hashable keys
    problems = [(line, f"unknown top-level key {name!r}; a manifest has `defaults` and `entries`")
                for name, (line, _) in nodes.items() if name not in ("defaults", "entries")]
    defaults = data.get("defaults") or {}
    # a key brought in by a YAML merge (`<<:`) has no node of its own: its problems are reported on line 1
    if not isinstance(defaults, dict):
        problems.append((nodes.get("defaults", (1,))[0], "defaults must be a mapping of request fields"))
        defaults = {}
    items, entries = data.get("entries") or [], []
    line, node = nodes.get("entries", (1, None))
    if not isinstance(items, list):
        problems.append((line, "entries must be a list"))
    elif isinstance(node, yaml.SequenceNode):
        entries = _yaml_items(node, items)
    else:
        entries = [(line, item, {}) for item in items]
    return _Parsed(defaults, entries, problems)


def _yaml_items(sequence: yaml.SequenceNode, items: list) -> list[tuple[int, Any, dict[str, int]]]:
    """Each item with its line and the lines of its fields (a problem is reported where it is)."""
    return [(node.start_mark.line + 1, item,
             {k.value: k.start_mark.line + 1 for k, _ in node.value} if isinstance(node, yaml.MappingNode) else {})
            for node, item in zip(sequence.value, items, strict=True)]


def _validate(parsed: _Parsed, defaults: dict, profile: GpuProfile) -> tuple[list[BatchEntry], list[tuple[int, str]]]:
    entries, problems, seen = [], list(parsed.problems), {}
    for line, fields, field_lines in parsed.entries:
        if not isinstance(fields, dict):
            problems.append((line, f"an entry is a mapping of request fields, not {type(fields).__name__}"))
            continue
        try:
            request = GenerationRequest.for_hardware(profile, **{str(k): v for k, v in {**defaults, **fields}.items()})
        except ValidationError as exc:
            for error in exc.errors():
                where, message = describe_error(error)
                problems.append((field_lines.get(where, line), f"{where}: {message}" if where else message))
            continue
        key = entry_key(request)
        if key in seen:
            problems.append((line, f"asks for the same video as line {seen[key]}; give one of them a seed"))
            continue
        seen[key] = line
        if request.seed is None:
            request = request.model_copy(update={"seed": int(key[:8], 16) % 2**31})
        entries.append(BatchEntry(line, request, key))
    return entries, problems


def entry_key(request: GenerationRequest) -> str:
    """A hash of what a request asks for: the same video, whatever GPUs make it."""
    content = request.model_dump(mode="json", exclude=set(SCHEDULING_FIELDS))
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:20]


def lane_count(request: GenerationRequest, profile: GpuProfile) -> int:
    """How many generations of a group run side by side under the request's strategy.

    concurrent: one per `gpus_per_job` GPUs; auto: one per the most GPUs a job can compute on
    (each run takes the largest free set it can use); max_speed takes every selected GPU for one
    run, so one at a time; without a GPU, one. Lanes never share a device (simulated GPUs all run on the CPU), so no two
    generations use one loaded pipeline at once.
    """
    devices = {g.device for g in profile.gpus if request.gpu_ids is None or g.index in request.gpu_ids}
    if request.strategy == "max_speed" or not devices:
        return 1
    per_job = ((request.gpus_per_job or 1) if request.strategy == "concurrent"
               else max(request.job_world_sizes(profile), default=1))
    return max(1, len(devices) // per_job)


def plan_groups(entries: list[BatchEntry]) -> list[list[BatchEntry]]:
    """Entries grouped by checkpoint, tier and scheduling, groups of one checkpoint next to each other.

    One tier per group: side-by-side runs never switch a tier (and its process-wide settings)
    under each other.
    """
    groups: dict[tuple, list[BatchEntry]] = {}
    for entry in entries:
        r = entry.request
        key = (r.checkpoint, r.tier, r.teacache_threshold, r.step_cache, r.strategy, r.gpus_per_job,
               tuple(r.gpu_ids or ()))
        groups.setdefault(key, []).append(entry)
    first_seen = {}
    for checkpoint, *_ in groups:
        first_seen.setdefault(checkpoint, len(first_seen))
    return [group for _, group in sorted(groups.items(), key=lambda item: first_seen[item[0][0]])]


def _record_path(outputs_dir: Path, entry: BatchEntry) -> Path:
    return outputs_dir / RECORDS_DIR / f"{entry.key}.json"


def finished_video(outputs_dir: Path, entry: BatchEntry) -> str | None:
    """The video an earlier run made for this entry, if its record and file are still there."""
    record = _record_path(outputs_dir, entry)
    if not record.is_file():
        return None
    video = json.loads(record.read_text()).get("video")
    return video if video and Path(video).is_file() else None


def _write_record(outputs_dir: Path, entry: BatchEntry, manifest: str, video: Path, run_id: str | None) -> None:
    path = _record_path(outputs_dir, entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"key": entry.key, "manifest": manifest, "line": entry.line, "prompt": entry.request.prompt,
              "video": str(video), "run_id": run_id, "request": entry.request.model_dump(mode="json")}
    staging = path.with_suffix(f".{os.getpid()}.tmp")
    staging.write_text(json.dumps(record, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(staging, path)  # a reader sees the whole record or none


@task(name="read-manifest", retries=0, cache_policy=NO_CACHE)
def read_manifest(manifest: str, defaults: dict | None = None) -> list[BatchEntry]:
    """Validate every entry of the manifest against this host's hardware before generating any."""
    entries = load_manifest(manifest, defaults)
    get_run_logger().info("%s: %d valid entries", manifest, len(entries))
    return entries


def _generate(entry: BatchEntry, outputs_dir: Path, manifest: str) -> dict:
    """Run one entry as a generate-video subflow; returns its summary row (and the device it used)."""
    name = f"{Path(manifest).stem}-line-{entry.line}-{slugify(entry.request.prompt, 24)}"
    started = time.monotonic()
    state = generate_video.with_options(flow_run_name=name)(entry.request, return_state=True)
    row = _row(entry, state.type.value.lower(), time.monotonic() - started, state.message or "")
    if state.is_completed():
        published = state.result()
        _write_record(outputs_dir, entry, manifest, published.video, str(state.state_details.flow_run_id))
        row.update(output=str(published.video),
                   device=json.loads(published.metadata.read_text(encoding="utf-8"))["device"])
    return row


def _row(entry: BatchEntry, status: str, seconds: float, output: str) -> dict:
    return {"line": entry.line, "prompt": entry.request.prompt, "status": status,
            "duration_s": round(seconds, 2), "output": output}


@flow(name="batch-generate")
def batch_generate(manifest: str, defaults: dict[str, Any] | None = None,
                   skip_existing: bool = True) -> list[dict] | State:
    """Generate every entry of a manifest (YAML or JSONL); entries already generated are skipped.

    `defaults` are request fields for entries that set neither them nor the manifest's defaults.
    """
    logger = get_run_logger()
    settings = get_settings()
    outputs_dir = settings.outputs_dir.resolve()
    profile = read_gpu_profile(settings.gpu_inventory)
    entries = read_manifest(manifest, defaults)
    rows = []
    todo = []
    for entry in entries:
        video = finished_video(outputs_dir, entry) if skip_existing else None
        if video:
            rows.append(_row(entry, "skipped", 0.0, video))
        else:
            todo.append(entry)
    logger.info("%d entries to generate, %d already done", len(todo), len(rows))

    groups = plan_groups(todo)
    for i, group in enumerate(groups):
        lanes = lane_count(group[0].request, profile)
        logger.info("%s: %d entries, %d at a time (strategy %s)", group[0].request.checkpoint, len(group), lanes,
                    group[0].request.strategy)
        with ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="wanflow-batch") as pool:
            # each subflow runs in a copy of this context, so it is a child of this run
            futures = [pool.submit(contextvars.copy_context().run, _generate, entry, outputs_dir, manifest)
                       for entry in group]
            done = [future.result() for future in futures]
        next_checkpoint = groups[i + 1][0].request.checkpoint if i + 1 < len(groups) else None
        devices = {row.pop("device") for row in done if "device" in row}
        if next_checkpoint != group[0].request.checkpoint:
            for device in devices:
                process_engines().evict(device)  # the next checkpoint needs the memory
        rows += done

    rows.sort(key=lambda row: row["line"])
    counts = Counter(row["status"] for row in rows)
    summary = ", ".join(f"{n} {status}" for status, n in counts.items())
    create_table_artifact(literal_cells(rows), key="batch-summary", description=f"{literal(manifest)}: {summary}")
    logger.info("%s: %s", manifest, summary)
    bad = [row for row in rows if row["status"] not in ("completed", "skipped")]
    if bad:
        lines = ", ".join(f"line {row['line']} ({row['status']})" for row in bad)
        return Failed(message=f"{len(bad)} of {len(rows)} entries did not complete: {lines}", data=rows)
    return rows


if __name__ == "__main__":
    batch_generate(sys.argv[1])
