"""Property tests: whatever a caller sends, a request or a manifest validates or is rejected with a message
naming the field (or the manifest line); nothing crashes."""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from pydantic import ValidationError

from flows.batch import ManifestError, load_manifest
from flows.request import GenerationRequest, problems
from tasks.gpus import GpuProfile, SimulatedGpu, read_gpu_profile

PROFILES = [GpuProfile(source="none", reason="test"), read_gpu_profile([SimulatedGpu(name="H100", total_gb=85.5)]),
            read_gpu_profile([SimulatedGpu(name="L40S", total_gb=48.0)] * 2)]
ORACLE = Path(__file__).parents[1] / "fixtures" / "oracle"
FIELDS = list(GenerationRequest.model_fields)
CHOICES = {"task": ["tiny", "tiny-i2v", "t2v-A14B", "i2v-A14B", "t2v-1.3B"], "size": ["64*64", "832*480", "1280*720"],
           "tier": ["quality", "balanced", "speed"], "strategy": ["auto", "max_speed", "concurrent"],
           "solver": ["unipc", "dpm++", "euler"], "step_cache": ["teacache", "magcache"]}
PATHS = ["frame.png", "notes.png", "folder", "missing.png", "/etc/passwd", "../frame.png", "", "a\x00b",
         str(ORACLE / "t2v-A14B-tiny"), str(ORACLE / "i2v-A14B-tiny"), "tiny", "tiny-i2v"]

junk = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70), st.floats(),
                 st.text(max_size=12), st.lists(st.integers(min_value=-3, max_value=9), max_size=3),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def _value(name: str) -> st.SearchStrategy:
    if name in CHOICES:
        return st.one_of(st.sampled_from(CHOICES[name]), junk)
    if name in ("image", "checkpoint"):
        return st.one_of(st.sampled_from(PATHS), junk)
    if name in ("prompt", "negative_prompt"):
        return st.one_of(st.text(max_size=30), junk)
    if name in ("duration_s", "frame_count", "steps", "shift", "guide_scale", "seed", "gpus_per_job",
                "teacache_threshold"):
        return st.one_of(st.integers(min_value=-5, max_value=300), st.floats(min_value=-1, max_value=100), junk)
    return junk


requests = st.dictionaries(st.sampled_from(FIELDS + ["num_gpus", "Task"]), st.none(), max_size=8).flatmap(
    lambda keys: st.fixed_dictionaries({k: _value(k) for k in keys}))


def _files(folder: Path) -> None:
    Image.new("RGB", (80, 48), (200, 120, 40)).save(folder / "frame.png")
    (folder / "notes.png").write_text("not an image\n")
    (folder / "folder").mkdir()


def test_every_request_validates_or_names_its_field(wan_env, tmp_path, monkeypatch):
    _files(tmp_path)
    monkeypatch.setenv("WAN_CHECKPOINT_ROOT", str(ORACLE))

    @settings(max_examples=300, deadline=None, database=None)
    @given(fields=requests, profile=st.sampled_from(PROFILES))
    def check(fields, profile):
        try:
            GenerationRequest.for_hardware(profile, **fields)
        except ValidationError as exc:
            lines = problems(exc)
            assert lines
            for line in lines:
                field = line.partition(": ")[0].split(".")[0]  # a nested field is named by its path: loras.0.file
                assert field in FIELDS or field in fields, line

    from tasks.settings import get_settings

    get_settings.cache_clear()
    check()


def _manifest_text(kind: str, defaults: dict | None, entries: list) -> str:
    if kind == "jsonl":
        lines = ([json.dumps({"defaults": defaults})] if defaults is not None else []) + [
            json.dumps(entry) for entry in entries]
        return "\n".join(lines) + "\n"
    return yaml.safe_dump({"defaults": defaults, "entries": entries} if defaults is not None else entries)


manifests = st.tuples(
    st.sampled_from(["yaml", "jsonl"]),
    st.one_of(st.none(), requests),
    st.lists(st.one_of(requests, junk), max_size=4),
    st.one_of(st.none(), st.text(max_size=40)),  # or text as typed, whatever it is
)


def test_every_manifest_loads_or_reports_its_lines(wan_env, tmp_path):
    _files(tmp_path)

    @settings(max_examples=150, deadline=None, database=None)
    @given(manifest=manifests)
    def check(manifest):
        kind, defaults, entries, raw = manifest
        try:
            text = raw if raw is not None else _manifest_text(kind, defaults, entries)
        except (TypeError, ValueError):  # json/yaml cannot write it (a NaN is fine, a NUL in YAML is not)
            return
        path = tmp_path / f"m.{kind}"
        path.write_text(text, encoding="utf-8")
        try:
            loaded = load_manifest(path, profile=PROFILES[0])
        except ManifestError as exc:
            header, *details = str(exc).split("\n")
            assert header.startswith(str(path)), header
            assert all(re.match(r"  line \d+: .", line) for line in details), details
        else:
            assert loaded and all(entry.request.prompt.strip() for entry in loaded)

    check()
