"""Attention backend patch: torch SDPA (the engine's default) or FlashAttention-4 where it runs.

FlashAttention-4 (PyPI `flash-attn-4`, import `flash_attn.cute`, CuTe DSL kernels for Hopper SM90
and Blackwell SM100/SM120) ran 1.11-1.16x SDPA at Wan's shapes (40 heads x 128, bf16) on our H200
(660 vs 592 TFLOP/s at 480p, 647 vs 560 at 720p), relative difference 3.1e-3, and an A14B expert's
forward 0.91x its SDPA time (docs/benchmarks.md). With backend "auto" it is used when it imports, the GPU is
one it has kernels for, the model runs in bf16/fp16, and a small probe call agrees with SDPA;
otherwise SDPA stays. Either way one log line names the backend and why.

The patch acts through the engine's seam: every `wan_engine.dit.Attention` has an `attention_fn`
(q, k, v [B, N, L, D] -> [B, N, L, D], default `F.scaled_dot_product_attention`) which the patch
swaps per instance; `remove()` puts the class default back. FA4 is wrapped as a torch custom op
with a shape-only fake, so compiled blocks capture it as one node (fullgraph) instead of breaking
the graph at an opaque Python call.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import PatchHandle, PatchStack, swap_attr

log = logging.getLogger(__name__)

BACKENDS = ("auto", "sdpa", "fa4")
FA4_MODULE = "flash_attn.cute"
FA4_ARCHS = (9, 10, 11, 12)  # compute capability majors with FA4 kernels: Hopper, Blackwell (SM100-SM120)
SEAM = "attention_fn"


@dataclass(frozen=True)
class AttentionConfig:
    backend: str = "auto"   # "auto": FA4 where it runs, else SDPA; "sdpa"; "fa4" (an error where it cannot run)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"attention backend must be one of {BACKENDS}, got {self.backend!r}")


@torch.library.custom_op("wanflow::flash_attention_4", mutates_args=())
def _fa4_op(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """FA4 forward on [B, L, N, D] (its layout); non-causal, scale 1/sqrt(D) like SDPA's default."""
    out = importlib.import_module(FA4_MODULE).flash_attn_func(q, k, v)
    return out[0] if isinstance(out, tuple) else out  # versions return (out, lse) or out


@_fa4_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return q.new_empty((*q.shape[:-1], v.shape[-1]))  # [B, L, N, Dv], contiguous like FA4's output


def fa4_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The engine's attention contract (q, k, v [B, N, L, D] -> [B, N, L, D]) on FlashAttention-4.
    The engine's q/k/v are views of [B, L, N, D] memory, so `contiguous()` costs nothing there; where
    RoPE wrote [B, N, L, D] instead (the plain path), compiled blocks fuse the copy into that kernel."""
    q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # [B, L, N, D]
    return _fa4_op(q, k, v).transpose(1, 2)  # [B, N, L, D]


def fa4_status(device: torch.device | str, dtype: torch.dtype | None = None) -> tuple[bool, str]:
    """Whether FA4 can run on `device` (and `dtype`, when given), and why (not). Does not launch it."""
    device = torch.device(device)
    try:
        module = importlib.import_module(FA4_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name in ("flash_attn", FA4_MODULE):
            return False, "FlashAttention-4 not installed (pip install flash-attn-4)"
        return False, f"FlashAttention-4 does not import ({exc})"
    except Exception as exc:  # a broken CUDA / CuTe DSL install raises at import
        return False, f"FlashAttention-4 does not import ({type(exc).__name__}: {exc})"
    if not hasattr(module, "flash_attn_func"):
        return False, f"{FA4_MODULE} has no flash_attn_func (not FlashAttention-4)"
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, "no CUDA GPU"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in FA4_ARCHS:
        return False, f"SM{major}{minor} has no FlashAttention-4 kernels (Hopper SM90, Blackwell SM100/SM120)"
    if dtype is not None and dtype not in (torch.bfloat16, torch.float16):
        return False, f"FlashAttention-4 runs bf16/fp16, the model runs {dtype}"
    return True, f"FlashAttention-4 on SM{major}{minor}"


def _probe_fa4(device: torch.device, dtype: torch.dtype, num_heads: int, head_dim: int) -> str | None:
    """Run FA4 once at the model's head shape against SDPA; None when it agrees, else the problem.
    The first call JIT-compiles the kernel (about 2 s), which the run would pay anyway."""
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, 256, num_heads, head_dim, generator=gen, device=device, dtype=dtype).transpose(1, 2)
               for _ in range(3))  # [1, N, 256, D] views of [1, 256, N, D], as the engine passes them
    try:
        out = fa4_attention(q, k, v)
    except Exception as exc:  # an unsupported head dim or GPU raises inside the CuTe launcher
        return f"its probe call failed ({type(exc).__name__}: {exc})"
    ref = F.scaled_dot_product_attention(q, k, v)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    return None if err < 2e-2 else f"its probe differs from SDPA by {err:.1e}"


def select_backend(device: torch.device | str, dtype: torch.dtype, requested: str = "auto",
                   num_heads: int | None = None, head_dim: int | None = None) -> tuple[str, str]:
    """("fa4" | "sdpa", why). With head sizes given, FA4 must also pass a probe call."""
    if requested == "sdpa":
        return "sdpa", "torch SDPA (requested)"
    ok, why = fa4_status(device, dtype)
    if ok and head_dim is not None:
        problem = _probe_fa4(torch.device(device), dtype, num_heads, head_dim)
        ok, why = problem is None, why if problem is None else f"FlashAttention-4 {problem}"
    if ok:
        return "fa4", why
    if requested == "fa4":
        raise RuntimeError(f"attention backend 'fa4' was requested but cannot run: {why}")
    return "sdpa", f"torch SDPA ({why})"


def _attention_modules(pipe) -> list[torch.nn.Module]:
    from wan_engine.dit import Attention

    return [m for dit in pipe.experts.values() for m in dit.modules() if isinstance(m, Attention)]


def apply_attention(pipe, cfg: AttentionConfig | None = None) -> PatchHandle:
    """Choose the attention backend for `pipe` and install it in every Attention module."""
    cfg = cfg or AttentionConfig()
    dit_cfg = next(iter(pipe.experts.values())).config
    backend, why = select_backend(pipe.device, pipe.dtype, cfg.backend, dit_cfg.num_heads, dit_cfg.head_dim)
    stack = PatchStack("attention", why)
    if backend == "fa4":
        for module in _attention_modules(pipe):
            stack.undo_on_remove(swap_attr(module, SEAM, fa4_attention))
    log.info("attention backend: %s", why)
    return stack
