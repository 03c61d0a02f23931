"""The `encode` task: VAE-decode the latents, then write an H.264 MP4 with imageio-ffmpeg.

The MP4 is yuv420p (plays everywhere) at the task's frame rate, written straight into a staging
folder under the outputs folder (the decode runs on the resident engine worker of the run's GPU when
`wanflow worker` keeps one) (tasks/staging.py), which `publish` renames into place: a run
killed while encoding leaves its file only where the next publish sweeps it. The same frames
become the small animated preview that the run's page shows (tasks/preview.py).
"""
from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.engine_channel import Job, call, resident_tag
from tasks.gpu_phase import run_decode
from tasks.pipelines import EngineCache, process_engines
from tasks.preview import preview_webp
from tasks.runs import RunDescription
from tasks.settings import get_settings
from tasks.staging import new_staging_folder

CRF = 18  # visually lossless for generated video; the default 23 blurs fine texture


@dataclass
class EncodedVideo:
    """An MP4 waiting to be published."""

    path: Path  # <outputs>/.staging/<folder>/video.mp4
    frames: int
    width: int
    height: int
    fps: int
    decode_s: float
    write_s: float
    preview: bytes = b""  # an animated WEBP of the frames (tasks/preview.py); empty: none


def _timed(fn, *args):
    """fn(*args) and the seconds it took."""
    started = time.perf_counter()
    return fn(*args), time.perf_counter() - started


def write_mp4(frames: np.ndarray | torch.Tensor, path: Path, fps: int) -> None:
    """Write uint8 RGB frames [F, H, W, 3] as H.264 yuv420p at `fps`."""
    frames = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [F, H, W, 3], got {frames.dtype} {frames.shape}")
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"yuv420p needs an even width and height, got {w}x{h}")
    writer = imageio_ffmpeg.write_frames(
        str(path), (w, h), fps=fps, codec="libx264", pix_fmt_in="rgb24", pix_fmt_out="yuv420p",
        quality=None, macro_block_size=2, ffmpeg_log_level="error",
        output_params=["-crf", str(CRF), "-movflags", "+faststart"],
    )
    writer.send(None)  # start ffmpeg
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))  # [H, W, 3]
    writer.close()


def write_staged_mp4(frames: np.ndarray | torch.Tensor, outputs_dir: Path, fps: int) -> Path:
    """Write the frames as `video.mp4` in a new staging folder under `outputs_dir`; returns its path."""
    folder = new_staging_folder(outputs_dir)
    path = folder / "video.mp4"  # created by ffmpeg: the usual mode of a new file (mkstemp's would be 0600)
    try:
        write_mp4(frames, path, fps)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return path


@task(name="encode", retries=0, cache_policy=NO_CACHE)
def encode(latents: torch.Tensor, run: RunDescription, outputs_dir: str,
           engines: EngineCache | None = None) -> EncodedVideo:
    """Decode the latents with the run's pipeline's VAE and encode the frames as an MP4 at the run's frame rate,
    staged under `outputs_dir`. `engines`: where the pipeline is found (default: this process's engine cache)."""
    logger = get_run_logger()
    start = time.perf_counter()
    tag = resident_tag(run, get_settings().engine_tags)
    if tag is not None:  # the decode on the GPU's resident worker; the MP4 is written here
        frames = call(tag, Job("decode", run, run.allocation.lease_id, {"latents": latents}), log=logger)
    else:
        frames = run_decode(engines or process_engines(), run, latents)  # [F, H, W, 3] uint8
    decoded = time.perf_counter()
    # The preview is made beside the MP4 (ffmpeg is a child process, PIL's WEBP encoder runs without the GIL)
    with ThreadPoolExecutor(max_workers=1) as pool:
        previewed = pool.submit(_timed, preview_webp, frames, run.fps)
        path = write_staged_mp4(frames, Path(outputs_dir).resolve(), run.fps)
        written = time.perf_counter()
        preview, preview_s = previewed.result()
    count, height, width = frames.shape[0], frames.shape[1], frames.shape[2]
    logger.info("decoded %d frames %dx%d in %.2f s, encoded H.264 at %d fps in %.2f s, a %d KB preview in %.2f s "
                "beside it", count, width, height, decoded - start, run.fps, written - decoded, len(preview) // 1000,
                preview_s)
    return EncodedVideo(path=path, frames=count, width=width, height=height, fps=run.fps,
                        decode_s=decoded - start, write_s=written - decoded, preview=preview)
