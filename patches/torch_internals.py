"""The private and experimental torch APIs the compile patch uses, in one place, and the torch releases
they were checked against.

Precompiled blocks rest on torch's experimental whole-function compile (`torch.compile(...).aot_compile`,
`save_compiled_function`, `torch.compiler.load_compiled_function`, the compiled function's guard
switches): it moved between releases (2.11 gates it behind a Dynamo flag, 2.13 does not) and may change
again. So the precompiled path runs only on the releases in `KNOWN_TORCH`; any other one turns it off
with a reason (`precompile_status`, shown by `wanflow patches`) and the compile patch keeps its plain
path (torch.compile of each block with inductor's on-disk caches). The rest (inductor's cache settings
and default folder, the modules its generated code imports, Dynamo's counters, the Triton probe) is
private too but has been stable for longer: it is here so that a torch upgrade is checked in one file.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

# (major, minor) releases whose precompile API the compile patch was run against: 2.11 on the GPU
# machine (H200), 2.13 on the development machine.
KNOWN_TORCH = ((2, 11), (2, 13))


def torch_release(version: str | None = None) -> tuple[int, int]:
    """(major, minor) of `version` (default: the running torch), e.g. "2.11.0+cu128" -> (2, 11)."""
    major, minor = (version or torch.__version__).split("+")[0].split(".")[:2]
    return int(major), int(minor)


def precompile_status(version: str | None = None) -> tuple[bool, str]:
    """Whether this torch can precompile blocks (save and load whole compiled functions), and why (not)."""
    version = version or torch.__version__
    known = ", ".join(f"{a}.{b}" for a, b in KNOWN_TORCH)
    if torch_release(version) not in KNOWN_TORCH:
        return False, f"torch {version} is not a release its experimental API was checked on ({known})"
    if not hasattr(torch.compiler, "load_compiled_function"):
        return False, f"torch {version} cannot save compiled functions"
    return True, f"torch {version}"


# ---------------------------------------------------------------- whole compiled functions (experimental)
def _aot_compile_enabled() -> contextlib.AbstractContextManager:
    """torch 2.11 gates `aot_compile` behind a Dynamo config flag; 2.13 has no flag."""
    import torch._dynamo.config as dynamo_config

    if hasattr(dynamo_config, "enable_aot_compile"):
        return dynamo_config.patch(enable_aot_compile=True)
    return contextlib.nullcontext()


def aot_compile(fn: Callable, args: tuple, kwargs: dict, backend: str, mode: str | None) -> Callable:
    """`fn` compiled whole (fullgraph, static shapes) for these arguments, now rather than at the first call.
    The flag must be on when torch.compile wraps `fn`: that is when 2.11 attaches `aot_compile`."""
    with _aot_compile_enabled():
        compiled = torch.compile(fn, backend=backend, mode=mode, fullgraph=True, dynamic=False)
        return compiled.aot_compile((args, kwargs))


def load_compiled(path) -> Callable:
    with open(path, "rb") as f, _aot_compile_enabled():
        return torch.compiler.load_compiled_function(f)


def save_compiled(fn: Callable, path) -> None:
    fn.save_compiled_function(str(path))


def guards_accept(fn: Callable, *args, **kwargs) -> bool:
    """Whether the guards saved with `fn` accept this call."""
    return fn.guard_check(*args, **kwargs)


def skip_guards(fn: Callable) -> None:
    """Stop checking `fn`'s guards on every call (a failing guard would raise, not recompile)."""
    fn.disable_guard_check()


# ---------------------------------------------------------------- inductor and Dynamo
def default_cache_dir() -> str:
    """inductor's own cache folder (/tmp/torchinductor_<user>), which importing Dynamo writes into the
    environment when none is set."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir as torch_default

    return torch_default()


def disk_cache_settings() -> list[tuple[object, str]]:
    """(config module, flag) of inductor's FX graph cache and AOTAutograd's cache."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    return [(inductor_config, "fx_graph_cache"), (functorch_config, "enable_autograd_cache")]


def import_inductor_runtime(device: torch.device) -> None:
    """Import the modules inductor's generated code imports."""
    import torch._inductor.async_compile  # noqa: F401
    import torch._inductor.select_algorithm  # noqa: F401

    if device.type == "cuda":
        import torch._inductor.runtime.triton_heuristics  # noqa: F401


def dynamo_counts() -> tuple[int, int]:
    """(graphs Dynamo compiled, FX graph / AOTAutograd cache hits) so far in this process."""
    from torch._dynamo.utils import counters

    hits = counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]
    return counters["stats"]["unique_graphs"], hits


def has_triton() -> bool:
    """Whether Triton is installed and supports the GPU (inductor's GPU kernels are Triton)."""
    from torch.utils._triton import has_triton as torch_has_triton

    return torch_has_triton()
