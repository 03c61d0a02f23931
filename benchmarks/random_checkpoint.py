"""Write a real-size T2V-A14B or I2V-A14B checkpoint folder of random weights in the official layout.

For device runs that need the whole product at the real size (loading, the resident worker, the flow) where the
real weights cannot be downloaded. The folder is what `load_pipeline` and the flow accept, like a download:

    <out>/high_noise_model/{config.json, diffusion_pytorch_model.safetensors.index.json, shards}   bf16
    <out>/low_noise_model/...   (--share-experts: its shards are links to the high-noise ones: 28.6 GB less disk)
    <out>/models_t5_umt5-xxl-enc-bf16.pth   umT5-XXL encoder, bf16 (11.4 GB)
    <out>/Wan2.1_VAE.pth                    float32
    <out>/google/umt5-xxl/tokenizer.json    the tiny preset's tokenizer (its ids are valid umT5 ids)

Tensors are drawn one at a time on `--device` (the GPU: seconds for 40 GB) and written in shards, so no model
exists in memory whole.

    python benchmarks/random_checkpoint.py --out /tmp/ckpt/Wan2.2-T2V-A14B --share-experts
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from wan_engine.configs import HIGH_NOISE_DIR, LOW_NOISE_DIR, T5_FILE, TOKENIZER_DIR, VAE21_FILE  # noqa: E402
from wan_engine.dit import DiTConfig, WanDiT  # noqa: E402
from wan_engine.loading import SAFETENSORS_INDEX  # noqa: E402
from wan_engine.t5 import T5Config, UMT5Encoder  # noqa: E402
from wan_engine.tiny import TINY_DIT, _tokenizer_json, random_weights  # noqa: E402
from wan_engine.vae import WanVAE21  # noqa: E402

A14B = dict(TINY_DIT, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
UMT5_XXL = T5Config(vocab_size=256384, dim=4096, dim_attn=4096, dim_ffn=10240, num_heads=64, num_layers=24)
VAE21_DIM = 96
SHARD_BYTES = 5 << 30


def _meta(factory):
    with torch.device("meta"):
        return factory()


def write_dit(folder: Path, cfg: dict, device: str, seed: int) -> int:
    """One expert as safetensors shards of at most SHARD_BYTES plus their index; returns the bytes written."""
    folder.mkdir(parents=True)
    model = _meta(lambda: WanDiT(DiTConfig(**cfg)))
    shard, size, number, weight_map, total = {}, 0, 0, {}, 0

    def flush():
        nonlocal shard, size, number
        number += 1
        name = f"diffusion_pytorch_model-{number:05d}.safetensors"
        save_file(shard, str(folder / name))
        weight_map.update(dict.fromkeys(shard, name))
        shard, size = {}, 0

    for name, t in random_weights(model, device, torch.bfloat16, seed):
        shard[name] = t.cpu().contiguous()
        size += t.numel() * t.element_size()
        total += t.numel() * t.element_size()
        if size >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    (folder / SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                        "weight_map": weight_map}, indent=1))
    (folder / "config.json").write_text(json.dumps(dict(_class_name="WanModel", **cfg), indent=2))
    return total


def link_expert(source: Path, folder: Path) -> None:
    """`folder` as a second expert that reads `source`'s shards (hard links: one copy on disk)."""
    folder.mkdir(parents=True)
    for path in source.iterdir():
        os.link(path, folder / path.name)


def write_pth(path: Path, model: torch.nn.Module, device: str, dtype: torch.dtype, seed: int) -> None:
    torch.save({k: t.cpu().contiguous() for k, t in random_weights(model, device, dtype, seed)}, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the checkpoint folder to write (must not exist)")
    parser.add_argument("--task", choices=("t2v", "i2v"), default="t2v")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--share-experts", action="store_true", help="the low-noise expert links to the "
                        "high-noise shards (same weights, half the disk)")
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"--out {args.out} exists; give a new folder")
    started = time.perf_counter()
    cfg = dict(A14B, model_type=args.task, in_dim=36 if args.task == "i2v" else 16, out_dim=16)
    dit_bytes = write_dit(args.out / HIGH_NOISE_DIR, cfg, args.device, seed=1)
    if args.share_experts:
        link_expert(args.out / HIGH_NOISE_DIR, args.out / LOW_NOISE_DIR)
    else:
        write_dit(args.out / LOW_NOISE_DIR, cfg, args.device, seed=2)
    write_pth(args.out / T5_FILE, _meta(lambda: UMT5Encoder(UMT5_XXL)), args.device, torch.bfloat16, seed=3)
    write_pth(args.out / VAE21_FILE, _meta(lambda: WanVAE21(dim=VAE21_DIM)), args.device, torch.float32, seed=4)
    tokenizer = args.out / TOKENIZER_DIR
    tokenizer.mkdir(parents=True)
    (tokenizer / "tokenizer.json").write_text(json.dumps(_tokenizer_json(), ensure_ascii=False))
    print(f"wrote {args.out}: {args.task}-A14B, experts {dit_bytes / 1e9:.1f} GB each"
          f"{' (one copy, linked)' if args.share_experts else ''}, in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
