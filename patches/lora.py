"""LoRA patch: apply LoRA files to a pipeline's DiT experts, merged into the weights or beside the matmuls.

`apply_loras(pipe, LoraConfig(loras=(LoraChoice(path, strength, expert), ...)))` reads every file, checks every
key against every expert it targets (wan_engine.lora.check_lora) and only then changes anything, so a bad
file changes no weight. Several LoRAs stack: their deltas add up.

- merged (default): W <- W + sum of strength * delta, computed in float32 and rounded once to the weight
  dtype, written with `copy_` into the same Parameters: a compiled block sees the same tensors and does
  not recompile. The exact original tensors are kept (on the weight's device, or `keep_on`: pinned host memory
  when an A14B pair leaves no room for a second copy), so `remove()` writes them back bit for bit; subtracting
  the delta in bf16 would not give them back.
- unmerged: the low-rank term is added beside each base matmul by a forward hook, x @ W.T + s * (x @ down.T)
  @ up.T, nothing in the weights changes; switching LoRAs only swaps the small tensors. Parameters that are
  not a matmul's (modulation, norms, biases of a `diff_b` alone) are merged as above. Blocks whose FFN input
  layer has a LoRA run their FFN as modules (the fused GELU-epilogue path reads the weight directly).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wan_engine.lora import LoraChoice, LoraError, LoraFile, check_lora, read_lora
from wan_engine.plan import HIGH_NOISE, LOW_NOISE

from .base import PatchStack, swap_attr

log = logging.getLogger(__name__)

_EXPERTS = {"high": (HIGH_NOISE,), "low": (LOW_NOISE,), "both": (HIGH_NOISE, LOW_NOISE)}


@dataclass(frozen=True)
class LoraConfig:
    loras: tuple[LoraChoice, ...] = ()
    merge: bool = True
    keep_on: str | None = None      # where merged weights' originals wait (None: the weight's device; "cpu": pinned)


class LoraHandle(PatchStack):
    """The applied LoRAs of one pipeline; `files` are what was read (for run metadata)."""

    def __init__(self, cfg: LoraConfig, files: list[LoraFile]):
        super().__init__("lora")
        self.config = cfg
        self.files = files

    def summary(self) -> list[dict]:
        """Per LoRA: its file, sha256, strength, experts and rank (metadata.json)."""
        return [dict(path=str(f.path), name=f.name, sha256=f.sha256, strength=c.strength, expert=c.expert,
                     rank=f.rank, layout=f.layout, mode="merged" if self.config.merge else "unmerged")
                for c, f in zip(self.config.loras, self.files, strict=True)]


def lora_targets(pipe, choice: LoraChoice) -> tuple[str, ...]:
    """The experts of `pipe` a LoRA choice applies to."""
    experts = tuple(pipe.experts)
    if choice.expert == "both":
        return experts
    if set(experts) != {HIGH_NOISE, LOW_NOISE}:
        raise LoraError(f"LoRA {choice.path}: expert {choice.expert!r} needs a two-expert (A14B) model; "
                        f"{pipe.spec.name} has one DiT, use 'both'")
    return _EXPERTS[choice.expert]


def read_and_check(pipe, loras: tuple[LoraChoice, ...], files: dict[str, LoraFile] | None = None) -> list[LoraFile]:
    """Every LoRA read and checked against every expert it targets (a LoraError before any change)."""
    files = files or {}
    read = [files.get(c.path) or read_lora(c.path) for c in loras]
    for choice, lora in zip(loras, read, strict=True):
        for name in lora_targets(pipe, choice):
            check_lora(lora, pipe.experts[name], name)
    return read


def _param_deltas(pipe, loras: tuple[LoraChoice, ...], files: list[LoraFile]) -> dict[tuple[str, str], list]:
    """(expert, module) -> [(LoraDelta, strength), ...] in the order of the LoRAs."""
    out: dict[tuple[str, str], list] = {}
    for choice, lora in zip(loras, files, strict=True):
        for name in lora_targets(pipe, choice):
            for module, delta in lora.deltas.items():
                out.setdefault((name, module), []).append((delta, choice.strength))
    return out


def _weight_and_bias(dit: nn.Module, module: str) -> tuple[nn.Parameter, nn.Parameter | None, nn.Module | None]:
    params = dict(dit.named_parameters())
    if module in params:   # a bare parameter (modulation)
        return params[module], None, None
    mod = dit.get_submodule(module)
    return mod.weight, getattr(mod, "bias", None), mod


def _original_copy(param: nn.Parameter, keep_on: str | None) -> Tensor:
    """An exact copy of a weight, on `keep_on` (pinned host memory when it is the CPU and the weight is on a GPU,
    so that restoring it is one fast transfer)."""
    if keep_on is None or torch.device(keep_on) == param.device:
        return param.detach().clone()
    pin = torch.device(keep_on).type == "cpu" and param.is_cuda
    return torch.empty(param.shape, dtype=param.dtype, device=keep_on, pin_memory=pin).copy_(param.detach())


@torch.no_grad()
def _merge(param: nn.Parameter, delta: Tensor, cfg: LoraConfig, handle: PatchStack, store: dict | None,
           key: str) -> None:
    """W <- round(W + delta) in place; the exact original is kept for the undo (in `store` when given, where a
    resident pipeline keeps its base weights across LoRA switches: no copy out again)."""
    original = None if store is None else store.get(key)
    if original is None:
        original = _original_copy(param, cfg.keep_on)
        if store is not None:
            store[key] = original
    param.copy_((param.float() + delta).to(param.dtype))
    handle.undo_on_remove(lambda: param.detach().copy_(original, non_blocking=original.is_pinned()))


class _LoraTerm:
    """The forward hook that adds the LoRA terms of one Linear to its output: the low-rank pairs as two thin
    matmuls, full deltas and bias deltas as one more linear."""

    def __init__(self, module: nn.Linear, entries: list):
        w = module.weight
        self.pairs = []
        for delta, strength in entries:
            if delta.down is not None:
                up = (strength * delta.scale * delta.up.to(w.device, torch.float32)).to(w.dtype)   # [out, r]
                self.pairs.append((delta.down.to(w.device, w.dtype), up))                          # [r, in]
        full = _sum(d.diff.to(w.device, torch.float32) * s for d, s in entries if d.diff is not None)
        bias = _sum(d.bias_delta(w.device, s) for d, s in entries)
        self.full = None if full is None else full.to(w.dtype)
        self.bias = None if bias is None else bias.to(w.dtype)

    def __call__(self, module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        x = args[0].to(module.weight.dtype)
        extra = None if self.full is None else F.linear(x, self.full)
        for down, up in self.pairs:
            term = F.linear(F.linear(x, down), up)   # [..., out]
            extra = term if extra is None else extra + term
        if self.bias is not None:
            extra = self.bias if extra is None else extra + self.bias
        return out + extra.to(out.dtype)


def apply_loras(pipe, cfg: LoraConfig, files: dict[str, LoraFile] | None = None,
                store: dict[str, Tensor] | None = None) -> LoraHandle:
    """Apply `cfg.loras` to `pipe`'s experts (see the module docstring); `files`: LoRAs already read, by path;
    `store`: where the merged weights' originals are kept across applications (a resident pipeline's), which
    assumes nothing but this patch changes those weights."""
    read = read_and_check(pipe, cfg.loras, files)
    handle = LoraHandle(cfg, read)
    try:
        for (expert, module), entries in _param_deltas(pipe, cfg.loras, read).items():
            dit = pipe.experts[expert]
            weight, bias, mod = _weight_and_bias(dit, module)
            hookable = isinstance(mod, nn.Linear)
            if not cfg.merge and hookable:
                handle.undo_on_remove(mod.register_forward_hook(_LoraTerm(mod, entries)).remove)
                if module.endswith(".ffn.0"):
                    block = dit.get_submodule(module.removesuffix(".ffn.0"))
                    handle.undo_on_remove(swap_attr(block, "_ffn_gelu_epilogue", block.ffn))
                continue
            w_delta = _sum(d.weight_delta(weight.shape, weight.device, s) for d, s in entries)
            b_delta = _sum(d.bias_delta(weight.device, s) for d, s in entries)
            name = module if mod is None else f"{module}.weight"
            if w_delta is not None:
                _merge(weight, w_delta, cfg, handle, store, f"{expert}.{name}")
            if b_delta is not None:
                _merge(bias, b_delta, cfg, handle, store, f"{expert}.{module}.bias")
    except Exception:
        handle.remove()
        raise
    handle.detail = ", ".join(f"{f.name} x{c.strength} ({c.expert})" for c, f in zip(cfg.loras, read, strict=True))
    handle.detail = f"{'merged' if cfg.merge else 'unmerged'}: {handle.detail or 'none'}"
    log.info("LoRA on %s: %s", pipe.spec.name, handle.detail)
    return handle


def _sum(tensors) -> Tensor | None:
    total = None
    for t in tensors:
        if t is not None:
            total = t if total is None else total + t
    return total
