"""Precision patch: TF32 tensor cores for float32 matmuls and cuDNN convolutions, cuDNN autotuning.

What it speeds up in this engine: the float32 layers (time embedding and projection, the head)
and the VAE's float32 convolutions; the bf16 linear layers are unaffected. TF32 keeps float32's
range with a 10-bit mantissa, the setting the official pipeline runs its VAE under.

These are process-wide torch settings, not per pipeline: the handle saves them and `remove()`
writes them back. torch has two APIs for the TF32 switches (legacy `allow_tf32` booleans and the
newer `fp32_precision` strings) and raises when a reader of one finds them set inconsistently
through the other, so we write through the legacy booleans (both readers stay valid) unless the
user already switched the process to the new strings, and we restore both views.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .base import PatchHandle

log = logging.getLogger(__name__)

_MATMUL = torch.backends.cuda.matmul
_CUDNN = torch.backends.cudnn
_NEW_API_NODES = {"cuda.matmul": _MATMUL, "cudnn.conv": _CUDNN.conv, "cudnn.rnn": _CUDNN.rnn}


@dataclass(frozen=True)
class PrecisionConfig:
    tf32_matmul: bool = True      # float32 matmuls on TF32 tensor cores (cuBLAS)
    tf32_cudnn: bool = True       # float32 convolutions on TF32 tensor cores (cuDNN)
    cudnn_benchmark: bool = True  # let cuDNN time its algorithms per shape (the VAE's conv3d)


def tf32_status(device: torch.device | str) -> tuple[bool, str]:
    """Whether TF32 does anything on `device`, and why (not)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, "no CUDA GPU (TF32 is an NVIDIA tensor-core mode)"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return False, f"SM{major}{minor} has no TF32 tensor cores (needs compute capability 8.0+)"
    return True, f"TF32 matmul and cuDNN on SM{major}{minor}"


def _legacy(read) -> bool | None:
    """A legacy TF32 boolean, or None when the process has switched to the new API."""
    try:
        return read()
    except RuntimeError:
        return None


def precision_state() -> dict[str, object]:
    """The process-wide settings this patch may change, in both API views."""
    state: dict[str, object] = {f"{name}.fp32_precision": node.fp32_precision
                                for name, node in _NEW_API_NODES.items()}
    state["cuda.matmul.allow_tf32"] = _legacy(lambda: _MATMUL.allow_tf32)
    state["cudnn.allow_tf32"] = _legacy(lambda: _CUDNN.allow_tf32)
    state["cudnn.benchmark"] = _CUDNN.benchmark
    return state


def restore_precision(state: dict[str, object]) -> None:
    """Write back a `precision_state()`: legacy booleans first (they also set the new strings),
    then any new-API string that still differs (e.g. "none", which no boolean produces)."""
    if state["cuda.matmul.allow_tf32"] is not None:
        _MATMUL.allow_tf32 = state["cuda.matmul.allow_tf32"]
    if state["cudnn.allow_tf32"] is not None:
        _CUDNN.allow_tf32 = state["cudnn.allow_tf32"]
    for name, node in _NEW_API_NODES.items():
        if node.fp32_precision != state[f"{name}.fp32_precision"]:
            node.fp32_precision = state[f"{name}.fp32_precision"]
    _CUDNN.benchmark = state["cudnn.benchmark"]


def apply_precision(pipe, cfg: PrecisionConfig | None = None) -> PatchHandle:
    """Switch the process to TF32 / cuDNN benchmark as `cfg` asks (`pipe` is not touched: the settings
    are process-wide). Harmless on a CPU (the switches only steer CUDA kernels); tiers apply it only
    where `tf32_status` says it does something."""
    cfg = cfg or PrecisionConfig()
    before = precision_state()
    legacy = before["cuda.matmul.allow_tf32"] is not None and before["cudnn.allow_tf32"] is not None
    if cfg.tf32_matmul:
        if legacy:
            _MATMUL.allow_tf32 = True
        else:
            _MATMUL.fp32_precision = "tf32"
    if cfg.tf32_cudnn:
        if legacy:
            _CUDNN.allow_tf32 = True
        else:
            _CUDNN.conv.fp32_precision = "tf32"
    if cfg.cudnn_benchmark:
        _CUDNN.benchmark = True
    on = [name for name, flag in (("TF32 matmul", cfg.tf32_matmul), ("TF32 cuDNN", cfg.tf32_cudnn),
                                  ("cuDNN benchmark", cfg.cudnn_benchmark)) if flag]
    detail = ", ".join(on) or "nothing"
    log.info("precision: %s", detail)
    return PatchHandle("precision", lambda: restore_precision(before), detail)
