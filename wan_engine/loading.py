"""Loading official Wan2.2 checkpoint folders: validate first, then build on meta and assign.

Every file a model needs is checked before any tensor is read or any GPU memory is
touched: present, not truncated (a safetensors header promises a data size; a .pth is a
zip whose central directory sits at the end) and holding the tensor names and shapes the
network expects. A problem raises `CheckpointError` naming the file and what was expected.

Weights are then read one tensor at a time (safetensors through mmap, .pth with
`torch.load(mmap=True)`), cast to the target dtype, moved to the target device and
assigned into a module built on the meta device, so a 14B expert never exists twice in
host memory.
"""
from __future__ import annotations

import json
import logging
import math
import struct
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .configs import (
    HIGH_NOISE_DIR,
    MODEL_SPECS,
    T5_FILE,
    TINY_PRESETS,
    TOKENIZER_DIR,
    VAE22_FILE,
    ModelSpec,
    spec_for_model_type,
)
from .dit import DiTConfig, WanDiT
from .pipeline import HIGH_NOISE, LOW_NOISE, WanPipeline, activation_bytes, plan_memory
from .plan import latent_grid
from .t5 import T5Config, UMT5Encoder
from .text import PromptTokenizer
from .tiny import materialise_tiny
from .vae import WanVAE21
from .vae22 import WanVAE22

log = logging.getLogger(__name__)

SAFETENSORS_FILE = "diffusion_pytorch_model.safetensors"
SAFETENSORS_INDEX = "diffusion_pytorch_model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or does not hold what the model needs."""


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise CheckpointError(f"missing {what}: {path} does not exist")
    return path


# ---------------------------------------------------------------- safetensors (DiT shards)
def _safetensors_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name -> (shape, dtype) from the header, after checking the file is whole."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"truncated safetensors file {path}: {size} bytes, no header")
        (header_len,) = struct.unpack("<Q", raw)
        if 8 + header_len > size:
            raise CheckpointError(f"truncated safetensors file {path}: header needs {8 + header_len} "
                                  f"bytes, file has {size}")
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + header_len + end > size:
        raise CheckpointError(f"truncated safetensors file {path}: tensors need {8 + header_len + end} "
                              f"bytes, file has {size}")
    return {k: (tuple(v["shape"]), v["dtype"]) for k, v in header.items()}


def dit_shards(folder: Path) -> list[Path]:
    """The safetensors files of one DiT folder: a single file, or the shards an index names."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = [folder / name for name in sorted(set(weight_map.values()))]
        for shard in shards:
            require_file(shard, f"DiT shard listed in {index}")
        return shards
    single = folder / SAFETENSORS_FILE
    if single.is_file():
        return [single]
    raise CheckpointError(f"missing DiT weights in {folder}: expected {SAFETENSORS_FILE} "
                          f"or {SAFETENSORS_INDEX} with its shards")


def safetensors_shapes(shards: list[Path]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in shards:
        shapes.update({k: shape for k, (shape, _) in _safetensors_header(shard).items()})
    return shapes


def _iter_safetensors(shards: list[Path], device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    # safe_open maps the file; get_tensor materialises one tensor at a time on `device`.
    for shard in shards:
        with safe_open(str(shard), framework="pt", device=str(device)) as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


# ---------------------------------------------------------------- .pth (T5, VAE)
def load_pth(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A torch.save'd state dict, memory-mapped (tensors are read when used)."""
    require_file(path, what)
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"unreadable {what} {path}: not a complete torch.save archive "
                              f"(truncated or not a .pth file)")
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # torch raises several types for damaged archives
        raise CheckpointError(f"unreadable {what} {path}: {exc}") from exc
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"unexpected content in {what} {path}: expected a state dict, "
                              f"got {type(sd).__name__}")
    return dict(sd)


# ---------------------------------------------------------------- shape check and assignment
def check_shapes(model: nn.Module, found: Mapping[str, tuple[int, ...]], source: Path | str) -> None:
    """Raise CheckpointError unless `found` has exactly the model's tensor names and shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {unexpected[:3]})")
        raise CheckpointError(f"{source} does not match {type(model).__name__}: " + "; ".join(parts))
    for key, shape in expected.items():
        if tuple(found[key]) != shape:
            raise CheckpointError(f"{source}: tensor {key} has shape {tuple(found[key])}, "
                                  f"{type(model).__name__} expects {shape}")


def assign_weights(model: nn.Module, tensors: Iterator[tuple[str, torch.Tensor]] | Mapping,
                   device: torch.device, dtype: torch.dtype,
                   keep_dtype: Callable[[str], bool] = lambda _: False) -> nn.Module:
    """Cast and move each tensor, then assign it into a meta-built module (strict)."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    sd = {}
    for key, t in items:
        t = t.to(device=device, dtype=t.dtype if keep_dtype(key) else dtype)
        sd[key] = t
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def build_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    with torch.device("meta"):
        return factory()


def load_dit_weights(model: nn.Module, folder: Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
    shards = dit_shards(folder)
    check_shapes(model, safetensors_shapes(shards), folder)
    return assign_weights(model, _iter_safetensors(shards, device), device, dtype)



# ---------------------------------------------------------------- the whole pipeline
def _resolve(checkpoint: str | Path) -> tuple[Path, ModelSpec]:
    """A preset name or a checkpoint folder -> (folder, spec)."""
    name = str(checkpoint)
    if name in TINY_PRESETS:
        return materialise_tiny(name), MODEL_SPECS[name]
    if name in MODEL_SPECS:
        raise CheckpointError(f"{name!r} needs its downloaded checkpoint folder (Wan-AI/Wan2.2-{name}); "
                              f"pass the folder path. Presets that need no download: {list(TINY_PRESETS)}")
    root = Path(checkpoint).expanduser()
    if not root.is_dir():
        raise CheckpointError(f"checkpoint folder {root} does not exist (or pass a preset: "
                              f"{list(TINY_PRESETS)})")
    for sub in (HIGH_NOISE_DIR, "."):
        cfg = root / sub / "config.json"
        if cfg.is_file():
            model_type = json.loads(cfg.read_text()).get("model_type")
            return root, spec_for_model_type(model_type)
    raise CheckpointError(f"missing DiT config in {root}: expected {HIGH_NOISE_DIR}/config.json "
                          f"(A14B) or config.json (TI2V-5B)")


def _expert_dirs(root: Path, spec: ModelSpec) -> dict[str, Path]:
    names = (HIGH_NOISE, LOW_NOISE) if spec.is_moe else ("model",)
    return {name: root / sub for name, sub in zip(names, spec.experts, strict=True)}


def _shapes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(t.shape) for k, t in state_dict.items()}


def _param_bytes(shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype) -> int:
    return sum(math.prod(s) for s in shapes.values()) * dtype.itemsize


@dataclass
class _Validated:
    """A checkpoint folder whose every file was checked, and the meta modules built to check it."""

    expert_dirs: dict[str, Path]
    dit_configs: dict[str, DiTConfig]
    dits: dict[str, nn.Module]
    dit_shapes: dict[str, dict[str, tuple[int, ...]]]
    t5: nn.Module
    t5_sd: dict[str, torch.Tensor]
    vae: nn.Module
    vae_sd: dict[str, torch.Tensor]
    tokenizer: PromptTokenizer


def _vae_for(spec: ModelSpec, sd: Mapping[str, torch.Tensor], path: Path) -> nn.Module:
    """The VAE module a checkpoint's spec names, at the widths its state dict has."""
    for key in ("encoder.conv1.weight", "decoder.conv1.weight"):
        if key not in sd:
            raise CheckpointError(f"{path} is not a Wan VAE state dict: it lacks {key}")
    if spec.vae_file == VAE22_FILE:
        return WanVAE22(*WanVAE22.dims_from_state_dict(sd))
    return WanVAE21(dim=WanVAE21.dim_from_state_dict(sd))


def _validate(root: Path, spec: ModelSpec) -> _Validated:
    """Existence, completeness, tensor names and shapes of every file, reading no weight."""
    expert_dirs = _expert_dirs(root, spec)
    dit_configs = {n: DiTConfig.from_config_json(require_file(d / "config.json", "DiT config"))
                   for n, d in expert_dirs.items()}
    dits = {n: build_meta(lambda c=c: WanDiT(c)) for n, c in dit_configs.items()}
    dit_shapes = {}
    for n, d in expert_dirs.items():
        dit_shapes[n] = safetensors_shapes(dit_shards(d))
        check_shapes(dits[n], dit_shapes[n], d)
    t5_path, vae_path = root / T5_FILE, root / spec.vae_file
    t5_sd = load_pth(t5_path, "umT5 encoder")
    t5 = build_meta(lambda: UMT5Encoder(T5Config.from_state_dict(t5_sd)))
    check_shapes(t5, _shapes(t5_sd), t5_path)
    vae_sd = load_pth(vae_path, "VAE")
    vae = build_meta(lambda: _vae_for(spec, vae_sd, vae_path))
    check_shapes(vae, _shapes(vae_sd), vae_path)
    try:
        tokenizer = PromptTokenizer(root / TOKENIZER_DIR)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"unusable umT5 tokenizer in {root / TOKENIZER_DIR}: {exc}") from exc
    return _Validated(expert_dirs, dit_configs, dits, dit_shapes, t5, t5_sd, vae, vae_sd, tokenizer)


def check_checkpoint(checkpoint: str | Path) -> ModelSpec:
    """Validate a checkpoint folder (or preset name) as `load_pipeline` does, reading no weight.

    Returns the spec its config.json declares; raises CheckpointError naming the file and the problem.
    """
    root, spec = _resolve(checkpoint)
    _validate(root, spec)
    return spec


def _memory_needs(v: _Validated, spec: ModelSpec, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """`plan_memory`'s sizes for a validated checkpoint: bytes of one expert, experts, umT5 and VAE bytes, and the
    activations of the largest run the model offers (plus slack for the VAE and the allocator)."""
    expert_bytes = max(_param_bytes(s, dtype) for s in v.dit_shapes.values())
    cfg = next(iter(v.dit_configs.values()))
    largest = max(latent_grid(spec, size, spec.frame_num).tokens for size in spec.sizes)
    return (expert_bytes, len(v.dits), _param_bytes(_shapes(v.t5_sd), dtype),
            _param_bytes(_shapes(v.vae_sd), torch.float32), activation_bytes(cfg, largest) + (4 << 30))


def resident_bytes(checkpoint: str | Path, dtype: torch.dtype = torch.bfloat16) -> int:
    """Device bytes a pipeline of `checkpoint` needs to keep everything on the device (the fastest plan; with less
    free, `load_pipeline` offloads), from the files' headers: what a process holding other pipelines frees before
    loading it."""
    root, spec = _resolve(checkpoint)
    expert, n_experts, t5, vae, activations = _memory_needs(_validate(root, spec), spec, dtype)
    return expert * n_experts + t5 + vae + activations


def load_pipeline(checkpoint: str | Path, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.bfloat16) -> WanPipeline:
    """Load a Wan2.2 pipeline from an official checkpoint folder or a preset name ("tiny").

    `dtype` is the DiT and text-encoder compute dtype (bf16 as the official
    `--convert_model_dtype`; float32 for exact CPU runs). The VAE always runs in float32.
    Every file is validated before any weight is read or device memory is used.
    """
    device = torch.device(device)
    root, spec = _resolve(checkpoint)

    # 1. validate everything (existence, completeness, tensor names and shapes) up front
    v = _validate(root, spec)

    # 2. decide where weights live, from free device memory
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    memory = plan_memory(free, *_memory_needs(v, spec, dtype))
    log.info("loading %s from %s on %s (%s): experts %s, text encoder %s", spec.name, root, device, dtype,
             "resident" if memory.experts_resident else "swapped at the boundary",
             "resident" if memory.text_encoder_resident else
             "encoding on the CPU" if memory.text_encoder_on_cpu else "on the CPU between uses")

    # 3. read the weights
    for n, d in v.expert_dirs.items():
        target = device if memory.experts_resident else torch.device("cpu")
        load_dit_weights(v.dits[n], d, target, dtype)
    t5_device = device if memory.text_encoder_resident else torch.device("cpu")
    assign_weights(v.t5, v.t5_sd, t5_device, dtype)
    assign_weights(v.vae, v.vae_sd, device, torch.float32)
    return WanPipeline(spec, v.dits, v.t5, v.tokenizer, v.vae, device, dtype, memory, root)
