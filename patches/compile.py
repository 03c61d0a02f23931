"""Compile patch: the DiT's repeated transformer blocks compiled once per shape, and kept on disk.

The blocks share one code path and, at a fixed shape, one graph, so one compiled function serves every
block of both experts: it takes the block as its first argument (the module's parameters are inputs of
the graph, not constants). Shapes are static: one graph per video size, which is what a run uses. The
step-cache hooks run outside the blocks, so their data-dependent decisions never enter compiled code.

Warm start. On the first call with a new input signature the patch looks for a precompiled artifact
(torch's experimental `torch.compile(...).aot_compile`, saved with `save_compiled_function` and read
back with `torch.compiler.load_compiled_function`) under `$TORCHINDUCTOR_CACHE_DIR/wanflow-precompiled/`
(set by the patch for inductor; a trace-only backend without it keeps its compiled blocks in memory).
A hit skips everything a compile does (Dynamo tracing, guards, AOTAutograd, inductor, Triton); a miss
compiles from the actual call's arguments and saves the artifact (temporary file, then rename, so a
concurrent reader never sees half a file). The file name is a hash of everything the compiled code
depends on: torch version, device (CUDA capability or CPU), the block's parameters (names, shapes,
dtypes), the call signature (shapes, strides, dtypes, devices, grad mode), the compile settings, the
attention backend installed in the block, the block's Triton option, the precision switches, and the source of the
engine's block and kernel files and of the attention backend, so a code change compiles anew.

A file that does not load (corrupt, another torch or GPU, or its guards reject the call) is compiled
anew and replaced. Where torch lacks the API, or compiling or saving fails, the patch logs it once,
leaves a `.failed` marker under the artifact's name (so later processes do not pay a failing attempt
again) and falls back to `nn.Module.compile` on each block, which re-traces in every process but keeps
inductor's FX graph and AOTAutograd caches on disk. Custom (callable) backends, `dynamic=True` and
`fullgraph=False` always take that path; `precompiled=False` asks for it. The precompiled path calls
the block's compiled `forward` directly: forward hooks registered on a block itself do not run.
With inductor, the modules its generated code imports are imported when the patch is applied.

Inductor's caches go under `TORCHINDUCTOR_CACHE_DIR`: a user's own value wins; otherwise
`$WAN_CACHE_DIR/inductor` or `~/.cache/wanflow/inductor`. `remove()` puts every block's
`_compiled_call_impl` back, so the blocks run eager again, bit-identical.

`warm_up(pipe, plan)` runs the engine's own step once per expert of a run's plan, so the compile (or
the artifact load) happens before the run's timed steps (the flow's warm-up-compile task).
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
from dataclasses import dataclass
from pathlib import Path

import torch

from .attention import SEAM
from .base import PatchStack, keep_attr, keep_setting, set_env

log = logging.getLogger(__name__)

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
PRECOMPILED_DIR = "wanflow-precompiled"
ARTIFACT_SUFFIX = ".aot"
_warned: set[str] = set()   # fallback reasons already logged as warnings in this process


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
    torch._dynamo writes that default, /tmp/torchinductor_<user>, into the environment)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    root = os.environ.get(CACHE_ENV)
    return root if root and os.path.abspath(root) != os.path.abspath(default_cache_dir()) else None


def precompiled_dir() -> Path | None:
    """Where precompiled blocks are saved: beside inductor's own caches, in the chosen
    `TORCHINDUCTOR_CACHE_DIR` (applying the patch with inductor chooses one). None without: a trace-only
    backend then keeps its compiled blocks in memory, as it keeps nothing on disk under torch.compile."""
    root = chosen_cache_dir()
    return Path(root) / PRECOMPILED_DIR if root else None


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

    if chosen_cache_dir() is None:
        stack.undo_on_remove(set_env(CACHE_ENV, str(wanflow_inductor_dir())))
    stack.undo_on_remove(keep_setting(inductor_config, "fx_graph_cache"))
    stack.undo_on_remove(keep_setting(functorch_config, "enable_autograd_cache"))
    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    return os.environ[CACHE_ENV]


def _warn_once(reason: str, message: str, *args) -> None:
    (log.warning if reason not in _warned else log.info)(message, *args)
    _warned.add(reason)


# ---------------------------------------------------------------- what an artifact depends on
def _meta(value) -> object:
    """A hashable description of one call argument: what a static compiled graph is specialised on."""
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.stride(), value.dtype, value.device, value.requires_grad)
    if isinstance(value, (tuple, list)):
        return type(value), tuple(_meta(v) for v in value)
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


def _artifact_name(block: torch.nn.Module, args: tuple, kwargs: dict, cfg: CompileConfig,
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
        "compile": [cfg.backend, cfg.mode],
        "attention": [f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"
                      for fn in attention_fns],
        # The block's option for the engine's hand-written kernels: tracing reads it, so it is in the key.
        "triton": getattr(block, "triton", None),
        "precision": [torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                      torch.get_float32_matmul_precision(), torch.are_deterministic_algorithms_enabled(),
                      torch.get_num_threads()],
        "sources": sources.hexdigest(),
    }
    text = json.dumps(facts, sort_keys=True)
    log.debug("compile: artifact key %s", text)
    return f"{type(block).__name__}-{hashlib.sha256(text.encode()).hexdigest()[:32]}{ARTIFACT_SUFFIX}"


# ---------------------------------------------------------------- the precompiled blocks
class _Precompiled:
    """The compiled functions every block shares, one per call signature, each loaded from or saved to
    `directory`. Installed as each block's `_compiled_call_impl`, which `nn.Module.__call__` runs."""

    def __init__(self, cfg: CompileConfig, directory: Path | None, blocks: list[torch.nn.Module]):
        self.cfg = cfg
        self.directory = directory
        self.blocks = blocks
        self.fns: dict[tuple, Callable] = {}
        # artifacts "loaded", "saved" (compiled here), "compiled" (kept in memory: no directory); "failed" tries
        self.events: Counter[str] = Counter()
        self.fallen_back = False

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
                if fn is None:   # fell back to torch.compile: the block's call is now that
                    return block._compiled_call_impl(*args, **kwargs)
                self.fns[key] = fn
            return fn(block, *args, **kwargs)

        vars(block)["_compiled_call_impl"] = call

    def _obtain(self, block, args: tuple, kwargs: dict, attention_fns: list[Callable]) -> Callable | None:
        """The compiled function for this call: loaded when an artifact exists, else compiled and saved.
        None when precompiling does not work here: every block then takes torch.compile's path, and a
        marker file beside the artifact's name sends later processes there at once (a failed attempt
        can cost a whole compile, and an aot_compile neither reads nor fills the FX graph cache)."""
        path = failed = None
        if self.directory is not None:
            path = self.directory / _artifact_name(block, args, kwargs, self.cfg, attention_fns)
            failed = path.with_suffix(".failed")
            if failed.is_file():
                self._fall_back(f"it failed here before: {failed.read_text(errors='replace').strip()}")
                return None
            fn = self._load(path, block, args, kwargs) if path.is_file() else None
            if fn is not None:
                return fn
        started = time.perf_counter()
        try:
            # The flag must be on when torch.compile wraps the function: that is when releases which
            # gate the API (torch 2.11) attach `aot_compile` to the wrapper.
            with _aot_compile_enabled():
                compiled = torch.compile(type(block).forward, backend=self.cfg.backend, mode=self.cfg.mode,
                                         fullgraph=True, dynamic=False)
                fn = compiled.aot_compile(((block, *args), kwargs))
            if path is not None:
                self._save(fn, path)
        except Exception as exc:   # no aot_compile in this torch, a backend or graph it cannot serialise
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
        # Guards off, for the same reason as after a load (see _load).
        fn.disable_guard_check()
        return fn

    def _load(self, path: Path, block, args: tuple, kwargs: dict) -> Callable | None:
        started = time.perf_counter()
        try:
            with path.open("rb") as f, _aot_compile_enabled():
                fn = torch.compiler.load_compiled_function(f)
            # The guards that torch kept in the artifact (tensor metadata, grad mode, TF32 and the
            # other global torch state) are checked once, on this first call: they catch whatever the
            # file name does not hash. Then they are switched off: a failing guard in a loaded function
            # raises rather than recompiling, so checking on every call would turn a change into an
            # error mid-run, while `call` already dispatches on all that can change between calls
            # (input metadata, grad mode, dtype and device, attention backend), and every block
            # call would bind its arguments in Python once more for nothing.
            if not fn.guard_check(block, *args, **kwargs):
                raise RuntimeError("its guards reject this call")
        except Exception as exc:   # corrupt, from another torch or GPU, or stale
            _warn_once(f"load {path}", "compile: cannot use the precompiled %s (%s: %s); compiling it anew",
                       path.name, type(exc).__name__, exc)
            return None
        fn.disable_guard_check()
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
            fn.save_compiled_function(str(temp))
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)

    def _fall_back(self, why: str) -> None:
        _warn_once("fallback", "compile: precompiled blocks unavailable (%s); using torch.compile with the "
                   "on-disk FX graph cache instead", why)
        self.fallen_back = True
        for block in self.blocks:
            _torch_compile(block, self.cfg)


def _aot_compile_enabled() -> contextlib.AbstractContextManager:
    """torch releases from before the API was public gate `aot_compile` behind a Dynamo config flag."""
    import torch._dynamo.config as dynamo_config

    if hasattr(dynamo_config, "enable_aot_compile"):
        return dynamo_config.patch(enable_aot_compile=True)
    return contextlib.nullcontext()


def _import_inductor(device: torch.device) -> None:
    """Import the modules inductor's generated code imports, at apply rather than inside the first
    forward: process start-up, paid once whatever the shape, like importing torch itself."""
    import torch._inductor.async_compile  # noqa: F401
    import torch._inductor.select_algorithm  # noqa: F401

    if device.type == "cuda":
        import torch._inductor.runtime.triton_heuristics  # noqa: F401


def _torch_compile(block: torch.nn.Module, cfg: CompileConfig) -> None:
    block.compile(backend=cfg.backend, mode=cfg.mode, fullgraph=cfg.fullgraph, dynamic=cfg.dynamic)


def _dynamo_counts() -> tuple[int, int]:
    """(graphs Dynamo compiled, FX graph / AOTAutograd cache hits) so far in this process."""
    from torch._dynamo.utils import counters

    hits = counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]
    return counters["stats"]["unique_graphs"], hits


class CompileHandle(PatchStack):
    """The applied compile patch; `warm_start` says how the compiled blocks were obtained so far."""

    def __init__(self, detail: str, precompiled: _Precompiled | None):
        super().__init__("compile", detail)
        self.precompiled = precompiled
        self._counts_at_apply = _dynamo_counts()

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
            (graphs, hits), (graphs0, hits0) = _dynamo_counts(), self._counts_at_apply
            if hits > hits0:
                ways.append("torch.compile, FX cache hit")
            elif graphs > graphs0:
                ways.append("torch.compile, cold")
        return "; ".join(ways) or "nothing compiled yet"


def _precompiles(cfg: CompileConfig) -> bool:
    """Whether the precompiled path applies to `cfg` in this torch."""
    if not cfg.precompiled or not isinstance(cfg.backend, str) or not cfg.fullgraph or cfg.dynamic:
        return False   # an artifact is one static whole graph of a backend named in its key
    if not hasattr(torch.compiler, "load_compiled_function"):
        _warn_once("api", "compile: torch %s cannot save compiled functions; using torch.compile with the "
                   "on-disk FX graph cache", torch.__version__)
        return False
    return True


def apply_compile(pipe, cfg: CompileConfig | None = None) -> CompileHandle:
    """Compile every block of `pipe.repeated_blocks()` (precompiled where possible, see the module
    docstring); `remove()` makes them eager again."""
    cfg = cfg or CompileConfig()
    blocks = list(pipe.repeated_blocks())
    undo = PatchStack("compile")
    cache_dir = None
    if cfg.backend == "inductor":
        cache_dir = _enable_disk_caches(undo)
        _import_inductor(next(blocks[0].parameters()).device if blocks else torch.device("cpu"))
    precompiled = _Precompiled(cfg, precompiled_dir(), blocks) if _precompiles(cfg) else None
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
def warm_up(pipe, plan) -> float:
    """Run the engine's own step at the first step of each expert of `plan` (a `RunPlan`: its latent grid,
    CFG batching and experts), so compilation happens now, at the run's exact shapes. The inputs are
    zeros (the compiled code depends on shapes, not values). Returns the seconds spent.

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
            pipe.predict(plan, i, plan.noise[None], context, y)
            if pipe.device.type == "cuda":
                torch.cuda.synchronize(pipe.device)
            log.info("warm-up step of %s at %dx%d, %d frames, CFG %s: %.1f s", plan.steps.experts[i],
                     *plan.pixel_size, plan.frame_num, plan.cfg, time.perf_counter() - t0)
    return time.perf_counter() - start
