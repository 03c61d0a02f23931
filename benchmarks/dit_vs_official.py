"""One real-size A14B expert forward: our DiT against the official WanModel and diffusers, same weights and inputs.

Random bf16 weights of the real size (5120 wide, 40 blocks) are materialised once and shared
by every model (same tensors, no second copy). In one process, on one card:
- official: the `WanModel` as its pipelines run it (bf16 weights as --convert_model_dtype, under
  bf16 autocast), its CUDA-only flash_attention replaced by torch SDPA on bf16 q/k/v (no flash_attn
  wheel exists here);
- ours: our WanDiT, eager (the quality tier's forward);
- diffusers: diffusers' `WanTransformer3DModel` in bf16 with the weights renamed to its keys (its
  `_keep_in_fp32_modules` upcast, as `from_pretrained(torch_dtype=bfloat16)` leaves them), eager;
- diffusers-compiled: the same after `compile_repeated_blocks(fullgraph=True)`, as its docs recommend
  (first call = compile + one forward);
- ours-compiled (--ours-compiled): our blocks through `patches.compile.apply_compile` (the balanced
  tier's forward);
- ours-fa4 / ours-compiled-fa4 (--fa4): the same two with FlashAttention-4 installed through
  `patches.attention` (needs the flash-attn-4 package and a Hopper/Blackwell GPU);
- the floor: linear FLOPs at the measured 8192^3 bf16 GEMM rate + attention FLOPs at the measured
  SDPA rate (1 x 40 heads x L x 128, bf16), both measured in the same run; with --fa4 also the floor
  at the FA4 rate measured at the same shape.
Prints each model's first-call and median forward time (after the first call), peak memory, its
ratios to the official, diffusers and the floor, and its relative error against the official output;
then each model's energy per forward, mean power and SM clock (NVML, patches.power) beside the
sustained floor (the two rates held for a forward's length, when the card sits at its power limit).

    python benchmarks/dit_vs_official.py --size 832*480 --frames 81

Needs a CUDA GPU and the oracle package (wan22 2.2.11 + diffusers 0.42.1, see tests/oracle).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch._dynamo  # noqa: F401  bind the real torch.cuda.current_device before load_official() patches it
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "oracle"))

from patches.power import PowerMeter, PowerReading  # noqa: E402
from wan_engine.dit import DiTConfig  # noqa: E402
from wan_engine.sizes import Size  # noqa: E402
from wan_engine.tiny import random_dit  # noqa: E402

A14B = dict(model_type="t2v", in_dim=16, out_dim=16, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
SMOKE = dict(A14B, dim=256, ffn_dim=512, num_heads=2, num_layers=2)   # --smoke: check the script on a CPU
MODELS = ("official", "ours", "diffusers", "diffusers-compiled")
SUSTAIN_S = 3.0   # how long the sustained floor holds each rate: about one 480p A14B forward on an H100/H200

# Official (= our) state-dict names -> diffusers WanTransformer3DModel names. Note the swap: diffusers'
# block norm2 is the cross-attention norm (official norm3); its FFN norm has no weights.
DIFFUSERS_TOP = {"text_embedding.0": "condition_embedder.text_embedder.linear_1",
                 "text_embedding.2": "condition_embedder.text_embedder.linear_2",
                 "time_embedding.0": "condition_embedder.time_embedder.linear_1",
                 "time_embedding.2": "condition_embedder.time_embedder.linear_2",
                 "time_projection.1": "condition_embedder.time_proj",
                 "head.head": "proj_out", "head.modulation": "scale_shift_table",
                 "patch_embedding": "patch_embedding"}
DIFFUSERS_BLOCK = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
                   "self_attn.o": "attn1.to_out.0", "self_attn.norm_q": "attn1.norm_q",
                   "self_attn.norm_k": "attn1.norm_k", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
                   "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0",
                   "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
                   "norm3": "norm2", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2", "modulation": "scale_shift_table"}
DIFFUSERS_FP32 = ("time_embedder", "scale_shift_table", "norm2")   # its _keep_in_fp32_modules that hold weights


def diffusers_key(key: str) -> str:
    table, prefix, rest = DIFFUSERS_TOP, "", key
    if key.startswith("blocks."):
        _, i, rest = key.split(".", 2)
        table, prefix = DIFFUSERS_BLOCK, f"blocks.{i}."
    for ours, theirs in table.items():
        if rest == ours or rest.startswith(ours + "."):
            return prefix + theirs + rest[len(ours):]
    raise KeyError(f"no diffusers name for {key}")


def sdpa_attention(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None, q_scale=None,
                   causal=False, window_size=(-1, -1), deterministic=False, dtype=torch.bfloat16, version=None):
    """The official flash_attention contract ([B, L, N, C], q/k/v cast to bf16) on torch SDPA."""
    out_dtype = q.dtype
    q, k, v = (t.to(dtype) for t in (q, k, v))
    if q_scale is not None:
        q = q * q_scale
    mask = None
    if k_lens is not None and bool((torch.as_tensor(k_lens) < k.shape[1]).any()):
        keep = torch.arange(k.shape[1], device=q.device)[None, :] < torch.as_tensor(k_lens, device=q.device)[:, None]
        mask = keep[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, is_causal=causal, scale=softmax_scale)
    return out.transpose(1, 2).to(out_dtype).contiguous()


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int, dev: torch.device) -> tuple[float, list[float], torch.Tensor, PowerReading | None]:
    """(first-call seconds, seconds of each later call, output, the card's power reading over the later
    calls); the first call is the warm-up."""
    _sync(dev)
    t0 = time.perf_counter()
    out = fn()
    _sync(dev)
    first = time.perf_counter() - t0
    times = []
    with PowerMeter(dev) as meter:
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn()
            _sync(dev)
            times.append(time.perf_counter() - t0)
    return first, times, out, meter.reading


def measure_floor(cfg: DiTConfig, tokens: int, dev: torch.device, text_tokens: int = 512,
                  fa4: bool = False) -> dict:
    """The floor of one forward: linear FLOPs at the 8192^3 bf16 GEMM rate + attention FLOPs at the
    SDPA rate at Wan's self-attention shape, both measured now in short bursts (the issue's floor).

    Also the sustained floor: the same two rates each held for about `SUSTAIN_S` seconds, as long as a
    forward lasts. On a card that reaches its power limit (H100/H200 at 700 W) the clock then drops and
    the rates with it; that floor is what a forward can approach."""
    def rate(fn, flops, repeats=10):
        fn()
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        _sync(dev)
        return flops * repeats / (time.perf_counter() - t0)

    def sustained(fn, flops, burst_rate):
        repeats = max(1, round(SUSTAIN_S * burst_rate / flops)) if dev.type == "cuda" else 1
        with PowerMeter(dev) as meter:
            r = rate(fn, flops, repeats)
        return r, meter.reading

    n = 8192 if dev.type == "cuda" else 512
    a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
    gemm = rate(lambda: a @ b, 2 * n**3)
    d = cfg.head_dim
    q, k, v = (torch.randn(1, cfg.num_heads, tokens, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
    attn_flops = 4 * tokens * tokens * cfg.num_heads * d
    sdpa = rate(lambda: F.scaled_dot_product_attention(q, k, v), attn_flops, repeats=5)
    attn = cfg.num_layers * (4 * tokens * tokens * cfg.dim + 4 * tokens * text_tokens * cfg.dim)
    linear = cfg.flops_per_forward(tokens, text_tokens) - attn
    gemm_held, gemm_power = sustained(lambda: a @ b, 2 * n**3, gemm)
    sdpa_held, sdpa_power = sustained(lambda: F.scaled_dot_product_attention(q, k, v), attn_flops, sdpa)
    floor = dict(gemm_tflops=gemm / 1e12, sdpa_tflops=sdpa / 1e12, linear_tflop=linear / 1e12,
                 attention_tflop=attn / 1e12, seconds=linear / gemm + attn / sdpa,
                 sustained=dict(gemm_tflops=gemm_held / 1e12, sdpa_tflops=sdpa_held / 1e12,
                                seconds=linear / gemm_held + attn / sdpa_held,
                                gemm_power=power_dict(gemm_power), sdpa_power=power_dict(sdpa_power)))
    if fa4:
        from patches.attention import fa4_attention

        t0 = time.perf_counter()
        out = fa4_attention(q, k, v)   # the first call JIT-compiles the kernel
        _sync(dev)
        floor["fa4_first_s"] = time.perf_counter() - t0
        fa4_rate = rate(lambda: fa4_attention(q, k, v), attn_flops, repeats=5)
        ref = F.scaled_dot_product_attention(q, k, v).float()
        floor.update(fa4_tflops=fa4_rate / 1e12, fa4_seconds=linear / gemm + attn / fa4_rate,
                     fa4_vs_sdpa_rel=((out.float() - ref).norm() / ref.norm()).item())
        fa4_held, fa4_power = sustained(lambda: fa4_attention(q, k, v), attn_flops, fa4_rate)
        floor["sustained"].update(fa4_tflops=fa4_held / 1e12, fa4_seconds=linear / gemm_held + attn / fa4_held,
                                  fa4_power=power_dict(fa4_power))
    return floor


def power_dict(reading: PowerReading | None, calls: int = 1) -> dict | None:
    """A power reading as JSON-able numbers, its energy divided over `calls` (joules per call)."""
    if reading is None:
        return None
    return dict(joules=reading.joules / calls, watts=reading.watts, sm_mhz=reading.sm_mhz,
                power_capped=reading.power_capped)


def build_diffusers(arch: dict, sd: dict, dev: torch.device):
    """diffusers' WanTransformer3DModel holding the same weight tensors (renamed), built on meta."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed, WanTransformer3DModel

    kwargs = dict(patch_size=(1, 2, 2), num_attention_heads=arch["num_heads"],
                  attention_head_dim=arch["dim"] // arch["num_heads"], in_channels=arch["in_dim"],
                  out_channels=arch["out_dim"], text_dim=4096, freq_dim=256, ffn_dim=arch["ffn_dim"],
                  num_layers=arch["num_layers"], cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
    with torch.device("meta"):
        model = WanTransformer3DModel(**kwargs)
    renamed = {}
    for key, t in sd.items():
        name = diffusers_key(key)
        renamed[name] = t.float() if any(part in name.split(".") for part in DIFFUSERS_FP32) else t
    model.load_state_dict(renamed, assign=True, strict=True)
    model.rope = WanRotaryPosEmbed(kwargs["attention_head_dim"], kwargs["patch_size"], 1024).to(dev)
    return model.eval().requires_grad_(False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="832*480", help="W*H")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--timestep", type=int, default=900)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    ap.add_argument("--ours-compiled", action="store_true",
                    help="also our blocks compiled by patches.compile.apply_compile (balanced tier's forward)")
    ap.add_argument("--fa4", action="store_true",
                    help="also ours (and ours compiled, with --ours-compiled) on FlashAttention-4, and the FA4 floor")
    ap.add_argument("--json", default=None, help="write the results here too")
    ap.add_argument("--smoke", action="store_true", help="toy width on the CPU, to check the script itself")
    args = ap.parse_args()
    arch = SMOKE if args.smoke else A14B
    wdtype = torch.float32 if args.smoke else torch.bfloat16
    w, h = Size.parse(args.size)
    dev = torch.device("cpu" if args.smoke else "cuda")
    models = [m for m in args.models.split(",") if m]
    unknown = set(models) - set(MODELS)
    if unknown:
        ap.error(f"unknown models {sorted(unknown)}")
    if dev.type != "cuda":
        models = [m for m in models if not m.endswith("compiled")]
    torch.manual_seed(0)

    from official import load_official

    W = load_official()
    W.m_model.flash_attention = sdpa_attention
    with torch.device("meta"):
        official = W.WanModel(**arch)
    ours = random_dit(DiTConfig(**arch), dev, wdtype)
    sd = ours.state_dict()
    official.load_state_dict(sd, assign=True, strict=True)   # the same tensors, no copy
    _rebuild_freqs(W, official, dev)
    official.eval().requires_grad_(False)
    gen = torch.Generator(device=dev).manual_seed(1)   # the inputs' stream
    diffusers = build_diffusers(arch, sd, dev) if any(m.startswith("diffusers") for m in models) else None

    lat = (16, (args.frames - 1) // 4 + 1, h // 8, w // 8)
    tokens = lat[1] * lat[2] * lat[3] // 4
    x = torch.randn(lat, generator=gen, device=dev)
    ctx = torch.randn(120, 4096, generator=gen, device=dev).to(wdtype)
    t = torch.tensor([args.timestep], device=dev)
    ctx_512 = F.pad(ctx, (0, 0, 0, 512 - ctx.shape[0]))[None]   # diffusers' pipeline pads prompts to 512 with zeros
    cfg = DiTConfig(**arch)
    floor = measure_floor(cfg, tokens, dev, fa4=args.fa4)

    def run_official():
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            return official([x], t=t, context=[ctx], seq_len=tokens)[0]

    def run_ours():
        with torch.no_grad():
            return ours(x[None], t, ctx[None])[0]

    def run_diffusers():
        with torch.no_grad():
            return diffusers(x[None].to(wdtype), t, ctx_512, return_dict=False)[0][0]

    runs = {"official": run_official, "ours": run_ours, "diffusers": run_diffusers,
            "diffusers-compiled": run_diffusers}
    if args.fa4:
        models.append("ours-fa4")
    if args.ours_compiled:
        models += ["ours-compiled"] + (["ours-compiled-fa4"] if args.fa4 else [])
    ours_pipe = types.SimpleNamespace(experts={"expert": ours}, device=dev, dtype=wdtype,
                                      repeated_blocks=lambda: list(ours.blocks))
    patched = {}   # patch name -> handle, applied on our model in the order the variants need them
    results = {}
    for name in models:
        if name == "diffusers-compiled":
            diffusers.compile_repeated_blocks(fullgraph=True)
        elif name.startswith("ours"):
            runs[name] = run_ours
            want_fa4, want_compile = name.endswith("fa4"), "compiled" in name
            if ("attention" in patched) != want_fa4:
                if want_fa4:
                    from patches.attention import AttentionConfig, apply_attention

                    patched["attention"] = apply_attention(ours_pipe, AttentionConfig("fa4"))
                else:
                    patched.pop("attention").remove()
            if ("compile" in patched) != want_compile:
                if want_compile:
                    from patches.compile import apply_compile

                    patched["compile"] = apply_compile(ours_pipe)
                else:
                    patched.pop("compile").remove()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            first, times, out, power = timed(runs[name], args.repeats, dev)
        except Exception as e:  # a compiled or FA4 variant that fails must not cost the other results
            if name in ("official", "ours", "diffusers"):
                raise
            print(f"{name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            continue
        peak = torch.cuda.max_memory_allocated() / 1e9 if dev.type == "cuda" else float("nan")
        results[name] = dict(first_s=first, seconds=statistics.median(times), all=times, peak_gb=peak,
                             power=power_dict(power, len(times)), out=out.float())
        print(f"{name}: first call {first:.3f} s, median {results[name]['seconds']:.3f} s", flush=True)

    ref = results.get("official")
    for r in results.values():
        r["rel_err"] = ((r["out"] - ref["out"]).norm() / ref["out"].norm()).item() if ref else float("nan")
    flops = cfg.flops_per_forward(tokens)
    card = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (smoke)"
    print(f"\n{card}, torch {torch.__version__}, {w}x{h}, {args.frames} frames, {tokens} tokens, t={args.timestep}")
    print(f"floor {floor['seconds']:.3f} s = {floor['linear_tflop']:.0f} TFLOP linear at {floor['gemm_tflops']:.0f} "
          f"TFLOP/s (8192^3 bf16 GEMM) + {floor['attention_tflop']:.0f} TFLOP attention at "
          f"{floor['sdpa_tflops']:.0f} TFLOP/s (SDPA 1x{cfg.num_heads}x{tokens}x{cfg.head_dim})")
    if "fa4_tflops" in floor:
        print(f"FA4 floor {floor['fa4_seconds']:.3f} s (attention at {floor['fa4_tflops']:.0f} TFLOP/s, "
              f"{floor['fa4_tflops'] / floor['sdpa_tflops']:.2f}x SDPA; first call {floor['fa4_first_s']:.1f} s; "
              f"rel. diff. vs SDPA {floor['fa4_vs_sdpa_rel']:.1e})")
    print(f"{'model':<19} {'first s':>8} {'median s':>9} {'TFLOP/s':>8} {'/official':>9} {'/diffusers':>10} "
          f"{'/floor':>7} {'peak GB':>8} {'rel err':>8}")

    def ratio(r, other):
        return f"{r['seconds'] / results[other]['seconds']:.3f}" if other in results else "-"

    for name, r in results.items():
        print(f"{name:<19} {r['first_s']:8.2f} {r['seconds']:9.3f} {flops / r['seconds'] / 1e12:8.0f} "
              f"{ratio(r, 'official'):>9} {ratio(r, 'diffusers'):>10} {r['seconds'] / floor['seconds']:7.3f} "
              f"{r['peak_gb']:8.1f} {r['rel_err']:8.1e}")
    held = floor["sustained"]
    print(f"sustained floor {held['seconds']:.3f} s: GEMM {held['gemm_tflops']:.0f}, SDPA {held['sdpa_tflops']:.0f} "
          f"TFLOP/s, each held {SUSTAIN_S:.0f} s")
    if "fa4_seconds" in held:
        print(f"sustained FA4 floor {held['fa4_seconds']:.3f} s: FA4 {held['fa4_tflops']:.0f} TFLOP/s held")
    print(f"\n{'energy':<19} {'J/forward':>10} {'W':>6} {'SM MHz':>7} {'capped':>7} {'/sust. floor':>13}")
    kernels = [(f"(sustained {k})", dict(power=held.get(f"{k.lower()}_power"))) for k in ("GEMM", "SDPA", "FA4")]
    for name, r in list(results.items()) + kernels:
        pw = r["power"]
        if pw is None:
            continue
        joules = f"{pw['joules']:10.0f}" if "seconds" in r else f"{'-':>10}"
        own_floor = held["fa4_seconds"] if name.endswith("fa4") else held["seconds"]
        vs_floor = f"{r['seconds'] / own_floor:13.3f}" if "seconds" in r else f"{'-':>13}"
        print(f"{name:<19} {joules} {pw['watts']:6.0f} {pw['sm_mhz']:7.0f} {pw['power_capped']:7.0%} {vs_floor}")
    for name in [n for n in results if n.startswith("ours")]:
        if "diffusers-compiled" in results:
            print(f"{name} / diffusers compiled: {ratio(results[name], 'diffusers-compiled')}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            card=card, torch=torch.__version__, size=[w, h], frames=args.frames, tokens=tokens, floor=floor,
            **{n: {k: v for k, v in r.items() if k != "out"} for n, r in results.items()}), indent=2))


def _rebuild_freqs(W, official, dev):
    """The official model computes its complex RoPE table in __init__; rebuild it on the GPU
    because the model was built on the meta device."""
    d = official.dim // official.num_heads
    official.freqs = torch.cat([
        W.m_model.rope_params(1024, d - 4 * (d // 6)),
        W.m_model.rope_params(1024, 2 * (d // 6)),
        W.m_model.rope_params(1024, 2 * (d // 6)),
    ], dim=1).to(dev)


if __name__ == "__main__":
    main()
