"""One real-size A14B expert forward: our DiT against the official WanModel, same weights and inputs.

Random bf16 weights of the real size (5120 wide, 40 blocks) are materialised once and shared
by both models (same tensors, no second copy). The official model runs as its pipelines run
it (bf16 weights as --convert_model_dtype, under bf16 autocast), with its CUDA-only
flash_attention replaced by torch SDPA on bf16 q/k/v (no flash_attn wheel exists here).
Prints the median forward time of each (after warm-up), peak memory and the relative error
of our output against the official one.

    python benchmarks/dit_vs_official.py --size 832*480 --frames 81

Needs a CUDA GPU and the oracle package (wan22 2.2.11 + diffusers 0.42.1, see tests/oracle).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "oracle"))

from wan_engine.dit import DiTConfig, WanDiT  # noqa: E402

A14B = dict(model_type="t2v", in_dim=16, out_dim=16, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
SMOKE = dict(A14B, dim=256, ffn_dim=512, num_heads=2, num_layers=2)   # --smoke: check the script on a CPU


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


def timed(fn, repeats: int) -> tuple[list[float], torch.Tensor]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="832*480", help="W*H")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--timestep", type=int, default=900)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="write the results here too")
    ap.add_argument("--smoke", action="store_true", help="toy width on the CPU, to check the script itself")
    args = ap.parse_args()
    arch = SMOKE if args.smoke else A14B
    wdtype = torch.float32 if args.smoke else torch.bfloat16
    w, h = (int(v) for v in args.size.split("*"))
    dev = torch.device("cpu" if args.smoke else "cuda")
    torch.manual_seed(0)

    from official import load_official

    W = load_official()
    W.m_model.flash_attention = sdpa_attention
    with torch.device("meta"):
        official = W.WanModel(**arch)
    with torch.device("meta"):
        ours = WanDiT(DiTConfig(**arch))
    gen = torch.Generator(device=dev).manual_seed(0)
    sd = {}
    for name, p in ours.state_dict().items():
        t = torch.randn(p.shape, generator=gen, device=dev, dtype=torch.float32)
        if name.endswith("modulation"):
            t = t / p.shape[-1] ** 0.5
        elif t.ndim >= 2:
            t = t / t[0].numel() ** 0.5
        elif name.endswith("bias"):
            t = 0.05 * t
        else:
            t = 1 + 0.1 * t
        sd[name] = t.to(wdtype)
    official.load_state_dict(sd, assign=True, strict=True)
    ours.load_state_dict(sd, assign=True, strict=True)
    _rebuild_freqs(W, official, dev)
    official.eval().requires_grad_(False)
    ours.eval().requires_grad_(False)

    lat = (16, (args.frames - 1) // 4 + 1, h // 8, w // 8)
    tokens = lat[1] * lat[2] * lat[3] // 4
    x = torch.randn(lat, generator=gen, device=dev)
    ctx = torch.randn(120, 4096, generator=gen, device=dev).to(wdtype)
    t = torch.tensor([args.timestep], device=dev)

    def run_official():
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            return official([x], t=t, context=[ctx], seq_len=tokens)[0]

    def run_ours():
        with torch.no_grad():
            return ours(x[None], t, ctx[None])[0]

    results = {}
    for name, fn in (("official", run_official), ("ours", run_ours)):
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times, out = timed(fn, args.repeats)
        peak = torch.cuda.max_memory_allocated() / 1e9 if dev.type == "cuda" else float("nan")
        results[name] = dict(seconds=statistics.median(times), all=times, peak_gb=peak, out=out.float())
    err = ((results["ours"]["out"] - results["official"]["out"]).norm()
           / results["official"]["out"].norm()).item()
    flops = DiTConfig(**arch).flops_per_forward(tokens)
    card = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (smoke)"
    print(f"\n{card}, torch {torch.__version__}, {w}x{h}, {args.frames} frames, {tokens} tokens, t={args.timestep}")
    print(f"{'model':<10} {'median s':>9} {'peak GB':>8} {'TFLOP/s':>8}")
    for name in ("official", "ours"):
        r = results[name]
        rate = f"{flops / r['seconds'] / 1e12:8.0f}" if flops else "       -"
        print(f"{name:<10} {r['seconds']:9.3f} {r['peak_gb']:8.1f} {rate}")
    print(f"ours / official time: {results['ours']['seconds'] / results['official']['seconds']:.3f}")
    print(f"relative error ours vs official: {err:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            card=card, torch=torch.__version__, size=[w, h], frames=args.frames, tokens=tokens, rel_err=err,
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
