"""Prompt cleaning and tokenisation give exactly the official ids and masks."""
from __future__ import annotations

import shutil

import pytest
import torch

from tests.conftest import load_ref
from wan_engine.text import PromptTokenizer, clean_prompt


@pytest.fixture(scope="module")
def ref() -> dict:
    return load_ref("b_t5.pt")


@pytest.fixture(scope="module")
def tokenizer_dir(oracle_dir):
    return oracle_dir / "t2v-A14B-tiny" / "google" / "umt5-xxl"


def test_clean_prompt_matches_official(ref):
    assert [clean_prompt(p) for p in ref["prompts"]] == ref["cleaned"]


def test_clean_prompt_whitespace_and_entities():
    # &amp;lt; is unescaped twice; U+3000 and tabs collapse to one space; ends are stripped
    assert clean_prompt(" \u3000a&amp;lt;b\t\n c ") == "a<b c"


def test_tokenizer_matches_official(ref, tokenizer_dir):
    ids, mask = PromptTokenizer(tokenizer_dir, text_len=512)(ref["prompts"])
    assert ids.dtype == mask.dtype == torch.int64
    assert torch.equal(ids, ref["ids"])
    assert torch.equal(mask, ref["mask"])
    assert torch.equal(mask.sum(1), ref["seq_lens"])


def test_long_prompt_truncated_with_eos(ref, tokenizer_dir):
    ids, mask = PromptTokenizer(tokenizer_dir, text_len=16)([ref["prompts"][-1], ""])
    assert ids.shape == mask.shape == (2, 16)
    assert torch.equal(ids[0], torch.cat([ref["ids"][-1, :15], torch.tensor([1])]))  # </s> kept at the end
    assert ids[1, 0] == 1 and mask[1].sum() == 1  # an empty prompt is just </s>


def test_missing_tokenizer_names_file(tmp_path, tokenizer_dir):
    for f in tokenizer_dir.iterdir():
        if f.name != "tokenizer.json":
            shutil.copy(f, tmp_path / f.name)
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        PromptTokenizer(tmp_path)
