"""LoRA + distilled mode on one GPU: an end-to-end distilled run with a LoRA, the quality tier's full run for
the ratio, and the time a resident pipeline takes to switch LoRAs.

A T2V-A14B-shaped pipeline with random bf16 weights is built in memory (both experts, the umT5-XXL encoder,
the Wan 2.1 VAE; the tiny preset's tokenizer, whose ids fit the real vocabulary). No checkpoint is needed.
Random rank-`--rank` LoRAs (one file per expert, on every block linear, official layout) are written to a
temporary folder. The script then measures:
1. distilled: the LoRAs merged, then text -> 4 steps (guide scale 1, one forward a step) -> VAE decode -> MP4,
   end to end on a warm pipeline (one untimed run first), under `--tier`;
2. quality: the LoRAs removed, the model's own 40-step run with classifier-free guidance under the quality
   tier; `--steps-quality N` runs N steps and extrapolates the denoise per step to 40;
3. switch: LoRA sets A -> B -> A ... on both experts as tasks/pipelines.EngineCache switches them, merged (read
   and check the new files, remove the applied set: recompute its delta and undo it with the kept 2-bit
   correction, merge the new set) and unmerged (read, then swap the small tensors inside the installed hooks),
   split into file read, remove and apply, medians of `--switches`. Files come through the process's cache of
   parsed files, as in a resident worker: the first read of each file is reported apart ("read, first time").

    python benchmarks/lora_bench.py                       # H200: 832x480x81, rank 64
    python benchmarks/lora_bench.py --switches-only       # H200: the switch figures alone (no 40-step run)
    python benchmarks/lora_bench.py --model tiny          # CPU smoke check
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from patches.bench import BENCH_MODELS  # noqa: E402
from patches.lora import LoraConfig, apply_loras, read_and_check  # noqa: E402
from patches.tiers import TierOptions, apply_tier  # noqa: E402
from tasks.encode import write_mp4  # noqa: E402
from wan_engine.configs import DISTILLED, TOKENIZER_DIR  # noqa: E402
from wan_engine.lora import LoraChoice  # noqa: E402
from wan_engine.pipeline import MemoryPlan, WanPipeline  # noqa: E402
from wan_engine.t5 import UMT5_XXL, UMT5Encoder  # noqa: E402
from wan_engine.text import PromptTokenizer  # noqa: E402
from wan_engine.tiny import TINY_T5, TINY_VAE_DIM, materialise_tiny, random_dit  # noqa: E402
from wan_engine.vae import WanVAE21  # noqa: E402

PROMPT = "a red fox trotting through fresh snow, cinematic lighting"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def random_module(factory, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """A module built on meta and filled with scaled random weights drawn on `device`."""
    with torch.device("meta"):
        module = factory()
    gen = torch.Generator(device=device).manual_seed(seed)
    weights = {}
    for name, p in module.state_dict().items():
        t = torch.randn(p.shape, generator=gen, device=device)
        t = t / math.sqrt(t[0].numel()) if t.ndim >= 2 else (0.05 * t if name.endswith("bias") else 1 + 0.1 * t)
        weights[name] = t.to(dtype)
    module.load_state_dict(weights, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def random_pipeline(model: str, device: torch.device, dtype: torch.dtype) -> WanPipeline:
    bm = BENCH_MODELS[model]
    experts = {"high_noise": random_dit(bm.dit, device, dtype, seed=1),
               "low_noise": random_dit(bm.dit, device, dtype, seed=2)}
    tiny = model == "tiny"
    t5 = random_module(lambda: UMT5Encoder(TINY_T5 if tiny else UMT5_XXL), device, dtype, seed=3)
    vae = random_module(lambda: WanVAE21(dim=TINY_VAE_DIM if tiny else 96), device, torch.float32, seed=4)
    tokenizer = PromptTokenizer(materialise_tiny("tiny") / TOKENIZER_DIR)
    return WanPipeline(bm.spec, experts, t5, tokenizer, vae, device, dtype, MemoryPlan(True, True), Path("random"))


def write_random_lora(path: Path, dit: nn.Module, rank: int, seed: int) -> Path:
    """Rank-`rank` lora_down/lora_up/alpha on every block linear of `dit` (official layout, bf16)."""
    from safetensors.torch import save_file
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, mod in dit.named_modules():
        if name.startswith("blocks.") and isinstance(mod, nn.Linear):
            out_f, in_f = mod.weight.shape
            sd[f"diffusion_model.{name}.lora_down.weight"] = (torch.randn(rank, in_f, generator=gen)
                                                              / math.sqrt(in_f)).to(torch.bfloat16)
            sd[f"diffusion_model.{name}.lora_up.weight"] = (0.01 * torch.randn(out_f, rank, generator=gen)
                                                            ).to(torch.bfloat16)
            sd[f"diffusion_model.{name}.alpha"] = torch.tensor(float(rank))
    save_file(sd, str(path))
    return path


def end_to_end(pipe: WanPipeline, size, frames: int, out: Path, steps: int | None = None, **sampling) -> dict:
    """text -> sample -> VAE decode -> MP4, each phase timed (seconds)."""
    t = {}
    started = time.perf_counter()
    plan = pipe.plan(size=size, frame_num=frames, seed=0, steps=steps, **sampling)
    text = pipe.encode_prompt(plan, PROMPT)
    sync(pipe.device)
    t["text"] = time.perf_counter() - started
    t0 = time.perf_counter()
    latents = pipe.sample(plan, text.context).latents
    sync(pipe.device)
    t["denoise"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    frames_u8 = pipe.decode(latents[0].float().cpu())
    sync(pipe.device)
    t["decode"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    write_mp4(frames_u8, out, pipe.spec.fps)
    t["mp4"] = time.perf_counter() - t0
    t["total"] = time.perf_counter() - started
    t["steps"], t["forwards_per_step"] = plan.steps.steps, len(plan.branches)
    return t


def switch_times(pipe: WanPipeline, sets: list[tuple[LoraChoice, ...]], merge: bool, switches: int) -> list[dict]:
    """Seconds of each switch between the LoRA sets in turn, split into read (and check), remove and apply (an
    unmerged swap counts as apply), the first application left out."""
    handle, times = None, []
    for i in range(switches + 1):
        cfg = LoraConfig(sets[i % len(sets)], merge=merge)
        sync(pipe.device)
        started = time.perf_counter()
        checked = read_and_check(pipe, cfg.loras)
        read = time.perf_counter()
        if handle is not None and handle.swap(pipe, cfg, checked):
            removed = read
        else:
            if handle is not None:
                handle.remove()
            sync(pipe.device)
            removed = time.perf_counter()
            handle = apply_loras(pipe, cfg, checked)
        sync(pipe.device)
        done = time.perf_counter()
        if i:
            times.append(dict(read=read - started, remove=removed - read, apply=done - removed, total=done - started))
    handle.remove()
    return times


@torch.no_grad()
def fingerprint(pipe: WanPipeline) -> list[tuple[int, ...]]:
    """Per expert parameter, sums over its raw bits: any weight that a remove did not put back bit for bit
    changes them (the base weights are too large to keep a second copy of on the card)."""
    prints = []
    for expert in pipe.experts.values():
        for p in expert.parameters():
            bits = p.view({2: torch.int16, 4: torch.int32}[p.element_size()]).long()
            prints.append(tuple(int(v) for v in torch.stack([bits.sum(), (bits * bits).sum(), bits[::7].sum()])))
    return prints


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="t2v-A14B", choices=("t2v-A14B", "tiny"))
    ap.add_argument("--size", default=None, help="W*H (default: 832*480; tiny 64*64)")
    ap.add_argument("--frames", type=int, default=None, help="default 81; tiny 5")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--tier", default="quality", help="the distilled run's tier (the 40-step run is quality)")
    ap.add_argument("--steps-quality", type=int, default=40, help="steps actually run for the quality figure")
    ap.add_argument("--switches", type=int, default=4)
    ap.add_argument("--switches-only", action="store_true", help="skip the distilled and 40-step runs")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bm = BENCH_MODELS[args.model]
    size = tuple(int(v) for v in args.size.split("*")) if args.size else bm.size
    frames = args.frames or bm.frames
    facts = {"model": args.model, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
             "size": f"{size[0]}*{size[1]}", "frames": frames, "rank": args.rank, "tier": args.tier}

    t0 = time.perf_counter()
    pipe = random_pipeline(args.model, device, dtype)
    facts["build_s"] = round(time.perf_counter() - t0, 1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = {(s, e): write_random_lora(tmp / f"{s}-{e}.safetensors", pipe.experts[f"{e}_noise"], args.rank,
                                           seed=10 * (s == "b") + (e == "low"))
                 for s in ("a", "b") for e in ("high", "low")}
        sets = [tuple(LoraChoice(str(files[(s, e)]), 1.0, e) for e in ("high", "low")) for s in ("a", "b")]

        first_read = time.perf_counter()
        for loras in sets:   # the first read of each file (the process's cache holds them afterwards)
            read_and_check(pipe, loras)
        facts["first_read_s"] = (time.perf_counter() - first_read) / len(sets)
        before = fingerprint(pipe)
        result = {**facts, "merged_switch": switch_times(pipe, sets, True, args.switches),
                  "unmerged_switch": switch_times(pipe, sets, False, args.switches)}
        result["base_bit_identical_after_switches"] = fingerprint(pipe) == before
        if not args.switches_only:
            tier = apply_tier(pipe, args.tier, TierOptions(step_caches=False))
            lora = apply_loras(pipe, LoraConfig(sets[0]))
            end_to_end(pipe, size, frames, tmp / "warm.mp4", **DISTILLED.sampling())   # warm: compile, kernels
            distilled = end_to_end(pipe, size, frames, tmp / "distilled.mp4", **DISTILLED.sampling())
            lora.remove()
            tier.remove()
            quality_tier = apply_tier(pipe, "quality")
            n = min(args.steps_quality, bm.spec.steps)
            quality = end_to_end(pipe, size, frames, tmp / "quality.mp4", steps=n)
            quality_tier.remove()
            per_step = quality["denoise"] / n
            quality_total = quality["total"] - quality["denoise"] + per_step * bm.spec.steps
            result.update(distilled=distilled, quality=quality, quality_steps_run=n, quality_total_40_s=quality_total)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))

    def fmt(d: dict) -> str:
        return " ".join(f"{k} {d[k]:.2f}" for k in ("text", "denoise", "decode", "mp4", "total"))

    print(json.dumps(facts))
    print(f"{'what':<34} {'seconds':>9}  detail")
    if not args.switches_only:
        print(f"{'distilled end to end (4 steps)':<34} {distilled['total']:>9.2f}  {fmt(distilled)}")
        label = f"quality {bm.spec.steps} steps" + ("" if n == bm.spec.steps else f" (from {n})")
        print(f"{label:<34} {quality_total:>9.2f}  {fmt(quality)}; denoise/step {per_step:.3f}")
        print(f"{'ratio quality / distilled':<34} {quality_total / distilled['total']:>9.1f}x")
    print(f"{'LoRA files read, first time (set)':<34} {facts['first_read_s']:>9.2f}  both experts, rank {args.rank}")
    for mode in ("merged", "unmerged"):
        times = result[f"{mode}_switch"]
        parts = " ".join(f"{k} {statistics.median(t[k] for t in times):.3f}" for k in ("read", "remove", "apply"))
        print(f"{f'LoRA switch, {mode} (median)':<34} {statistics.median(t['total'] for t in times):>9.2f}  "
              f"{parts}; both experts, rank {args.rank}")
    print(f"base weights bit-identical after every switch and the last remove: "
          f"{result['base_bit_identical_after_switches']}")
    return 0 if result["base_bit_identical_after_switches"] else 1


if __name__ == "__main__":
    sys.exit(main())
