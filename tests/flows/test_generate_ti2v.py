"""The generate-video flow on the tiny TI2V preset: text+image and text-only runs give playable 24 fps MP4s
and records that say which task and which image made them."""
from __future__ import annotations

import json

import imageio_ffmpeg
from PIL import Image

from flows.generate import generate_video
from flows.request import GenerationRequest


def _generate(request: GenerationRequest) -> tuple[dict, tuple[tuple[int, int], float, int]]:
    """(the run's metadata.json, (MP4 size, fps, frames))."""
    state = generate_video(request, return_state=True)
    assert state.is_completed(), state.message
    published = state.result()
    reader = imageio_ffmpeg.read_frames(str(published.video))
    meta = next(reader)
    return json.loads(published.metadata.read_text()), (meta["size"], meta["fps"], sum(1 for _ in reader))


def test_text_and_image_to_video_follows_the_image_aspect_at_24_fps(prefect_server, wan_env, tmp_path):
    image = tmp_path / "first.png"
    Image.new("RGB", (60, 90), (220, 120, 30)).save(image)   # portrait: the 96*64 area becomes 64x96
    request = GenerationRequest(task="tiny-ti2v", prompt="a heron lands on a pier", image=str(image),
                                size="96*64", frame_count=9, steps=3, seed=3)
    record, mp4 = _generate(request)
    assert mp4 == ((64, 96), 24, 9)
    assert record["request"] == request.model_dump(mode="json") and record["request"]["image"] == str(image)
    assert record["sampling"]["task"] == "tiny-ti2v" and record["sampling"]["steps"] == 3
    assert record["video"] == {"file": "video.mp4", "frames": 9, "width": 64, "height": 96, "fps": 24,
                               "seconds": 0.333, "codec": "h264/yuv420p"}


def test_text_to_video_with_the_ti2v_model(prefect_server, wan_env):
    request = GenerationRequest(task="tiny-ti2v", prompt="a tram in the fog", size="96*64", frame_count=5, steps=3,
                                seed=4)
    record, mp4 = _generate(request)
    assert mp4 == ((96, 64), 24, 5)
    assert record["request"]["task"] == "tiny-ti2v" and record["request"]["image"] is None
    assert record["video"]["fps"] == 24 and record["video"]["seconds"] == round(4 / 24, 3)
