"""LoRA patch: apply LoRA files to a pipeline's DiT experts, merged into the weights or beside the matmuls.

`apply_loras(pipe, LoraConfig(loras=(LoraChoice(path, strength, expert), ...)))` reads every file, checks every
key against every expert it targets (wan_engine.lora.check_lora) and only then changes anything, so a bad
file changes no weight. Several LoRAs stack: their deltas add up.

- merged (default): W <- W + sum of strength * delta, computed in float32 and rounded once to the weight
  dtype, written with `copy_` into the same Parameters: a compiled block sees the same tensors and does
  not recompile. The exact undo stays on the weight's device and is small: subtracting the delta again,
  round(W' - delta), gives W back but for the last bit here and there, so per weight the difference of the
  bit patterns (-1, 0 or +1, almost always) is kept in 2 bits, with the rare other weights' original values
  beside; `remove()` recomputes the delta (the same kernels, TF32 off: the same bits) and puts W back bit for
  bit. For an A14B pair that is ~7 GB on the GPU instead of a 57 GB copy in host memory restored over PCIe.
- unmerged: the low-rank term is added beside each base matmul by a forward hook, x @ W.T + s * (x @ down.T)
  @ up.T, nothing in the weights changes. Parameters that are not a matmul's (modulation, norms, biases of a
  `diff_b` alone) are merged as above. Blocks whose FFN input layer has a LoRA run their FFN as modules (the
  fused GELU-epilogue path reads the weight directly). `LoraHandle.swap` switches an unmerged handle to other
  LoRAs of the same targets by swapping the small tensors in the installed hooks: no hook, no base weight.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wan_engine.lora import LoraChoice, LoraError, LoraFile, check_lora, lora_files, to_device
from wan_engine.plan import HIGH_NOISE, LOW_NOISE

from .base import PatchStack, swap_attr

log = logging.getLogger(__name__)

_EXPERTS = {"high": (HIGH_NOISE,), "low": (LOW_NOISE,), "both": (HIGH_NOISE, LOW_NOISE)}
_BITS = {2: torch.int16, 4: torch.int32}      # a weight's bit pattern as an integer, by element size
_DENSE = 8                                    # more than 1 in 8 weights off by more than one bit: keep a full copy


@dataclass(frozen=True)
class LoraConfig:
    loras: tuple[LoraChoice, ...] = ()
    merge: bool = True

    @property
    def mode(self) -> str:
        return "merged" if self.merge else "unmerged"


class LoraHandle(PatchStack):
    """The applied LoRAs of one pipeline; `files` are what was read (for run metadata)."""

    def __init__(self, cfg: LoraConfig, files: list[LoraFile]):
        super().__init__("lora")
        self.config = cfg
        self.files = files
        self._terms: dict[tuple[str, str], _LoraTerm] = {}   # unmerged: the installed hooks' terms
        self._merges = PatchStack("lora-merged")             # unmerged: the parameters merged all the same
        self.undo_on_remove(lambda: self._merges.remove())

    def summary(self) -> list[dict]:
        """Per LoRA: its file, sha256, strength, experts and rank (metadata.json)."""
        return [dict(path=str(f.path), name=f.name, sha256=f.sha256, strength=c.strength, expert=c.expert,
                     rank=f.rank, layout=f.layout, mode=self.config.mode)
                for c, f in zip(self.config.loras, self.files, strict=True)]

    def swappable(self, cfg: LoraConfig) -> bool:
        """Whether `swap` may apply: both unmerged, this handle on (its hooks must still match the new targets)."""
        return not self.config.merge and not cfg.merge and self.active and bool(self._terms)

    def swap(self, pipe, cfg: LoraConfig, checked: list[LoraFile] | None = None) -> bool:
        """Switch an unmerged handle to `cfg`'s LoRAs in place when they hook the same modules: the hooks keep
        their place and get the new small tensors, only the few merged non-matmul parameters are redone.
        `checked`: `read_and_check(pipe, cfg.loras)` done already. Returns False (nothing changed) when that
        does not apply; then remove and apply instead."""
        if not self.swappable(cfg):
            return False
        read = checked if checked is not None else read_and_check(pipe, cfg.loras)
        tables = _tables(pipe)
        hooked, merged = _split(tables, _param_deltas(pipe, cfg.loras, read))
        if hooked.keys() != self._terms.keys():
            return False
        with torch.no_grad():
            self._merges.remove()
            self._merges = PatchStack("lora-merged")
            for key, entries in hooked.items():
                self._terms[key].set(entries)
            _merge_all(tables, merged, self._merges)
        self.config, self.files = cfg, read
        self.detail = _detail(cfg, read)
        return True


def lora_targets(pipe, choice: LoraChoice) -> tuple[str, ...]:
    """The experts of `pipe` a LoRA choice applies to."""
    experts = tuple(pipe.experts)
    if choice.expert == "both":
        return experts
    if set(experts) != {HIGH_NOISE, LOW_NOISE}:
        raise LoraError(f"LoRA {choice.path}: expert {choice.expert!r} needs a two-expert (A14B) model; "
                        f"{pipe.spec.name} has one DiT, use 'both'")
    return _EXPERTS[choice.expert]


def read_and_check(pipe, loras: tuple[LoraChoice, ...]) -> list[LoraFile]:
    """Every LoRA read (through the process's cache of parsed files: a recent file is not read again) and checked
    against every expert it targets (a LoraError before any change)."""
    read = [lora_files().read(c.path) for c in loras]
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


def _tables(pipe) -> dict[str, tuple[dict, dict]]:
    """Per expert, its parameters and modules by name: the lookups of one apply go through these (a
    named_parameters walk per module is slow)."""
    return {e: (dict(dit.named_parameters()), dict(dit.named_modules())) for e, dit in pipe.experts.items()}


def _split(tables: dict[str, tuple[dict, dict]], deltas: dict[tuple[str, str], list]) -> tuple[dict, dict]:
    """The deltas on a Linear (hooked when unmerged) and the others (always merged), each (expert, module) ->
    entries."""
    hooked, merged = {}, {}
    for (expert, module), entries in deltas.items():
        params, modules = tables[expert]
        mod = None if module in params else modules[module]
        (hooked if isinstance(mod, nn.Linear) else merged)[(expert, module)] = entries
    return hooked, merged


@contextmanager
def _exact_matmul() -> Iterator[None]:
    """TF32 off while a delta is computed: a remove recomputes the delta of its apply, so the two must run the
    same kernels whatever a tier set in between."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


class _Correction:
    """What turns round(W' - delta) back into W bit for bit (W' = round(W + delta), the merged weight): the
    difference of the two bit patterns as integers, -1, 0, +1 (or +2) for almost every weight, 2 bits each
    packed four to a byte, and the original values of the weights where it is anything else. Integer
    arithmetic in the weight's own width wraps, which keeps the sum exact. When many weights differ more (a
    delta far larger than the weights), a full copy is kept instead. Each step is one pass over the weight:
    ~50 bytes of device memory traffic per weight to build, ~25 to restore."""

    _SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)

    def __init__(self, original: Tensor, merged: Tensor, delta: Tensor):
        ints = _BITS[original.element_size()]
        approx = torch.sub(merged, delta, out=torch.empty_like(merged))   # computed in float32, rounded once
        code = torch.sub(original.reshape(-1).view(ints), approx.reshape(-1).view(ints), out=approx.view(-1).view(
            ints)).add_(1)                                                # -1, 0, +1, +2 -> 0, 1, 2, 3
        self.index = (code & -4).nonzero().squeeze(1)                     # the others (one device sync a weight)
        self.full = original.clone() if self.index.numel() > original.numel() // _DENSE else None
        if self.full is not None:
            return
        self.values = original.reshape(-1)[self.index]
        code = F.pad(code.to(torch.uint8).bitwise_and_(3), (0, -code.numel() % 4)).view(-1, 4)
        self.packed = code[:, 0] | (code[:, 1] << 2) | (code[:, 2] << 4) | (code[:, 3] << 6)

    @property
    def nbytes(self) -> int:
        if self.full is not None:
            return self.full.numel() * self.full.element_size()
        return self.packed.numel() + self.index.numel() * 8 + self.values.numel() * self.values.element_size()

    def restore_(self, weight: Tensor, delta: Tensor) -> None:
        """Put the original back into `weight` (the merged one, in place) with the delta of the merge."""
        if self.full is not None:
            weight.copy_(self.full)
            return
        ints = _BITS[weight.element_size()]
        torch.sub(weight, delta, out=weight)
        code = (self.packed.unsqueeze(1) >> self._SHIFTS.to(self.packed.device)).bitwise_and_(3)
        bits = weight.view(-1).view(ints)
        bits.add_(code.view(-1)[:weight.numel()]).sub_(1)
        bits[self.index] = self.values.view(ints)


@torch.no_grad()
def _merge(param: nn.Parameter, delta_of: Callable[[], Tensor], stack: PatchStack) -> None:
    """W <- round(W + delta) in place, the exact undo recorded on `stack` (see `_Correction`)."""
    with _exact_matmul():
        delta = delta_of()
    merged = torch.add(param, delta, out=torch.empty_like(param))   # computed in float32, rounded once
    correction = _Correction(param.detach(), merged, delta)
    param.copy_(merged)
    del merged, delta

    @torch.no_grad()
    def undo() -> None:
        with _exact_matmul():
            delta = delta_of()
        correction.restore_(param.detach(), delta)

    stack.undo_on_remove(undo)


def _merge_all(tables: dict[str, tuple[dict, dict]], merged: dict[tuple[str, str], list], stack: PatchStack) -> None:
    """Merge the deltas of `merged` ((expert, module) -> entries) into the weights and biases."""
    for (expert, module), entries in merged.items():
        params, modules = tables[expert]
        weight, bias = (params[module], None) if module in params else (modules[module].weight,
                                                                        getattr(modules[module], "bias", None))
        if any(d.down is not None or d.diff is not None for d, _ in entries):
            _merge(weight, lambda w=weight, e=entries: _sum(d.weight_delta(w.shape, w.device, s) for d, s in e),
                   stack)
        if any(d.diff_b is not None for d, _ in entries):
            _merge(bias, lambda b=bias, e=entries: _sum(d.bias_delta(b.device, s) for d, s in e), stack)


class _LoraTerm:
    """The forward hook that adds the LoRA terms of one Linear to its output: the low-rank pairs as two thin
    matmuls, full deltas and bias deltas as one more linear. `set` gives it other LoRAs' tensors."""

    def __init__(self, module: nn.Linear, entries: list):
        self.weight = module.weight
        self.set(entries)

    def set(self, entries: list) -> None:
        w = self.weight
        pairs = []
        for delta, strength in entries:
            if delta.down is not None:
                up = (strength * delta.scale * to_device(delta.up, w.device, torch.float32)).to(w.dtype)
                pairs.append((to_device(delta.down, w.device, w.dtype), up))    # [r, in], [out, r]
        full = _sum(to_device(d.diff, w.device, torch.float32) * s for d, s in entries if d.diff is not None)
        bias = _sum(d.bias_delta(w.device, s) for d, s in entries)
        self.pairs = pairs
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


def apply_loras(pipe, cfg: LoraConfig, checked: list[LoraFile] | None = None) -> LoraHandle:
    """Apply `cfg.loras` to `pipe`'s experts (see the module docstring); `checked`: `read_and_check(pipe,
    cfg.loras)` done already (a caller that checks before it removes the previous LoRAs)."""
    read = checked if checked is not None else read_and_check(pipe, cfg.loras)
    handle = LoraHandle(cfg, read)
    try:
        tables = _tables(pipe)
        hooked, merged = _split(tables, _param_deltas(pipe, cfg.loras, read))
        if cfg.merge:
            merged = {**hooked, **merged}
        else:
            with torch.no_grad():
                for (expert, module), entries in hooked.items():
                    modules = tables[expert][1]
                    mod = modules[module]
                    term = handle._terms[(expert, module)] = _LoraTerm(mod, entries)
                    handle.undo_on_remove(mod.register_forward_hook(term).remove)
                    if module.endswith(".ffn.0"):
                        block = modules[module.removesuffix(".ffn.0")]
                        handle.undo_on_remove(swap_attr(block, "_ffn_gelu_epilogue", block.ffn))
        _merge_all(tables, merged, handle._merges)
    except Exception:
        handle.remove()
        raise
    handle.detail = _detail(cfg, read)
    log.info("LoRA on %s: %s", pipe.spec.name, handle.detail)
    return handle


def _detail(cfg: LoraConfig, read: list[LoraFile]) -> str:
    names = ", ".join(f"{f.name} x{c.strength} ({c.expert})" for c, f in zip(cfg.loras, read, strict=True))
    return f"{cfg.mode}: {names or 'none'}"


def _sum(tensors) -> Tensor | None:
    total = None
    for t in tensors:
        if t is not None:
            total = t if total is None else total + t
    return total
