"""The umT5 encoder loads the official file strictly and reproduces the official text context."""
from __future__ import annotations

import logging

import pytest
import torch

from tests.conftest import load_ref, rel_err
from wan_engine.t5 import UMT5_XXL, T5Config, UMT5Encoder, encode_prompts
from wan_engine.text import PromptTokenizer

log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def ref() -> dict:
    return load_ref("b_t5.pt")


@pytest.fixture(scope="module")
def variant_dir(oracle_dir):
    return oracle_dir / "t2v-A14B-tiny"


@pytest.fixture(scope="module")
def state_dict(variant_dir) -> dict:
    return torch.load(variant_dir / "models_t5_umt5-xxl-enc-bf16.pth", mmap=True, weights_only=True)


@pytest.fixture(scope="module")
def tokenizer(variant_dir) -> PromptTokenizer:
    return PromptTokenizer(variant_dir / "google" / "umt5-xxl")


def build(state_dict: dict, dtype: torch.dtype) -> UMT5Encoder:
    # as the oracle: the bf16 release file loaded into an encoder of `dtype`
    with torch.device("meta"):
        encoder = UMT5Encoder(T5Config.from_state_dict(state_dict))
    encoder.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, strict=True, assign=True)
    return encoder.eval().requires_grad_(False)


def test_config_from_state_dict(state_dict):
    assert T5Config.from_state_dict(state_dict) == T5Config(
        vocab_size=256, dim=4096, dim_attn=16, dim_ffn=32, num_heads=2, num_layers=2)
    with torch.device("meta"):
        real = UMT5Encoder(UMT5_XXL).state_dict()
    assert T5Config.from_state_dict(real) == UMT5_XXL


def test_state_dict_keys_are_official(state_dict):
    assert set(build(state_dict, torch.float32).state_dict()) == set(state_dict)


def test_forward_matches_official(ref, state_dict):
    # Prompts 0-4 have at most 62 tokens and padded keys are masked, so the first 32 rows of a
    # 64-token run equal those of the official 512-token run, padded query rows included.
    out = build(state_dict, torch.float32)(ref["ids"][:5, :64], ref["mask"][:5, :64])  # [5, 64, 4096]
    assert out.shape == (5, 64, 4096)
    err = rel_err(out[:, :32], ref["encoder_out_first32"][:5])
    log.info("fp32 forward, first 32 rows of prompts 0-4: rel err %.2e", err)
    assert err < 1e-4


@pytest.mark.parametrize("which", [[0, 1, 2, 3, 4], [5, 2]], ids=["short_prompts", "512_tokens_and_empty"])
def test_context_matches_official(ref, state_dict, tokenizer, which):
    context, lengths = encode_prompts(build(state_dict, torch.float32), tokenizer,
                                      [ref["prompts"][i] for i in which])
    assert torch.equal(lengths, ref["seq_lens"][which])
    assert context.shape == (len(which), int(lengths.max()), 4096) and context.dtype == torch.float32
    for row, (i, n) in enumerate(zip(which, lengths.tolist(), strict=True)):
        err = rel_err(context[row, :n], ref["context"][i])
        log.info("fp32 context prompt %d (%d tokens): rel err %.2e", i, n, err)
        assert err < 1e-4, i
        assert not context[row, n:].any()


def test_bf16_context_close_to_official_bf16(ref, state_dict, tokenizer):
    # Not bit-exact: the official rounds the attention scores and each tanh-GELU step to bf16.
    context, lengths = encode_prompts(build(state_dict, torch.bfloat16), tokenizer, ref["prompts"][:5])
    assert context.dtype == torch.bfloat16
    for i, n in enumerate(lengths.tolist()):
        err = rel_err(context[i, :n], ref["context_bf16_cpu"][i])
        log.info("bf16 context prompt %d (%d tokens): rel err %.2e", i, n, err)
        assert err < 2e-2, i
        assert not context[i, n:].any()
