"""The `generate-video` flow: one request in, one published MP4 out, as six visible tasks.

detect-gpus -> allocate-gpus -> [warm-up-compile -> denoise -> encode] -> publish. The
bracketed GPU phase runs while the run holds its GPUs' concurrency slots; they are given
back when it ends, whether it succeeded, failed (a CUDA OOM included) or was cancelled.

    python -m flows.generate '{"task": "tiny", "prompt": "a lighthouse at dusk", "duration_s": 1}'
"""
from __future__ import annotations

import secrets
import sys

from prefect import flow
from prefect.states import Cancelled, State

from flows.request import GenerationRequest
from tasks.allocate import allocate_gpus, hold_gpus
from tasks.denoise import denoise
from tasks.encode import encode
from tasks.gpus import detect_gpus
from tasks.publish import Published, publish
from tasks.settings import get_settings
from tasks.warmup import warm_up_compile


@flow(name="generate-video")
def generate_video(request: GenerationRequest) -> Published | State:
    """Generate the requested video on the GPUs its strategy allows and publish it."""
    settings = get_settings()
    profile = detect_gpus(settings.gpu_inventory)
    allocation = allocate_gpus(profile, request.strategy, settings.gpu_tag_base, gpu_ids=request.gpu_ids,
                               gpus_per_job=request.gpus_per_job, world_sizes=request.job_world_sizes(profile),
                               poll_seconds=settings.gpu_poll_seconds, lease_seconds=settings.gpu_lease_seconds)
    if isinstance(allocation, State):  # the run was cancelled before it had its GPUs
        return Cancelled(message=allocation.message)
    run = request.describe_run(request.seed if request.seed is not None else secrets.randbelow(2**31), allocation)
    with hold_gpus(run.allocation):
        warm = warm_up_compile(run, str(settings.cache_dir))
        denoised = denoise(run)
        if isinstance(denoised, State):  # the run was cancelled between two steps
            return Cancelled(message=f"cancelled during denoising, GPUs released: {denoised.message}")
        video = encode(denoised.latents, run, str(settings.outputs_dir))
    return publish(run, denoised, video, str(settings.outputs_dir), warm)  # the record holds the GPUs' release


if __name__ == "__main__":
    generate_video(GenerationRequest.model_validate_json(sys.argv[1]) if len(sys.argv) > 1 else GenerationRequest())
