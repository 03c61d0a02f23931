"""Where a LoRA switch's seconds go, counted on the CPU: bytes, tensor ops and Python per module.

A switch (LoRA set A -> B, one file per expert) is read, checked, the applied set removed and the new one
applied, or an unmerged set swapped inside its hooks (counted as apply), as a resident engine does
(patches.lora). This script runs it on the CPU with real-size A14B blocks (dim 5120, FFN 13824) but only
`--blocks` of them per expert, and counts per phase:
- file: bytes of LoRA files read (tensors and sha256) and the seconds that took;
- tensors: every aten op is recorded (a TorchDispatchMode): the `_to_copy`/`copy_` calls that move LoRA tensors
  (on a GPU each is a host->device copy, a stall when the source is pageable) and the bytes they move, the
  bytes copied into the base weights (PCIe s: what a remove's writes cost over PCIe when they come from
  originals kept in host memory, as before this change),
  the bytes every op reads and writes (device memory traffic), and `nonzero`/`item` calls (device syncs);
- Python: the same phase on a full 40-block expert built on the meta device (no data), whose seconds are the
  host's per-module work.
The last table scales the counts to two 40-block experts and states what they cost at the H200's rates
(`--h2d-gbs` host->device from pinned memory, `--hbm-tbs` device memory, the Python seconds as measured here).

    python benchmarks/lora_switch_profile.py                 # 2 real-size blocks per expert, rank 64
    python benchmarks/lora_switch_profile.py --model tiny    # quick check
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import torch.fx.experimental._config
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.lora_bench import write_random_lora as write_lora  # noqa: E402
from patches.bench import BENCH_MODELS  # noqa: E402
from patches.lora import LoraConfig, apply_loras, read_and_check  # noqa: E402
from wan_engine.dit import DiTConfig, WanDiT  # noqa: E402
from wan_engine.lora import LoraChoice  # noqa: E402
from wan_engine.tiny import random_dit  # noqa: E402

A14B_BLOCKS = 40


class OpCounter(TorchDispatchMode):
    """Counts aten ops and the bytes of their tensor arguments and results."""

    def __init__(self):
        super().__init__()
        self.calls: Counter = Counter()
        self.bytes_touched = 0
        self.moved_bytes = 0         # _to_copy / copy_ of small (LoRA) tensors
        self.weight_bytes = 0        # copy_ into a base weight (from a kept original or a computed tensor)
        self.syncs = 0               # ops whose result the host waits for on a GPU (nonzero, item of a device tensor)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        self.calls[name] += 1
        tensors = [t for t in (*args, *kwargs.values(), *(out if isinstance(out, (tuple, list)) else (out,)))
                   if isinstance(t, torch.Tensor)]
        self.bytes_touched += sum(t.numel() * t.element_size() for t in tensors)
        if name == "nonzero" or (name == "_local_scalar_dense" and tensors[0].device.type != "cpu"):
            self.syncs += 1
        if name in ("_to_copy", "copy_") and tensors:
            nbytes = tensors[0].numel() * tensors[0].element_size()
            if tensors[0].numel() >= 1 << 22:
                self.weight_bytes += nbytes
            else:
                self.moved_bytes += nbytes
        return out


def switch(pipe, sets, merge: bool, rounds: int) -> list[dict]:
    """Phase records of `rounds` switches between the sets (the first application left out)."""
    handle, records = None, []
    for i in range(rounds + 1):
        loras = sets[i % len(sets)]
        rec = {}
        for phase in ("read", "remove", "apply"):
            counter = OpCounter()
            started = time.perf_counter()
            with counter:
                if phase == "read":
                    checked = read_and_check(pipe, loras)
                elif phase == "remove" and handle is not None and not handle.swappable(LoraConfig(loras, merge)):
                    handle.remove()
                    handle = None
                elif phase == "apply" and (handle is None or not handle.swap(pipe, LoraConfig(loras, merge), checked)):
                    handle = apply_loras(pipe, LoraConfig(loras, merge=merge), checked)
            rec[phase] = dict(s=time.perf_counter() - started, ops=sum(counter.calls.values()),
                              moves=counter.calls["_to_copy"] + counter.calls["copy_"],
                              moved=counter.moved_bytes, weights=counter.weight_bytes,
                              touched=counter.bytes_touched,
                              syncs=counter.syncs)
        if i:
            records.append(rec)
    handle.remove()
    return records


class Pipe:
    """What the LoRA patch needs of a pipeline: its experts and its spec's name."""

    def __init__(self, experts: dict[str, nn.Module]):
        self.experts = experts
        self.spec = type("Spec", (), {"name": "profile"})()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="t2v-A14B", choices=("t2v-A14B", "tiny"))
    ap.add_argument("--blocks", type=int, default=2, help="real-size blocks per expert built with data")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--h2d-gbs", type=float, default=50.0)
    ap.add_argument("--hbm-tbs", type=float, default=4.0)
    args = ap.parse_args(argv)
    full = BENCH_MODELS[args.model].dit
    blocks = min(args.blocks, full.num_layers)
    cfg = DiTConfig(**{**full.__dict__, "num_layers": blocks})
    dtype = torch.bfloat16 if args.model != "tiny" else torch.float32
    scale = 2 * full.num_layers / (2 * blocks)   # both experts, every block
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = Pipe({e: random_dit(cfg, "cpu", dtype, seed=i) for i, e in enumerate(("high_noise", "low_noise"))})
        with torch.device("meta"):
            meta = Pipe({e: WanDiT(full).requires_grad_(False) for e in ("high_noise", "low_noise")})
        sets = []
        for s in range(2):
            sets.append(tuple(LoraChoice(str(write_lora(tmp / f"{s}-{e}.safetensors", data.experts[f"{e}_noise"],
                                                        args.rank, seed=10 * s + j)), 1.0, e)
                              for j, e in enumerate(("high", "low"))))
        file_bytes = sum(Path(c.path).stat().st_size for c in sets[0])
        full_sets = []
        for s in range(2):   # the same LoRAs for the full meta experts: pairs on all 40 blocks
            full_sets.append(tuple(LoraChoice(str(write_lora(tmp / f"m{s}-{e}.safetensors", meta.experts[
                f"{e}_noise"], 1, seed=10 * s + j)), 1.0, e) for j, e in enumerate(("high", "low"))))
        # nonzero has no data on meta: let it answer "all" there (the Python timing only; that takes the dense
        # fallback, one clone instead of a few small ops)
        torch.fx.experimental._config.meta_nonzero_assume_all_nonzero = True
        rows = []
        for merge in (True, False):
            mode = "merged" if merge else "unmerged"
            recs = switch(data, sets, merge, args.rounds)
            py = switch(meta, full_sets, merge, 1)[-1]
            for phase in ("read", "remove", "apply"):
                r = recs[-1][phase]
                rows.append((mode, phase, r, py[phase]["s"]))
    print(f"# {args.model}: {blocks} real-size block(s) per expert on the CPU, rank {args.rank}; LoRA files "
          f"{file_bytes / 1e6:.1f} MB per set here, {file_bytes * scale / 1e9:.2f} GB for 2 x {full.num_layers} blocks")
    print(f"{'mode':<9}{'phase':<7}{'cpu s':>7}{'ops':>7}{'moves':>7}{'moved MB':>9}{'weights MB':>11}"
          f"{'touched GB':>11}{'syncs':>6} | 2x{full.num_layers} blocks: {'ops':>7}{'moved GB':>9}{'PCIe s':>7}"
          f"{'HBM s':>7}{'python s':>9}")
    for mode, phase, r, py_s in rows:
        # a merged remove's weight writes cross PCIe when the originals wait in host memory (the old design)
        h2d = r["weights"] * scale / (args.h2d_gbs * 1e9) if phase == "remove" else 0.0
        hbm = r["touched"] * scale / (args.hbm_tbs * 1e12)
        print(f"{mode:<9}{phase:<7}{r['s']:>7.3f}{r['ops']:>7}{r['moves']:>7}{r['moved'] / 1e6:>9.1f}"
              f"{r['weights'] / 1e6:>11.1f}{r['touched'] / 1e9:>11.2f}{r['syncs']:>6} | {'':>11}"
              f"{math.ceil(r['ops'] * scale):>7}{r['moved'] * scale / 1e9:>9.2f}{h2d:>7.2f}{hbm:>7.2f}{py_s:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
