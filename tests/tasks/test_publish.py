"""publish: a video and its record appear in outputs/ all at once or not at all."""
from __future__ import annotations

import datetime as dt
import json

import pytest

from tasks import publish as publish_module
from tasks.publish import STAGING, publish_files, slugify

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
