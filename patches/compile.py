"""Compile patch: the DiT's repeated transformer blocks compiled once per shape, and kept on disk.

The blocks share one code path and, at a fixed shape, one graph, so one compiled function serves every
block of both experts. Shapes are static: one graph per video size, which is what a run uses. The
step-cache hooks run outside the blocks, so their data-dependent decisions never enter compiled code.

The plain path is `nn.Module.compile` on each block with inductor's FX graph and AOTAutograd caches on
disk: it re-traces in every process but compiles nothing twice. Where torch can (`torch_internals`
says which releases), the blocks are precompiled instead (`patches.precompiled`): whole compiled
blocks saved beside those caches and loaded by the next process without re-tracing (a warm start of
0.2 s). Custom (callable) backends, `dynamic=True`, `fullgraph=False` and `precompiled=False` take the
plain path, as does every block once precompiling fails.

Inductor's caches go under `TORCHINDUCTOR_CACHE_DIR`: a user's own value wins; otherwise
`$WAN_CACHE_DIR/inductor` or `~/.cache/wanflow/inductor`. With inductor, the modules its generated
code imports are imported when the patch is applied. `remove()` puts every block's
`_compiled_call_impl` back, so the blocks run eager again, bit-identical.

`warm_up(pipe, plan)` runs the engine's own step once per expert of a run's plan, so the compile (or
the artifact load) happens before the run's timed steps (the flow's warm-up-compile task).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from wan_engine.dit import load_triton_kernels

from . import torch_internals
from .base import PatchStack, keep_attr, keep_setting, set_env
from .precompiled import PrecompiledBlocks, warn_once

log = logging.getLogger(__name__)

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
PRECOMPILED_DIR = "wanflow-precompiled"


@dataclass(frozen=True)
class CompileConfig:
    backend: str = "inductor"   # "eager" / "aot_eager" trace without generating kernels (tests)
    mode: str | None = None     # torch.compile's mode; None is its default
    fullgraph: bool = True      # a block that cannot be captured whole is an error, not a silent split
    dynamic: bool = False       # one static graph per shape: the fastest kernels for a fixed video size
    precompiled: bool = True    # save/load whole compiled blocks (warm start without re-tracing) where torch can


def wanflow_inductor_dir() -> Path:
    root = os.environ.get("WAN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "wanflow")
    return Path(root) / "inductor"


def chosen_cache_dir() -> str | None:
    """`TORCHINDUCTOR_CACHE_DIR` when someone chose it: None when unset or torch's own default (importing
    torch._dynamo writes that default into the environment)."""
    root = os.environ.get(CACHE_ENV)
    return root if root and os.path.abspath(root) != os.path.abspath(torch_internals.default_cache_dir()) else None


def precompiled_dir() -> Path | None:
    """Where precompiled blocks are saved: in the chosen `TORCHINDUCTOR_CACHE_DIR` (applying the patch with
    inductor chooses one). None without: a trace-only backend keeps its compiled blocks in memory."""
    root = chosen_cache_dir()
    return Path(root) / PRECOMPILED_DIR if root else None


def compile_status(device: torch.device | str, backend: str = "inductor") -> tuple[bool, str]:
    """Whether torch.compile with `backend` is worth applying on `device`, and why (not); when it is, whether
    the blocks are precompiled in this torch."""
    device = torch.device(device)
    if backend == "inductor":
        if device.type != "cuda" or not torch.cuda.is_available():
            return False, "no CUDA GPU (inductor's fast kernels here are Triton GPU kernels)"
        if not torch_internals.has_triton():
            return False, "Triton is not installed or does not support this GPU"
        what = "torch.compile (inductor) of the repeated blocks, on-disk cache"
    else:
        what = f"torch.compile backend {backend!r} (traces the blocks, no generated kernels)"
    on, why = torch_internals.precompile_status()
    return True, f"{what}; precompiled blocks {'on' if on else 'off'} ({why})"


def _torch_compile(block: torch.nn.Module, cfg: CompileConfig) -> None:
    """The plain path: torch.compile of one block (its call goes through `_compiled_call_impl`)."""
    block.compile(backend=cfg.backend, mode=cfg.mode, fullgraph=cfg.fullgraph, dynamic=cfg.dynamic)


def _enable_disk_caches(stack: PatchStack) -> str:
    """Point inductor at our cache dir unless the user chose one, and turn its FX graph and AOTAutograd
    caches on (both default on; set so an env override does not silently cost a recompile per process)."""
    if chosen_cache_dir() is None:
        stack.undo_on_remove(set_env(CACHE_ENV, str(wanflow_inductor_dir())))
    for owner, flag in torch_internals.disk_cache_settings():
        stack.undo_on_remove(keep_setting(owner, flag))
        setattr(owner, flag, True)
    return os.environ[CACHE_ENV]


def _precompiles(cfg: CompileConfig) -> bool:
    """Whether the precompiled path applies to `cfg` in this torch."""
    if not cfg.precompiled or not isinstance(cfg.backend, str) or not cfg.fullgraph or cfg.dynamic:
        return False   # an artifact is one static whole graph of a backend named in its key
    on, why = torch_internals.precompile_status()
    if not on:
        warn_once("api", "compile: precompiled blocks off (%s); using torch.compile with the on-disk FX graph "
                  "cache", why)
    return on


class CompileHandle(PatchStack):
    """The applied compile patch; `warm_start` says how the compiled blocks were obtained so far."""

    def __init__(self, detail: str, precompiled: PrecompiledBlocks | None):
        super().__init__("compile", detail)
        self.precompiled = precompiled
        self._counts_at_apply = torch_internals.dynamo_counts()

    @property
    def warm_start(self) -> str:
        """How the blocks' compiled code came so far: "precompiled artifact loaded", "compiled cold (artifact
        saved)", "compiled cold (in memory)", "precompile failed" (then one of:) "torch.compile, FX cache hit",
        "torch.compile, cold"; joined by "; " when signatures differed; "nothing compiled yet" before the
        first call."""
        ways = []
        if self.precompiled is not None:
            events = self.precompiled.events
            ways += ["precompiled artifact loaded"] * bool(events["loaded"])
            ways += ["compiled cold (artifact saved)"] * bool(events["saved"])
            ways += ["compiled cold (in memory)"] * bool(events["compiled"])
            ways += ["precompile failed"] * bool(events["failed"])
        if self.precompiled is None or self.precompiled.fallen_back:
            (graphs, hits), (graphs0, hits0) = torch_internals.dynamo_counts(), self._counts_at_apply
            if hits > hits0:
                ways.append("torch.compile, FX cache hit")
            elif graphs > graphs0:
                ways.append("torch.compile, cold")
        return "; ".join(ways) or "nothing compiled yet"


def apply_compile(pipe, cfg: CompileConfig | None = None) -> CompileHandle:
    """Compile every block of `pipe.repeated_blocks()` (precompiled where possible, see the module
    docstring); `remove()` makes them eager again."""
    cfg = cfg or CompileConfig()
    blocks = list(pipe.repeated_blocks())
    if blocks and next(blocks[0].parameters()).device.type == "cuda":
        load_triton_kernels()  # before tracing: a trace does not import them, and its graph keeps what it saw
    undo = PatchStack("compile")
    cache_dir = None
    if cfg.backend == "inductor":
        cache_dir = _enable_disk_caches(undo)
        # Imported now rather than inside the first forward: start-up cost, paid once whatever the shape.
        torch_internals.import_inductor_runtime(next(blocks[0].parameters()).device if blocks else torch.device("cpu"))
    precompiled = None
    if _precompiles(cfg):
        precompiled = PrecompiledBlocks(cfg.backend, cfg.mode, precompiled_dir(), blocks,
                                        fall_back=lambda block: _torch_compile(block, cfg))
    try:
        for block in blocks:
            # nn.Module.__call__ runs `_compiled_call_impl` when set (nn.Module.compile stores torch.compile's
            # call there; the precompiled path its own): putting the previous value back is the exact inverse.
            undo.undo_on_remove(keep_attr(block, "_compiled_call_impl"))
            if precompiled is not None:
                precompiled.install(block)
            else:
                _torch_compile(block, cfg)
    except Exception:
        undo.remove()
        raise
    name = cfg.backend if isinstance(cfg.backend, str) else type(cfg.backend).__name__
    detail = (f"torch.compile({name}, mode={cfg.mode or 'default'}, fullgraph={cfg.fullgraph}, "
              f"dynamic={cfg.dynamic}) of {len(blocks)} blocks"
              + (f", precompiled artifacts in {precompiled.directory}" if precompiled and precompiled.directory
                 else "")
              + (f", cache {cache_dir}" if cache_dir else ""))
    handle = CompileHandle(detail, precompiled)
    handle.push(undo)
    log.info("compile: %s", detail)
    return handle


@torch.no_grad()
def warm_up(pipe, plan, ranks=None) -> float:
    """Run the engine's own step at the first step of each expert of `plan` (a `RunPlan`: its latent grid,
    CFG batching and experts), so compilation happens now, at the run's exact shapes. The inputs are
    zeros (the compiled code depends on shapes, not values). Returns the seconds spent. With `ranks`
    (`wan_engine.parallel.RankGroups`), this rank's share of a parallel job's step, at the shapes of its token
    slice: every rank of the job warms up together (`run_rank(warm_up=...)`).

    Experts not on the device (memory plan: swapped) are skipped when another one is: compiled code
    is shared by shape, so one warmed expert covers both."""
    on_device = {n for n, d in pipe.experts.items() if next(d.parameters()).device.type == pipe.device.type}
    starts = sorted(plan.steps.phase_starts)
    steps = [i for i in starts if plan.steps.experts[i] in on_device] or starts[:1]
    cfg = next(iter(pipe.experts.values())).config
    extra = cfg.in_dim - pipe.spec.z_dim
    y = torch.zeros(1, extra, *plan.grid.shape, device=pipe.device) if extra else None   # [1, C_y, f, h, w]
    context = torch.zeros(len(plan.branches), 1, cfg.text_dim, device=pipe.device, dtype=pipe.dtype)  # [B, 1, C]
    start = time.perf_counter()
    with pipe.running(plan):
        for i in steps:
            t0 = time.perf_counter()
            pipe.predict(plan, i, plan.noise[None], context, y, ranks)
            if pipe.device.type == "cuda":
                torch.cuda.synchronize(pipe.device)
            log.info("warm-up step of %s at %dx%d, %d frames, CFG %s: %.1f s", plan.steps.experts[i],
                     *plan.pixel_size, plan.frame_num, plan.cfg, time.perf_counter() - t0)
    return time.perf_counter() - start
