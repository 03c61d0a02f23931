"""Precompiled blocks: the compile patch's warm start (a loaded block in 0.2 s instead of a compile).

On the first call with a new input signature the blocks look for a precompiled artifact (a whole
compiled function, see `torch_internals`) under `$TORCHINDUCTOR_CACHE_DIR/wanflow-precompiled/`. A hit
skips everything a compile does (Dynamo tracing, guards, AOTAutograd, inductor, Triton); a miss compiles
from the actual call's arguments and saves the artifact (temporary file, then rename, so a concurrent
reader never sees half a file). The file name is a hash of everything the compiled code depends on:
torch version, device (CUDA capability or CPU), the block's parameters (names, shapes, dtypes), the call
signature (shapes, strides, dtypes, devices, grad mode), the compile settings, the attention backend
installed in the block, the block's Triton option, the precision switches, and the source of the
engine's block and kernel files and of the attention backend, so a code change compiles anew.

A file that does not load (corrupt, another torch or GPU, or its guards reject the call) is compiled
anew and replaced. Where compiling or saving fails, the failure is logged once and a `.failed` marker is
left under the artifact's name (so later processes do not pay a failing attempt again), and every
block falls back to the plain path. The blocks' compiled `forward` is called directly: forward hooks
registered on a block itself do not run.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from wan_engine.ulysses import SequenceShard

from . import torch_internals
from .attention import SEAM

log = logging.getLogger(__name__)

ARTIFACT_SUFFIX = ".aot"
_warned: set[str] = set()   # reasons already logged as warnings in this process


def warn_once(reason: str, message: str, *args) -> None:
    (log.warning if reason not in _warned else log.info)(message, *args)
    _warned.add(reason)


def _meta(value) -> object:
    """A hashable description of one call argument: what a static compiled graph is specialised on."""
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.stride(), value.dtype, value.device, value.requires_grad)
    if isinstance(value, (tuple, list)):
        return type(value), tuple(_meta(v) for v in value)
    if isinstance(value, SequenceShard):   # by what the compiled block reads, not the group object's identity
        return type(value), (value.group.group_name, value.rank, value.size, value.tokens)
    return type(value), value


def _source_files(block: torch.nn.Module, attention_fns: list[Callable]) -> list[Path]:
    """The files whose code a compiled block runs: the block's module, the engine's Triton kernels
    beside it, and the modules of the installed attention backends (SDPA is torch's: no file)."""
    engine = Path(inspect.getfile(type(block)))
    files = {engine, engine.with_name("triton_kernels.py")}
    for fn in attention_fns:
        try:
            files.add(Path(inspect.getfile(fn)))
        except TypeError:   # a builtin (torch's SDPA): covered by the torch version
            pass
    return sorted(f for f in files if f.is_file())


def artifact_name(block: torch.nn.Module, args: tuple, kwargs: dict, backend: str, mode: str | None,
                  attention_fns: list[Callable]) -> str:
    """The file name of the artifact for calling `block` with these arguments: a hash of what it depends on."""
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        device_tag = f"cuda-sm{major}{minor}"
    else:
        device_tag = device.type
    sources = hashlib.sha256()
    for path in _source_files(block, attention_fns):
        sources.update(path.name.encode() + path.read_bytes())
    facts = {
        "torch": torch.__version__,
        "device": device_tag,
        "block": f"{type(block).__module__}.{type(block).__qualname__}",
        "parameters": [(n, tuple(p.shape), str(p.dtype)) for n, p in block.named_parameters()]
        + [(n, tuple(b.shape), str(b.dtype)) for n, b in block.named_buffers()],
        "args": repr(_meta(args)),
        "kwargs": repr(sorted((k, _meta(v)) for k, v in kwargs.items())),
        "grad_mode": torch.is_grad_enabled(),
        "compile": [backend, mode],
        "attention": [f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"
                      for fn in attention_fns],
        # The block's option for the engine's hand-written kernels: tracing reads it, the saved guards don't.
        "triton": getattr(block, "triton", None),
        "precision": [torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                      torch.get_float32_matmul_precision(), torch.are_deterministic_algorithms_enabled(),
                      torch.get_num_threads()],
        "sources": sources.hexdigest(),
    }
    text = json.dumps(facts, sort_keys=True)
    log.debug("compile: artifact key %s", text)
    return f"{type(block).__name__}-{hashlib.sha256(text.encode()).hexdigest()[:32]}{ARTIFACT_SUFFIX}"


class PrecompiledBlocks:
    """The compiled functions every block shares, one per call signature, each loaded from or saved to
    `directory` (None: kept in memory). Installed as each block's `_compiled_call_impl`, which
    `nn.Module.__call__` runs. `fall_back(block)` puts one block on the plain path."""

    def __init__(self, backend: str, mode: str | None, directory: Path | None, blocks: list[torch.nn.Module],
                 fall_back: Callable[[torch.nn.Module], None]):
        self.backend, self.mode = backend, mode
        self.directory = directory
        self.blocks = blocks
        self.fns: dict[tuple, Callable] = {}
        # artifacts "loaded", "saved" (compiled here), "compiled" (kept in memory: no directory); "failed" tries
        self.events: Counter[str] = Counter()
        self.fallen_back = False
        self._fall_back_block = fall_back

    def install(self, block: torch.nn.Module) -> None:
        attention = [m for m in block.modules() if hasattr(m, SEAM)]
        param = next(block.parameters())

        def call(*args, **kwargs):
            # What may change between calls of one process; everything else is fixed while applied.
            # The parameter stands for the block's dtype and device (a pipe.to() moves all of them).
            key = (type(block), _meta(args), tuple((k, _meta(v)) for k, v in kwargs.items()),
                   torch.is_grad_enabled(), param.dtype, param.device, tuple(getattr(m, SEAM) for m in attention),
                   getattr(block, "triton", None))
            fn = self.fns.get(key)
            if fn is None:
                fn = self._obtain(block, args, kwargs, [getattr(m, SEAM) for m in attention])
                if fn is None:   # fell back to the plain path: the block's call is now that
                    return block._compiled_call_impl(*args, **kwargs)
                self.fns[key] = fn
            return fn(block, *args, **kwargs)

        vars(block)["_compiled_call_impl"] = call

    def _obtain(self, block, args: tuple, kwargs: dict, attention_fns: list[Callable]) -> Callable | None:
        """The compiled function for this call: loaded when an artifact exists, else compiled and saved.
        None when precompiling does not work here: every block then takes the plain path, and a marker
        file beside the artifact's name sends later processes there at once (a failed attempt can cost a
        whole compile, and a precompile neither reads nor fills the FX graph cache)."""
        path = failed = None
        if self.directory is not None:
            path = self.directory / artifact_name(block, args, kwargs, self.backend, self.mode, attention_fns)
            failed = path.with_suffix(".failed")
            if failed.is_file():
                self._fall_back(f"it failed here before: {failed.read_text(errors='replace').strip()}")
                return None
            fn = self._load(path, block, args, kwargs) if path.is_file() else None
            if fn is not None:
                return fn
        started = time.perf_counter()
        try:
            fn = torch_internals.aot_compile(type(block).forward, (block, *args), kwargs, self.backend, self.mode)
            if path is not None:
                self._save(fn, path)
        except Exception as exc:   # an API this torch lacks, a backend or graph it cannot serialise
            self.events["failed"] += 1
            why = f"{type(exc).__name__}: {exc}"
            if failed is not None:
                with contextlib.suppress(OSError):
                    failed.parent.mkdir(parents=True, exist_ok=True)
                    failed.write_text(f"torch {torch.__version__}: {why}\n")
            self._fall_back(why)
            return None
        self.events["saved" if path is not None else "compiled"] += 1
        log.info("compile: compiled %s for inputs %s in %.1f s%s", type(block).__name__,
                 [list(a.shape) for a in args if isinstance(a, torch.Tensor)], time.perf_counter() - started,
                 f", saved {path}" if path is not None else "")
        torch_internals.skip_guards(fn)   # as after a load (see _load)
        return fn

    def _load(self, path: Path, block, args: tuple, kwargs: dict) -> Callable | None:
        started = time.perf_counter()
        try:
            fn = torch_internals.load_compiled(path)
            # The guards that torch kept in the artifact (tensor metadata, grad mode, TF32 and the
            # other global torch state) are checked once, on this first call: they catch whatever the
            # file name does not hash. Then they are switched off: a failing guard in a loaded function
            # raises rather than recompiling, so checking on every call would turn a change into an
            # error mid-run, while `call` already dispatches on all that can change between calls
            # (input metadata, grad mode, dtype and device, attention backend, Triton option), and every
            # block call would bind its arguments in Python once more for nothing.
            if not torch_internals.guards_accept(fn, block, *args, **kwargs):
                raise RuntimeError("its guards reject this call")
        except Exception as exc:   # corrupt, from another torch or GPU, or stale
            warn_once(f"load {path}", "compile: cannot use the precompiled %s (%s: %s); compiling it anew",
                      path.name, type(exc).__name__, exc)
            return None
        torch_internals.skip_guards(fn)
        self.events["loaded"] += 1
        log.info("compile: loaded precompiled %s from %s in %.2f s", type(block).__name__, path,
                 time.perf_counter() - started)
        return fn

    @staticmethod
    def _save(fn, path: Path) -> None:
        """Write the artifact to a temporary file, then rename it over `path`: readers see old or new."""
        temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch_internals.save_compiled(fn, temp)
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)

    def _fall_back(self, why: str) -> None:
        warn_once("fallback", "compile: precompiled blocks unavailable (%s); using torch.compile with the "
                  "on-disk FX graph cache instead", why)
        self.fallen_back = True
        for block in self.blocks:
            self._fall_back_block(block)
