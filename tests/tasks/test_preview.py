"""The run page's preview: an animated WEBP that plays in real time, fits its byte budget, and reaches the
artifact as one image of our own, whatever the prompt."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from tasks.preview import PREVIEW_MAX_FRAMES, PREVIEW_WIDTH, preview_markdown, preview_webp
from tasks.publish import artifact_description
from tests.tasks.rendering import render


def _moving(frames: int, height: int, width: int) -> np.ndarray:
    """A bright square crossing a gradient: uint8 [F, H, W, 3]."""
    video = np.zeros((frames, height, width, 3), np.uint8)
    video[..., 2] = np.linspace(0, 255, width, dtype=np.uint8)
    for f in range(frames):
        x = f * (width - 16) // max(1, frames - 1)
        video[f, height // 2 - 8:height // 2 + 8, x:x + 16] = 255
    return video


def _open(webp: bytes) -> tuple[Image.Image, list[int]]:
    image = Image.open(io.BytesIO(webp))
    durations = []
    for frame in ImageSequence.Iterator(image):
        frame.load()  # Pillow reads a WEBP frame's duration as it decodes it
        durations.append(frame.info["duration"])
    return image, durations


def test_an_81_frame_video_at_16_fps_becomes_an_animated_webp_that_plays_in_real_time():
    image, durations = _open(preview_webp(_moving(81, 480, 832), fps=16))
    assert image.format == "WEBP" and image.size == (PREVIEW_WIDTH, 185)  # 832x480 scaled, aspect kept
    assert image.n_frames == 41 and set(durations) == {125}  # every 2nd frame at 8 fps: the video's 5 s


def test_a_long_video_keeps_at_most_the_frame_limit_each_standing_for_its_frames():
    image, durations = _open(preview_webp(torch.from_numpy(_moving(481, 48, 80)), fps=16))
    assert image.size == (80, 48)  # never enlarged
    assert image.n_frames == 44 <= PREVIEW_MAX_FRAMES and set(durations) == {688}  # every 11th frame, 11/16 s


@pytest.mark.parametrize("max_bytes", [60_000, 1])
def test_a_preview_over_its_budget_drops_quality_then_frames_down_to_one_still(max_bytes):
    noise = np.random.default_rng(0).integers(0, 256, (17, 96, 160, 3), dtype=np.uint8)
    webp = preview_webp(noise, fps=16, max_bytes=max_bytes)
    image, _ = _open(webp)
    assert len(webp) <= max_bytes or image.n_frames == 1


def test_frames_it_cannot_show_are_refused():
    with pytest.raises(ValueError, match=r"uint8 frames \[F, H, W, 3\]"):
        preview_webp(np.zeros((5, 8, 8), np.uint8), fps=16)


@pytest.mark.parametrize("prompt_like", ["<img src=x onerror=alert(1)>", "](javascript:0)"])
def test_the_artifact_description_is_one_image_of_ours_then_text(prompt_like):
    webp = preview_webp(_moving(5, 64, 64), fps=16)
    description = artifact_description(webp)
    first_line = description.splitlines()[0]
    assert first_line == preview_markdown(webp) and prompt_like not in description  # nothing typed goes in it
    rendered = render(first_line)  # what the run page's artifact card renders: the first line
    assert rendered.tags == ["p", "img"]
    src = dict(rendered.attributes)["src"]
    assert src.startswith("data:image/webp;base64,") and base64.b64decode(src.split(",", 1)[1]) == webp
    assert artifact_description(b"") == "The published video"
