"""The `tiny` presets: random-weight Wan2.2 models small enough for a CPU in seconds.

They have the real architecture at toy width (DiT width 64, 2 blocks; umT5 with 2 narrow
layers but the real 4096-wide output the DiT expects; VAE base width 4) and a small
Unigram tokenizer. `materialise_tiny` writes them once as an official-layout folder in a
cache directory, so they are loaded through exactly the same loader as real weights.
Weights are a pure function of the seed: the same seed writes byte-identical tensors.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import string
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .configs import (
    DEFAULT_NEGATIVE_PROMPT,
    HIGH_NOISE_DIR,
    LOW_NOISE_DIR,
    MODEL_SPECS,
    T5_FILE,
    TINY_PRESETS,
    TOKENIZER_DIR,
)
from .dit import DiTConfig, WanDiT
from .t5 import T5Config, UMT5Encoder
from .vae import WanVAE21
from .vae22 import WanVAE22

TINY_DIT = dict(dim=64, ffn_dim=128, freq_dim=256, num_heads=2, num_layers=2, text_len=512, eps=1e-6)
TINY_T5 = T5Config(vocab_size=256, dim=4096, dim_attn=16, dim_ffn=32, num_heads=2, num_layers=2)
TINY_VAE_DIM = 4   # the 2.2 VAE's encoder and decoder widths too
DEFAULT_SEED = 2025
# bump when what tiny.py writes changes, so stale cache folders are not reused
FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    root = os.environ.get("WAN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "wanflow")
    return Path(root)


def _scaled(name: str, t: torch.Tensor) -> torch.Tensor:
    """A standard-normal draw `t` scaled for parameter `name`: matrices ~ N(0, 1/fan_in), biases
    small, norm scales near 1, modulation tables ~ N(0, 1/dim)."""
    if name.endswith("modulation"):
        return t / math.sqrt(t.shape[-1])
    if t.ndim >= 2:
        return t / math.sqrt(t[0].numel())
    if name.endswith("bias"):
        return 0.05 * t
    return 1.0 + 0.1 * t


@torch.no_grad()
def randomise_(module: nn.Module, seed: int) -> nn.Module:
    """Seeded weights of a sane scale for every parameter, each from its own named stream (so adding
    a layer does not change the others, and the values do not depend on the device)."""
    for name, p in module.named_parameters():
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        p.copy_(_scaled(name, torch.randn(p.shape, generator=g)))
    return module


@torch.no_grad()
def random_weights(model: nn.Module, device: torch.device | str, dtype: torch.dtype,
                   seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Random weights of a sane scale for every tensor of `model` (built on meta), drawn on `device` one tensor
    at a time: for benchmarks and checkpoints at the real size, which must never exist twice in memory."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.state_dict().items():
        yield name, _scaled(name, torch.randn(p.shape, generator=gen, device=device)).to(dtype)


def random_dit(cfg: DiTConfig, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> WanDiT:
    """A DiT of `cfg` with random weights drawn on `device` (built on meta and filled one tensor at a time)."""
    with torch.device("meta"):
        model = WanDiT(cfg)
    model.load_state_dict(dict(random_weights(model, device, dtype, seed)), strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _tokenizer_json() -> dict:
    """A small Unigram tokenizer in the umT5 tokenizer.json shape: pad 0, eos 1, unk 2,
    `</s>` appended, metaspace pre-tokenisation; pieces are characters and short words."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    chars = string.ascii_letters + string.digits + string.punctuation
    words = ("a the of and in on with to at is cat dog man woman car city sea forest light "
             "slow motion camera cinematic shot red white blue night day").split()
    cjk = sorted(set(DEFAULT_NEGATIVE_PROMPT) - set(chars) - {"，"})
    pieces = ["▁"] + [f"▁{w}" for w in words] + list(chars) + cjk + ["，"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, -1.0 - 0.01 * i) for i, p in enumerate(pieces)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    return json.loads(tok.to_str())


def _write_dit(folder: Path, model_type: str, in_dim: int, seed: int, out_dim: int = 16) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dict(TINY_DIT, model_type=model_type, in_dim=in_dim, out_dim=out_dim)
    dit = randomise_(WanDiT(DiTConfig(**cfg)), seed)
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()},
              str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(dict(_class_name="WanModel", **cfg), indent=2))


def _write_tree(root: Path, preset: str, seed: int) -> None:
    spec = MODEL_SPECS[preset]
    if spec.task == "ti2v":   # one DiT at the root, 48 latent channels in and out, the 2.2 VAE
        _write_dit(root, spec.task, spec.z_dim, seed + 1, out_dim=spec.z_dim)
        vae: nn.Module = WanVAE22(dim=TINY_VAE_DIM, dec_dim=TINY_VAE_DIM)
    else:
        in_dim = 36 if spec.task == "i2v" else 16
        _write_dit(root / HIGH_NOISE_DIR, spec.task, in_dim, seed + 1)
        _write_dit(root / LOW_NOISE_DIR, spec.task, in_dim, seed + 2)
        vae = WanVAE21(dim=TINY_VAE_DIM)
    t5 = randomise_(UMT5Encoder(TINY_T5), seed + 3)
    torch.save({k: v.to(torch.bfloat16).contiguous() for k, v in t5.state_dict().items()}, root / T5_FILE)
    vae = randomise_(vae, seed + 4)
    torch.save({k: v.contiguous() for k, v in vae.state_dict().items()}, root / spec.vae_file)
    tok_dir = root / TOKENIZER_DIR
    tok_dir.mkdir(parents=True)
    (tok_dir / "tokenizer.json").write_text(json.dumps(_tokenizer_json(), ensure_ascii=False))


def materialise_tiny(preset: str = "tiny", seed: int = DEFAULT_SEED, cache_dir: Path | None = None) -> Path:
    """The official-layout folder of a tiny preset, written on first use (atomically)."""
    if preset not in TINY_PRESETS:
        raise ValueError(f"unknown tiny preset {preset!r}; allowed: {', '.join(TINY_PRESETS)}")
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    root = cache_dir / f"{preset}-v{FORMAT_VERSION}-seed{seed}"
    if root.is_dir():
        return root
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=cache_dir))
    try:
        _write_tree(tmp, preset, seed)
        tmp.rename(root)
    except OSError:
        if not root.is_dir():  # a concurrent writer did not win either
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
