"""Synthetic LoRA files for the tiny DiT (width 64, FFN 128, 2 blocks), in each layout users download.

Needs only torch and safetensors: the oracle script (tests/oracle/make_lora_refs.py, another venv) writes the
same files with it, so the committed diffusers references and the tests see the same tensors. A LoRA is a
pure function of its seed.

`official_lora` gives the official / lightx2v keys without prefix; `in_layout` spells them as a file of one
layout: "official" (`diffusion_model.`), "comfy" (`lora_unet_` names with underscores, musubi/kohya style),
"diffusers" (`transformer.` + diffusers module names, lora_A/lora_B, alpha folded into B as PEFT files do).
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

TINY = dict(dim=64, ffn_dim=128, layers=2)
LAYOUTS = ("official", "comfy", "diffusers")

_DIFFUSERS = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
              "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
              "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0", "ffn.0": "ffn.net.0.proj",
              "ffn.2": "ffn.net.2"}


def _modules(dim: int, ffn_dim: int, layers: int) -> dict[str, tuple[int, int]]:
    """Block linears a LoRA targets -> (out, in)."""
    out = {}
    for i in range(layers):
        for attn in ("self_attn", "cross_attn"):
            for p in "qkvo":
                out[f"blocks.{i}.{attn}.{p}"] = (dim, dim)
        out[f"blocks.{i}.ffn.0"] = (ffn_dim, dim)
        out[f"blocks.{i}.ffn.2"] = (dim, ffn_dim)
    return out


def official_lora(seed: int, rank: int = 4, alpha: float | None = 8.0, diff_b: bool = True, extras: bool = False,
                  dim: int = 64, ffn_dim: int = 128, layers: int = 2) -> dict[str, torch.Tensor]:
    """lora_down/lora_up (+ alpha) on every block linear, `diff_b` on the q and FFN-out biases; `extras` adds what
    diffusers' loader does not take: a full `diff` on norm3 and on the modulation, a pair on the head."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (o, i) in _modules(dim, ffn_dim, layers).items():
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, i, generator=g) * 0.2
        sd[f"{name}.lora_up.weight"] = torch.randn(o, rank, generator=g) * 0.2
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(alpha)
        if diff_b and name.endswith((".q", "ffn.2")):
            sd[f"{name}.diff_b"] = torch.randn(o, generator=g) * 0.05
    if extras:
        sd["blocks.0.norm3.diff"] = torch.randn(dim, generator=g) * 0.05
        sd["blocks.1.modulation.diff"] = torch.randn(1, 6, dim, generator=g) * 0.05
        sd["head.head.lora_down.weight"] = torch.randn(rank, dim, generator=g) * 0.2
        sd["head.head.lora_up.weight"] = torch.randn(64, rank, generator=g) * 0.2
    return sd


def in_layout(sd: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """The official keys of `sd` spelled as a file of `layout` (see the module docstring)."""
    if layout == "official":
        return {f"diffusion_model.{k}": v for k, v in sd.items()}
    if layout == "comfy":
        out = {}
        for k, v in sd.items():
            for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha", ".diff_b", ".diff"):
                if k.endswith(suffix):
                    out["lora_unet_" + k[:-len(suffix)].replace(".", "_") + suffix] = v
                    break
        return out
    if layout == "diffusers":
        out = {}
        for k, v in sd.items():
            module, _, kind = k.partition(".lora_") if ".lora_" in k else k.rpartition(".")
            block, _, rest = module.partition(".")[2].partition(".")
            name = f"transformer.blocks.{block}.{_DIFFUSERS[rest]}"
            if kind == "down.weight":
                out[f"{name}.lora_A.weight"] = v
            elif kind == "up.weight":
                alpha = sd.get(f"{module}.alpha")
                scale = 1.0 if alpha is None else float(alpha) / sd[f"{module}.lora_down.weight"].shape[0]
                out[f"{name}.lora_B.weight"] = v * scale
            elif kind == "diff_b":
                out[f"{name}.lora_B.bias"] = v
        return out
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def write_lora(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path
