"""Engine pipelines loaded in this process, and what a GPU out-of-memory error turns into.

A plain module (no Prefect tasks here): loading an A14B pair reads over 100 GB, so every
long-lived process keeps what it loaded, keyed by checkpoint, device and dtype.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

import wan_engine
from tasks.runlog import run_logger

_PIPELINES: dict[tuple[str, str, torch.dtype], object] = {}


def engine_dtype(device: str) -> torch.dtype:
    """bf16 weights on a GPU; float32 on the CPU, where bf16 matmuls are slow."""
    return torch.float32 if device == "cpu" else torch.bfloat16


def get_pipeline(checkpoint: str, device: str):
    """The engine pipeline for a checkpoint (preset name or folder) on `device`, loaded once."""
    key = (checkpoint, device, engine_dtype(device))
    if key not in _PIPELINES:
        run_logger().info("loading %s on %s (%s)", checkpoint, device, key[2])
        _PIPELINES[key] = wan_engine.load_pipeline(checkpoint, device=device, dtype=key[2])
    return _PIPELINES[key]


def evict_pipelines(device: str) -> None:
    """Drop the pipelines held on `device` and give their memory back to the driver."""
    for key in [k for k in _PIPELINES if k[1] == device]:
        del _PIPELINES[key]
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


class GpuOutOfMemory(RuntimeError):
    """The GPU ran out of memory; the message says what to change."""


def out_of_memory_advice(device: str, frames: int, size: str, gpus: int) -> str:
    w, h = (int(v) for v in size.split("*"))
    shorter = max(5, 4 * ((frames - 1) // 8) + 1)
    return (
        f"CUDA ran out of memory on {device} generating {frames} frames at {size} on {gpus} GPU(s). "
        f"Next steps: a shorter video (frame_count={shorter} or a smaller duration_s); a lower resolution "
        f"({'832*480' if w * h > 832 * 480 else 'the smallest size of the task'}); more GPUs (strategy "
        f"max_speed, or gpus_per_job={gpus + 1} with concurrent); or offload: free the GPU of other "
        f"processes so the engine keeps the experts resident, or run on a card with more memory. "
        f"The GPU(s) have been released."
    )


@contextmanager
def out_of_memory_as_advice(device: str, frames: int, size: str, gpus: int) -> Iterator[None]:
    """Turn a CUDA OOM into `GpuOutOfMemory` with next steps, freeing the device's memory first."""
    try:
        yield
        return
    except torch.OutOfMemoryError:
        pass
    # Out here the OOM and its traceback are gone, and with them the frames that still
    # referenced activations: only now can the memory really go back.
    evict_pipelines(device)
    raise GpuOutOfMemory(out_of_memory_advice(device, frames, size, gpus))
