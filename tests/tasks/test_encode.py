"""encode: the MP4 decodes back to the frames' count, size and frame rate."""
from __future__ import annotations

import imageio_ffmpeg
import numpy as np
import pytest
import torch

from tasks.encode import write_mp4


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
