"""LoRA references from the test-only oracles, run in the oracle venv (tests/oracle/README.md): writes
`refs/f_lora.pt`, which tests/patches/test_lora_conformance.py compares the engine with.

1. Merged weights by diffusers 0.42.1's Wan LoRA loader (`WanLoraLoaderMixin.lora_state_dict`, which converts
   the official / lightx2v and the musubi `lora_unet_` layouts, then PEFT's `load_lora_adapter` + `fuse_lora`)
   on the high-noise DiT of the committed t2v-A14B-tiny fixture, for a synthetic LoRA in each layout
   (tests/lora_files.py writes them; the test writes the same files again and checks their sha256).
2. A 4-step distilled loop (Wan2.2-Lightning: Euler on linspace(1000, 0, 5) shifted by 5, guide scale 1, the
   expert switch at t >= 875) by the official WanModel on weights merged with W + (alpha / rank) * up @ down
   (+ diff, + diff_b), one LoRA per expert.

    .venv-oracle/bin/python tests/oracle/make_lora_refs.py --out tests/fixtures/oracle/refs
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
from official import load_official  # noqa: E402

from tests.lora_files import in_layout, official_lora, write_lora  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
FIXTURE = ROOT / "tests" / "fixtures" / "oracle" / "t2v-A14B-tiny"   # --fixture: regenerate.sh's new one
STRENGTH = 0.8
# (layout, seed, diff_b): the musubi converter takes lora_down/lora_up/alpha only
MERGE_CASES = (("official", 11, True), ("diffusers", 12, True), ("comfy", 13, False))
LOOP_LORAS = {"high_noise_model": 21, "low_noise_model": 22}
_OURS_TO_DIFFUSERS = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
                      "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
                      "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0", "ffn.0": "ffn.net.0.proj",
                      "ffn.2": "ffn.net.2"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def diffusers_transformer(fixture: Path, sub: str):
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    sd = load_file(str(fixture / sub / "diffusion_pytorch_model.safetensors"))
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16,
                                  out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=128, num_layers=2,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
    model.load_state_dict(convert_wan_transformer_to_diffusers(sd), strict=True)
    return model.eval().requires_grad_(False)


def diffusers_merge(fixture: Path, path: Path) -> dict[str, torch.Tensor]:
    """The block linears of the high-noise DiT after diffusers loads and fuses the LoRA at STRENGTH, in our names."""
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin
    model = diffusers_transformer(fixture, "high_noise_model")
    state = WanLoraLoaderMixin.lora_state_dict(str(path))
    model.load_lora_adapter(state, adapter_name="x", prefix="transformer")
    model.fuse_lora(lora_scale=STRENGTH, adapter_names=["x"])
    model.unload_lora()
    params = dict(model.named_parameters())
    out = {}
    for i in range(2):
        for ours, theirs in _OURS_TO_DIFFUSERS.items():
            for kind in ("weight", "bias"):
                out[f"blocks.{i}.{ours}.{kind}"] = params[f"blocks.{i}.{theirs}.{kind}"].detach().clone()
    return out


def official_merge(model, sd: dict[str, torch.Tensor]) -> None:
    """W + (alpha / rank) * up @ down (+ diff), b + diff_b, in place on an official WanModel."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, v in sd.items():
            if key.endswith(".lora_down.weight"):
                m = key.removesuffix(".lora_down.weight")
                up = sd[f"{m}.lora_up.weight"]
                scale = float(sd[f"{m}.alpha"]) / v.shape[0] if f"{m}.alpha" in sd else 1.0
                params[f"{m}.weight"] += scale * (up @ v)
            elif key.endswith(".diff_b"):
                params[f"{key.removesuffix('.diff_b')}.bias"] += v
            elif key.endswith(".diff"):
                m = key.removesuffix(".diff")
                params[m if m in params else f"{m}.weight"] += v


@torch.no_grad()
def lightning_loop(high, low, noise: torch.Tensor, context: torch.Tensor, seq_len: int) -> dict:
    """Wan2.2-Lightning's T2V loop at guide scale 1 (the cond forward only) with its Euler scheduler."""
    sigmas = torch.from_numpy(np.linspace(1000, 0, 5, dtype=np.float32)) / 1000
    sigmas = 5.0 * sigmas / (1 + (5.0 - 1) * sigmas)
    timesteps = (sigmas * 1000)[:-1]
    latents, steps = noise, []
    for i, t in enumerate(timesteps):
        model = high if t.item() >= 0.875 * 1000 else low
        pred = model([latents], t=torch.stack([t]), context=[context], seq_len=seq_len)[0]
        latents = latents.float() + (sigmas[i + 1] - sigmas[i]) * pred
        steps.append(dict(t=t.clone(), model="high_noise_model" if model is high else "low_noise_model",
                          noise_pred=pred, latents_after=latents))
    return dict(timesteps=timesteps, sigmas=sigmas, steps=steps, final_latents=latents)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "oracle" / "refs"))
    ap.add_argument("--fixture", default=str(FIXTURE))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    fixture = Path(args.fixture)
    torch.set_num_threads(args.threads)
    W = load_official()
    out = dict(strength=STRENGTH, merges={}, note=__doc__)
    with tempfile.TemporaryDirectory() as tmp:
        for layout, seed, diff_b in MERGE_CASES:
            path = write_lora(Path(tmp) / f"{layout}.safetensors",
                              in_layout(official_lora(seed, diff_b=diff_b), layout))
            out["merges"][layout] = dict(seed=seed, diff_b=diff_b, sha256=sha256(path),
                                         weights=diffusers_merge(fixture, path))
        models = {}
        for sub, seed in LOOP_LORAS.items():
            model = W.WanModel.from_pretrained(str(fixture), subfolder=sub).eval().requires_grad_(False)
            official_merge(model, official_lora(seed, extras=True))
            models[sub] = model
    g = torch.Generator().manual_seed(31)
    noise = torch.randn(16, 2, 8, 8, generator=g)          # 64x64, 5 frames
    context = torch.randn(12, 4096, generator=g)
    loop = lightning_loop(models["high_noise_model"], models["low_noise_model"], noise, context, seq_len=32)
    out["loop"] = dict(loras={k: dict(seed=s, extras=True) for k, s in LOOP_LORAS.items()}, noise=noise,
                       context=context, size=(64, 64), frame_num=5, **loop)
    dest = Path(args.out) / "f_lora.pt"
    torch.save(out, dest)
    print(f"wrote {dest} ({dest.stat().st_size / 2**10:.0f} KiB)")


if __name__ == "__main__":
    main()
