"""LoRA adapter files for the Wan2.2 DiT: read them as users download them, check them against a model.

Three key layouts are read and put into our (official) module names:
- official / lightx2v / Wan2.2-Lightning: `diffusion_model.blocks.N.self_attn.q.lora_down.weight`,
  `.lora_up.weight`, `.alpha`, plus `.diff` (a full weight delta) and `.diff_b` (a bias delta);
- diffusers / PEFT: `transformer.blocks.N.attn1.to_q.lora_A.weight` / `.lora_B.weight` (`.lora_B.bias`: a
  bias delta), with the diffusers module names (`attn1`, `ffn.net.0.proj`, `condition_embedder...`);
- the ComfyUI spellings: the prefixes `diffusion_model.`, `model.diffusion_model.`, `lora_unet_` (module
  names joined by underscores, kohya style) and `base_model.model.`.

A file becomes a `LoraFile`: per target parameter of the DiT (`blocks.0.self_attn.q.weight`, ...) one
`LoraDelta` (a low-rank pair and its alpha, or a full delta). `check_lora` compares every delta with a DiT's
parameters and raises one `LoraError` listing every key that matches no parameter or does not fit its shape,
so nothing is applied from a file that is wrong anywhere. Applying is a patch (patches/lora.py).

`lora_files()` is the process's cache of parsed files (`LoraFileCache`): keyed by path, size and modification
time, least recently used dropped past a byte budget, so switching back to a recent LoRA reads nothing (and
hashes nothing). With CUDA its tensors wait in pinned host memory, from which they reach a GPU without a stall.

Merge rule (the official one): W' = W + strength * ((alpha / rank) * up @ down + diff), b' = b + strength * diff_b;
without alpha the scale is 1 (PEFT's default of alpha = rank).
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

EXPERT_CHOICES = ("both", "high", "low")
MAX_STRENGTH = 2.0
CACHE_BYTES = 16 << 30   # parsed LoRA files kept in host memory (a rank-64 A14B pair is ~1.2 GB)

# Prefixes of the files in the wild; the first that matches is removed.
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.transformer.", "base_model.model.",
             "transformer.", "lora_unet_")
# Suffix -> what the tensor is.
_KINDS = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_A.weight", "down"),
    (".lora_B.weight", "up"), (".lora_B.bias", "diff_b"), (".alpha", "alpha"), (".diff_b", "diff_b"),
    (".diff", "diff"),
)
# diffusers module names -> ours (applied in order on the name without prefix and suffix)
_DIFFUSERS_NAMES = (
    (r"^condition_embedder\.text_embedder\.linear_1$", "text_embedding.0"),
    (r"^condition_embedder\.text_embedder\.linear_2$", "text_embedding.2"),
    (r"^condition_embedder\.time_embedder\.linear_1$", "time_embedding.0"),
    (r"^condition_embedder\.time_embedder\.linear_2$", "time_embedding.2"),
    (r"^condition_embedder\.time_proj$", "time_projection.1"),
    (r"^proj_out$", "head.head"),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^blocks\.(\d+)\.attn1\.to_out\.0$", r"blocks.\1.self_attn.o"),
    (r"^blocks\.(\d+)\.attn2\.to_out\.0$", r"blocks.\1.cross_attn.o"),
    (r"^blocks\.(\d+)\.attn1\.to_([qkv])$", r"blocks.\1.self_attn.\2"),
    (r"^blocks\.(\d+)\.attn2\.to_([qkv])$", r"blocks.\1.cross_attn.\2"),
    (r"^blocks\.(\d+)\.attn1\.norm_([qk])$", r"blocks.\1.self_attn.norm_\2"),
    (r"^blocks\.(\d+)\.attn2\.norm_([qk])$", r"blocks.\1.cross_attn.norm_\2"),
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj$", r"blocks.\1.ffn.0"),
    (r"^blocks\.(\d+)\.ffn\.net\.2$", r"blocks.\1.ffn.2"),
    (r"^blocks\.(\d+)\.norm2$", r"blocks.\1.norm3"),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
)
# kohya / ComfyUI `lora_unet_` names: our module names with every dot an underscore
_KOHYA_NAMES = (
    (r"^blocks_(\d+)_(self_attn|cross_attn)_(q|k|v|o|norm_q|norm_k)$", r"blocks.\1.\2.\3"),
    (r"^blocks_(\d+)_ffn_(\d)$", r"blocks.\1.ffn.\2"),
    (r"^blocks_(\d+)_(norm3|modulation)$", r"blocks.\1.\2"),
    (r"^(text_embedding|time_embedding|time_projection)_(\d)$", r"\1.\2"),
    (r"^head_(head|modulation)$", r"head.\1"),
)


class LoraError(ValueError):
    """A LoRA file is unreadable, holds keys we do not support, or does not fit the model."""


@dataclass(frozen=True)
class LoraChoice:
    """One LoRA of a run: its file, its strength (0-2) and the experts it applies to (high, low or both)."""

    path: str
    strength: float = 1.0
    expert: str = "both"

    def __post_init__(self):
        if not 0 <= self.strength <= MAX_STRENGTH:
            raise LoraError(f"LoRA strength must be between 0 and {MAX_STRENGTH}, got {self.strength} ({self.path})")
        if self.expert not in EXPERT_CHOICES:
            raise LoraError(f"LoRA expert must be one of {EXPERT_CHOICES}, got {self.expert!r} ({self.path})")


def to_device(t: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """`t` on `device` in `dtype`: moved first (non-blocking: from the cache's pinned copies nothing waits for the
    device), converted there (a CPU->GPU copy that changes dtype converts on the CPU, into pageable memory)."""
    return t.to(device, non_blocking=True).to(dtype)


@dataclass(frozen=True)
class LoraDelta:
    """The change one file makes to one module of the DiT (our module name, e.g. `blocks.0.self_attn.q`)."""

    module: str
    down: Tensor | None = None      # [r, in] (a Conv3d: [r, in, kt, kh, kw])
    up: Tensor | None = None        # [out, r] (a Conv3d: [out, r, 1, 1, 1])
    alpha: float | None = None
    diff: Tensor | None = None      # like the weight
    diff_b: Tensor | None = None    # like the bias
    keys: tuple[str, ...] = ()      # the file's keys, for messages

    @property
    def rank(self) -> int | None:
        return None if self.down is None else self.down.shape[0]

    @property
    def scale(self) -> float:
        """alpha / rank (the official merge), 1 without alpha."""
        return 1.0 if self.alpha is None or self.down is None else self.alpha / self.rank

    def weight_delta(self, shape: torch.Size, device: torch.device, strength: float = 1.0) -> Tensor | None:
        """strength * ((alpha / rank) * up @ down + diff) in float32, shaped like the weight; None if no change."""
        delta = None
        if self.down is not None:
            # strength and scale go into the small factor: one pass over the weight-sized result, not three
            up = to_device(self.up, device, torch.float32).flatten(1)        # [out, r]
            down = to_device(self.down, device, torch.float32).flatten(1)    # [r, in * k]
            delta = ((strength * self.scale) * up @ down).reshape(shape)
        if self.diff is not None:
            diff = to_device(self.diff, device, torch.float32)
            delta = strength * diff if delta is None else delta.add_(diff, alpha=strength)
        return delta

    def bias_delta(self, device: torch.device, strength: float = 1.0) -> Tensor | None:
        return None if self.diff_b is None else strength * to_device(self.diff_b, device, torch.float32)


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file read and renamed: one `LoraDelta` per module it changes."""

    path: Path
    sha256: str
    layout: str                      # "official", "diffusers" or "kohya"
    deltas: dict[str, LoraDelta] = field(repr=False)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def rank(self) -> int | None:
        ranks = {d.rank for d in self.deltas.values() if d.rank is not None}
        return max(ranks) if ranks else None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in self.deltas.values()
                   for t in (d.down, d.up, d.diff, d.diff_b) if t is not None)

    def pinned(self) -> LoraFile:
        """The same file with its tensors in pinned host memory."""
        def pin(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.pin_memory()
        return dataclasses.replace(self, deltas={m: dataclasses.replace(d, down=pin(d.down), up=pin(d.up),
                                                                         diff=pin(d.diff), diff_b=pin(d.diff_b))
                                                 for m, d in self.deltas.items()})


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _split_key(key: str) -> tuple[str, str, str] | None:
    """(layout, our module name, kind) of one key; None if its kind is not one we read."""
    name, layout = key, "official"
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            layout = "kohya" if prefix == "lora_unet_" else "diffusers" if "transformer" in prefix else layout
            break
    kind = next(((suffix, k) for suffix, k in _KINDS if name.endswith(suffix)), None)
    if kind is None:
        return None
    name = name[:-len(kind[0])]
    if layout == "kohya":
        for pattern, repl in _KOHYA_NAMES:
            name, n = re.subn(pattern, repl, name)
            if n:
                break
    for pattern, repl in _DIFFUSERS_NAMES:
        name, n = re.subn(pattern, repl, name)
        if n:
            layout = "diffusers" if layout == "official" else layout
            break
    if kind[0].startswith((".lora_A", ".lora_B")) and layout == "official":
        layout = "diffusers"
    return layout, name, kind[1]


def lora_from_state_dict(tensors: Mapping[str, Tensor], path: Path, sha256: str = "") -> LoraFile:
    """Group a LoRA state dict by module; raises LoraError listing the keys of kinds we do not support
    (LoCon mid weights, LoHa, LoKr, ...) and incomplete down/up pairs."""
    parts: dict[str, dict[str, tuple[str, Tensor]]] = {}
    unsupported, layouts = [], set()
    for key, tensor in tensors.items():
        split = _split_key(key)
        if split is None:
            unsupported.append(key)
            continue
        layout, module, kind = split
        layouts.add(layout)
        parts.setdefault(module, {})[kind] = (key, tensor)
    if unsupported:
        raise LoraError(_listing(path, "holds keys of a kind we do not support (we read lora_down/lora_up/alpha, "
                                       "lora_A/lora_B, diff, diff_b)", unsupported))
    if not parts:
        raise LoraError(f"LoRA file {path} holds no tensors")
    incomplete = [key for p in parts.values() if ("down" in p) != ("up" in p)
                  for key, _ in p.values()]
    if incomplete:
        raise LoraError(_listing(path, "has a lora down without its up (or the reverse)", incomplete))
    deltas = {}
    for module, p in parts.items():
        alpha = p.get("alpha", (None, None))[1]
        deltas[module] = LoraDelta(
            module, down=p.get("down", (None, None))[1], up=p.get("up", (None, None))[1],
            alpha=None if alpha is None else float(alpha.float().item()), diff=p.get("diff", (None, None))[1],
            diff_b=p.get("diff_b", (None, None))[1], keys=tuple(sorted(k for k, _ in p.values())))
    layout = "kohya" if "kohya" in layouts else "diffusers" if "diffusers" in layouts else "official"
    return LoraFile(path, sha256, layout, deltas)


def _open_lora(path: Path, read: Callable[[Any], dict[str, Tensor]]) -> dict[str, Tensor]:
    """`read(f)` over the open safetensors file at `path`, with one LoraError for each way the file can fail."""
    if not path.is_file():
        raise LoraError(f"LoRA file {path} does not exist")
    if path.suffix != ".safetensors":
        raise LoraError(f"LoRA file {path}: only .safetensors files are read")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return read(f)
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoraError(f"unreadable LoRA file {path}: {exc}") from exc


def scan_lora(path: str | Path) -> int:
    """Check a LoRA file from its header alone (readable, only key kinds we read, complete down/up pairs), reading
    no tensor: what a request is checked with before any GPU work. Returns the number of modules it changes."""
    path = Path(path)
    keys = _open_lora(path, lambda f: dict.fromkeys(f.keys(), torch.zeros(())))
    return len(lora_from_state_dict(keys, path).deltas)


def read_lora(path: str | Path) -> LoraFile:
    """Read a LoRA .safetensors file (every tensor, on the CPU) into our module names."""
    path = Path(path)
    tensors = _open_lora(path, lambda f: {key: f.get_tensor(key) for key in f.keys()})
    return lora_from_state_dict(tensors, path, file_sha256(path))


class LoraFileCache:
    """Parsed LoRA files by (path, size, mtime), most recently used last, at most `max_bytes` of tensors (the
    file just read is kept even alone above it). `pin`: keep the tensors in pinned host memory (default: when
    CUDA is available). `reads` counts the files read from disk."""

    def __init__(self, max_bytes: int = CACHE_BYTES, pin: bool | None = None):
        self.max_bytes = max_bytes
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.reads = 0
        self._files: OrderedDict[tuple[str, int, int], LoraFile] = OrderedDict()
        self._lock = threading.Lock()

    def read(self, path: str | Path) -> LoraFile:
        path = Path(path)
        try:
            st = path.stat()
        except OSError:
            st = None
        if st is None or not path.is_file():
            raise LoraError(f"LoRA file {path} does not exist")
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            if key in self._files:
                self._files.move_to_end(key)
                return self._files[key]
        lora = read_lora(path)
        if self.pin:
            lora = lora.pinned()
        with self._lock:
            self.reads += 1
            for old in [k for k in self._files if k[0] == key[0]]:   # an older version of the same file
                del self._files[old]
            self._files[key] = lora
            while len(self._files) > 1 and self.nbytes > self.max_bytes:
                self._files.popitem(last=False)
        return lora

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self._files.values())


@lru_cache(maxsize=1)
def lora_files() -> LoraFileCache:
    """This process's cache of parsed LoRA files."""
    return LoraFileCache()


def _listing(path: Path | str, problem: str, keys: list[str], show: int = 8) -> str:
    shown = ", ".join(keys[:show]) + (f" (and {len(keys) - show} more)" if len(keys) > show else "")
    return f"LoRA file {path} {problem}: {len(keys)} key(s): {shown}"


def check_lora(lora: LoraFile, dit: nn.Module, expert: str = "model") -> None:
    """Raise LoraError listing every key of `lora` that matches no parameter of `dit` or whose shape does not
    fit (a LoRA made for another model size), before anything is applied."""
    params = dict(dit.named_parameters())
    unmatched, misfit = [], []
    for module, d in lora.deltas.items():
        weight, bias = (params[module], None) if module in params else (params.get(f"{module}.weight"),
                                                                         params.get(f"{module}.bias"))
        if weight is None:
            unmatched.extend(d.keys)
            continue
        shape = tuple(weight.shape)
        fits = True
        if d.down is not None:
            r = d.down.shape[0]
            fits = (d.down.dim() == len(shape) and tuple(d.down.shape[1:]) == shape[1:]
                    and d.up.dim() == len(shape) and tuple(d.up.shape[:2]) == (shape[0], r)
                    and all(s == 1 for s in d.up.shape[2:]))
        if d.diff is not None and tuple(d.diff.shape) != shape:
            fits = False
        if d.diff_b is not None and (bias is None or tuple(d.diff_b.shape) != tuple(bias.shape)):
            fits = False
        if d.alpha is not None and d.down is None:
            fits = False
        if not fits:
            shapes = ", ".join(f"{_split_key(k)[2]} {_key_shape(d, k)}" for k in d.keys)
            misfit.append(f"{module} (file: {shapes}; model weight {shape})")
    problems = []
    if unmatched:
        problems.append(_listing(lora.path, f"has keys that match no module of the {expert} DiT", sorted(unmatched)))
    if misfit:
        problems.append(_listing(lora.path, f"does not fit the {expert} DiT (a LoRA for another model size?)",
                                 sorted(misfit), show=4).replace("key(s)", "module(s)"))
    if problems:
        raise LoraError("; ".join(problems))


def _key_shape(d: LoraDelta, key: str) -> tuple[int, ...]:
    kind = _split_key(key)[2]
    tensor = {"down": d.down, "up": d.up, "diff": d.diff, "diff_b": d.diff_b}.get(kind)
    return () if tensor is None else tuple(tensor.shape)
