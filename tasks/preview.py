"""A small animated WEBP of a video, for the run's page in the Prefect UI.

The Prefect UI renders an artifact's description as markdown, and on a flow run's Artifacts tab
each artifact's card shows the first line of it: a preview there shows the result on the run page
itself, so comparing LoRAs or strengths between runs needs no file browser. The image travels as a
`data:` URI (the UI fetches nothing else), so it is kept to PREVIEW_MAX_BYTES: frames are taken at
about PREVIEW_FPS (at most PREVIEW_MAX_FRAMES, each shown for as long as the frames it stands for, so
it plays in real time), PREVIEW_WIDTH pixels wide, and the quality, then the frame count, is lowered
until it fits. It is made from the decoded frames the MP4 was written from (no second decode).
"""
from __future__ import annotations

import base64
import io
import math

import numpy as np
import torch
from PIL import Image

PREVIEW_WIDTH = 320  # reads well in an artifact card of the run page (about 360 px wide)
PREVIEW_FPS = 8
PREVIEW_MAX_FRAMES = 48
PREVIEW_MAX_BYTES = 200_000  # 267 KB as base64 in the artifact
_QUALITIES = (70, 50, 30)


def preview_webp(frames: np.ndarray | torch.Tensor, fps: int, max_bytes: int = PREVIEW_MAX_BYTES) -> bytes:
    """An animated WEBP of uint8 RGB frames [F, H, W, 3] at `fps`, at most `max_bytes` (a single frame if
    even that does not fit)."""
    frames = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
        raise ValueError(f"expected uint8 frames [F, H, W, 3], got {frames.dtype} {frames.shape}")
    step = max(math.ceil(fps / PREVIEW_FPS), math.ceil(len(frames) / PREVIEW_MAX_FRAMES))
    images = [_shrink(frame) for frame in frames[::step]]
    while True:
        for quality in _QUALITIES:
            data = _webp(images, 1000 * step / fps, quality)
            if len(data) <= max_bytes or len(images) == 1:
                return data
        images, step = images[::2], step * 2  # every other frame, each shown twice as long


def data_uri(webp: bytes) -> str:
    return "data:image/webp;base64," + base64.b64encode(webp).decode("ascii")


def preview_markdown(webp: bytes) -> str:
    """The preview as a markdown image: no text of the user's in it, only base64 (A-Z a-z 0-9 + / =)."""
    return f"![preview of the video]({data_uri(webp)})"


def _shrink(frame: np.ndarray) -> Image.Image:
    image = Image.fromarray(frame)
    if image.width <= PREVIEW_WIDTH:
        return image
    height = max(2, round(image.height * PREVIEW_WIDTH / image.width))
    return image.resize((PREVIEW_WIDTH, height), Image.Resampling.LANCZOS)


def _webp(images: list[Image.Image], frame_ms: float, quality: int) -> bytes:
    out = io.BytesIO()
    images[0].save(out, "WEBP", save_all=True, append_images=images[1:], duration=round(frame_ms), loop=0,
                   quality=quality, method=4)
    return out.getvalue()
