"""Compile patch: torch.compile of the DiT's repeated transformer blocks, with an on-disk cache.

Each block of each expert is compiled in place (`nn.Module.compile`, which leaves the module, its
parameters and state_dict as they are). The blocks share one code path and, at a fixed shape, one
graph: the first block compiles it and every other block of both experts reuses it, so compile time
does not grow with depth. Shapes are static (`dynamic=False`): one graph per video size, which is
what a run uses. The step-cache hooks run outside the blocks, so their data-dependent decisions
never enter compiled code.

The compiled artefacts go to an on-disk cache (inductor's FX graph cache and AOTAutograd cache under
`TORCHINDUCTOR_CACHE_DIR`), so a second process at the same shape re-traces but does not re-compile.
A user's own `TORCHINDUCTOR_CACHE_DIR` wins; otherwise `$WAN_CACHE_DIR/inductor` or
`~/.cache/wanflow/inductor`.

`warm_up(pipe, size, frames)` runs one forward per expert at the run's shape so the compile happens
before the run's timed steps (the flow's warm-up-compile task).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .base import PatchHandle, PatchStack, keep_attr, keep_setting, setdefault_env

log = logging.getLogger(__name__)

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


@dataclass(frozen=True)
class CompileConfig:
    backend: str = "inductor"   # "eager" / "aot_eager" trace without generating kernels (tests)
    mode: str | None = None     # torch.compile's mode; None is its default
    fullgraph: bool = True      # a block that cannot be captured whole is an error, not a silent split
    dynamic: bool = False       # one static graph per shape: the fastest kernels for a fixed video size


def wanflow_inductor_dir() -> Path:
    root = os.environ.get("WAN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "wanflow")
    return Path(root) / "inductor"


def compile_status(device: torch.device | str, backend: str = "inductor") -> tuple[bool, str]:
    """Whether torch.compile with `backend` is worth applying on `device`, and why (not)."""
    device = torch.device(device)
    if backend != "inductor":
        return True, f"torch.compile backend {backend!r} (traces the blocks, no generated kernels)"
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, "no CUDA GPU (inductor's fast kernels here are Triton GPU kernels)"
    from torch.utils._triton import has_triton

    if not has_triton():
        return False, "Triton is not installed or does not support this GPU"
    return True, "torch.compile (inductor) of the repeated blocks, on-disk cache"


def _enable_disk_caches(stack: PatchStack) -> str:
    """Point inductor at our cache dir unless the user chose one, and turn its FX graph and
    AOTAutograd caches on (both default on in recent torch; set so an env override does not
    silently cost a recompile per process). Returns the cache dir in use."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    stack.undo_on_remove(setdefault_env(CACHE_ENV, str(wanflow_inductor_dir())))
    stack.undo_on_remove(keep_setting(inductor_config, "fx_graph_cache"))
    stack.undo_on_remove(keep_setting(functorch_config, "enable_autograd_cache"))
    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    return os.environ[CACHE_ENV]


def apply_compile(pipe, cfg: CompileConfig | None = None) -> PatchHandle:
    """Compile every block of `pipe.repeated_blocks()` in place; `remove()` makes them eager again."""
    cfg = cfg or CompileConfig()
    stack = PatchStack("compile")
    cache_dir = _enable_disk_caches(stack) if cfg.backend == "inductor" else None
    blocks = pipe.repeated_blocks()
    for block in blocks:
        # nn.Module.compile stores the compiled call in `_compiled_call_impl`; putting the previous
        # value back is the exact inverse.
        stack.undo_on_remove(keep_attr(block, "_compiled_call_impl"))
        block.compile(backend=cfg.backend, mode=cfg.mode, fullgraph=cfg.fullgraph, dynamic=cfg.dynamic)
    stack.detail = (f"torch.compile({cfg.backend}, mode={cfg.mode or 'default'}, fullgraph={cfg.fullgraph}, "
                    f"dynamic={cfg.dynamic}) of {len(blocks)} blocks"
                    + (f", cache {cache_dir}" if cache_dir else ""))
    log.info("compile: %s", stack.detail)
    return stack


@torch.no_grad()
def warm_up(pipe, size: tuple[int, int], frames: int, batch: int | None = None,
            latent_hw: tuple[int, int] | None = None) -> float:
    """One forward per expert at the run's shape (size (W, H), `frames` video frames, `batch` rows per
    DiT call; None: what the loop will use, 2 when cond and uncond run as one batch), so compilation
    happens now. Returns the seconds spent. I2V takes its latent grid from the image's aspect ratio:
    pass it as `latent_hw` (`wan_engine.pipeline.i2v_latent_grid`), or the run compiles its own shape.

    Experts not on the device (memory plan: swapped) are skipped when another one is: compiled code
    is shared by shape, so one warmed expert covers both."""
    spec = pipe.spec
    w, h = size
    lat_h, lat_w = latent_hw or (h // spec.vae_stride[1], w // spec.vae_stride[2])
    grid = ((frames - 1) // spec.vae_stride[0] + 1, lat_h, lat_w)
    pf, ph, pw = spec.patch_size
    tokens = grid[0] // pf * (grid[1] // ph) * (grid[2] // pw)
    if batch is None:
        batch = 2 if pipe.batch_cfg(tokens) else 1
    resident = {n: d for n, d in pipe.experts.items() if next(d.parameters()).device.type == pipe.device.type}
    if not resident:   # nothing on the device yet: warm the expert the loop starts with
        name, dit = next(iter(pipe.experts.items()))
        resident = {name: dit.to(pipe.device)}
    start = time.perf_counter()
    for name, dit in resident.items():
        cfg = dit.config
        t0 = time.perf_counter()
        x = torch.zeros(batch, spec.z_dim, *grid, device=pipe.device)  # [B, z, f, h, w]
        extra = cfg.in_dim - spec.z_dim
        y = torch.zeros(batch, extra, *grid, device=pipe.device) if extra else None  # [B, C_y, f, h, w]
        # TI2V conditions each token on its own timestep: the blocks then see per-token modulation
        t = torch.full((batch, tokens) if cfg.model_type == "ti2v" else (batch,), 999, device=pipe.device)
        context = torch.zeros(batch, 1, cfg.text_dim, device=pipe.device, dtype=pipe.dtype)  # [B, 1, text_dim]
        dit(x, t, context, y=y)
        if pipe.device.type == "cuda":
            torch.cuda.synchronize(pipe.device)
        log.info("warm-up forward of %s at %dx%d, %d frames, batch %d: %.1f s", name, w, h, frames, batch,
                 time.perf_counter() - t0)
    return time.perf_counter() - start
