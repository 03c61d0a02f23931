"""encode: the MP4 decodes back to the frames' count, size and frame rate; it is written only inside the
outputs' staging folder (a killed encode leaves nothing elsewhere) with the mode of any new file."""
from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from prefect.logging import disable_run_logger

from tasks.encode import encode, write_mp4, write_staged_mp4
from tasks.pipelines import EngineCache
from tasks.publish import publish_files
from tasks.staging import STAGING
from tests.tasks.runs import tiny_run
from wan_engine.sizes import Size

REPO = Path(__file__).resolve().parents[2]

# The encode task in a process of its own, its VAE replaced by noise frames that take x264 seconds to encode.
KILLED_ENCODE = """
import sys
import numpy as np
import torch
from prefect.logging import disable_run_logger
from tasks.encode import encode
from tasks.pipelines import EngineCache
from tests.tasks.runs import tiny_run
from wan_engine.sizes import Size

class NoiseDecoder:
    def decode(self, latents):
        return np.random.default_rng(0).integers(0, 256, (400, 256, 256, 3), dtype=np.uint8)

engines = EngineCache(load_pipeline=lambda checkpoint, device, dtype: NoiseDecoder())
with disable_run_logger():
    encode.fn(torch.zeros(16, 100, 32, 32), tiny_run(size=Size(256, 256), frame_count=397), sys.argv[1], engines)
"""


def _read(path):
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    frames = [np.frombuffer(f, np.uint8) for f in reader]
    return meta, frames


@pytest.mark.parametrize("fps", [16, 24])
def test_mp4_has_the_frames_size_and_fps(tmp_path, fps):
    frames = np.zeros((17, 48, 80, 3), np.uint8)  # [F, H, W, 3]
    frames[..., 0] = np.linspace(0, 255, 17, dtype=np.uint8)[:, None, None]  # red ramps over time
    path = tmp_path / "video.mp4"
    write_mp4(torch.from_numpy(frames), path, fps)
    meta, decoded = _read(path)
    assert meta["size"] == (80, 48) and meta["fps"] == fps and meta["codec"] == "h264"
    assert meta["pix_fmt"].startswith("yuv420p")
    assert len(decoded) == 17
    first, last = decoded[0].reshape(48, 80, 3), decoded[-1].reshape(48, 80, 3)
    assert first[..., 0].mean() < 10 and last[..., 0].mean() > 240  # frames stay in order


def test_rejects_frames_it_cannot_encode(tmp_path):
    with pytest.raises(ValueError, match="even width and height"):
        write_mp4(np.zeros((5, 33, 64, 3), np.uint8), tmp_path / "odd.mp4", 16)
    with pytest.raises(ValueError, match=r"uint8 frames \[F, H, W, 3\]"):
        write_mp4(np.zeros((5, 32, 64, 3), np.float32), tmp_path / "float.mp4", 16)


class _Decoder:
    """A pipeline whose VAE gives fixed frames."""

    def __init__(self, frames):
        self.frames = frames

    def decode(self, latents):
        return self.frames


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask 022", "umask 027"])
def test_video_and_metadata_get_the_mode_of_new_files(tmp_path, umask):
    outputs = tmp_path / "outputs"
    engines = EngineCache(load_pipeline=lambda checkpoint, device, dtype: _Decoder(np.zeros((5, 48, 80, 3), np.uint8)))
    previous = os.umask(umask)
    try:
        with disable_run_logger():
            video = encode.fn(torch.zeros(16, 2, 6, 10), tiny_run(size=Size(80, 48)), str(outputs), engines)
        folder = publish_files(video.path, {"seed": 1}, outputs.resolve(), "run", dt.date(2026, 3, 14))
    finally:
        os.umask(previous)
    assert _mode(folder / "video.mp4") == _mode(folder / "metadata.json") == 0o666 & ~umask
    assert _mode(folder) == 0o777 & ~umask


def _wait_for_no_process_naming(folder: Path, timeout: float = 30) -> None:
    """Wait for the ffmpeg that outlives the kill (imageio-ffmpeg starts it in a process group of its own;
    it ends at the end of its input) to exit."""
    deadline = time.monotonic() + timeout
    while any(str(folder).encode() in _cmdline(p) for p in Path("/proc").glob("[0-9]*/cmdline")):
        assert time.monotonic() < deadline, f"a process still writes under {folder}"
        time.sleep(0.1)


def _cmdline(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # the process ended
        return b""


def test_a_killed_encode_leaves_files_only_in_staging_and_the_next_publish_sweeps_them(tmp_path):
    outputs, tmp = tmp_path / "outputs", tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "PREFECT_HOME": str(tmp_path / "prefect-home")}
    encoding = subprocess.Popen([sys.executable, "-c", KILLED_ENCODE, str(outputs)], cwd=REPO, env=env,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.rglob("*.mp4")):  # ffmpeg is writing
            assert encoding.poll() is None, "the encode ended before it was killed"
            assert time.monotonic() < deadline, "no MP4 appeared within 120 s"
            time.sleep(0.05)
        time.sleep(0.3)
        assert encoding.poll() is None, "the encode ended before it was killed"
    finally:
        os.killpg(encoding.pid, signal.SIGKILL)  # what cancelling a run on a process worker does
        encoding.wait(timeout=30)
    _wait_for_no_process_naming(outputs)
    assert list(tmp.iterdir()) == []
    [left] = list(tmp_path.rglob("*.mp4"))
    assert left.parent.parent == outputs / STAGING

    next_video = write_staged_mp4(np.zeros((5, 48, 80, 3), np.uint8), outputs, 16)
    publish_files(next_video, {"seed": 2}, outputs, "next-run", dt.date(2026, 3, 14))
    assert list((outputs / STAGING).iterdir()) == []  # the killed run's folder swept, the new one renamed away
