"""Prompt cleaning and tokenisation give exactly the official ids and masks, and say how many tokens a
prompt had and whether the text encoder's limit cut it."""
from __future__ import annotations

import shutil

import pytest
import torch

import wan_engine
from tests.conftest import load_ref
from wan_engine.text import PromptTokenizer, TokenCount, clean_prompt


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


def test_tokenizer_counts_the_tokens_of_each_prompt_and_what_it_kept(ref, tokenizer_dir):
    counts = PromptTokenizer(tokenizer_dir, text_len=512).count(ref["prompts"])
    assert [c.kept for c in counts] == ref["seq_lens"].tolist()  # what the official encoder sees
    assert [c.truncated for c in counts] == [c.tokens > 512 for c in counts]
    assert counts[-1].truncated and counts[-1].tokens > 512 == counts[-1].kept  # the official cuts it silently
    short = PromptTokenizer(tokenizer_dir, text_len=16)
    long_count, fox, empty = short.count([ref["prompts"][-1], "a red fox", ""])
    assert long_count == TokenCount(tokens=counts[-1].tokens, kept=16, truncated=True)
    assert fox.tokens == fox.kept == short(["a red fox"])[1].sum().item() and not fox.truncated
    assert empty == TokenCount(tokens=1, kept=1, truncated=False)  # just </s>


def test_generation_reports_a_prompt_cut_at_512_tokens(tmp_path, monkeypatch):
    monkeypatch.setenv("WAN_CACHE_DIR", str(tmp_path))
    pipe = wan_engine.load_pipeline("tiny", dtype=torch.float32)
    result = pipe.generate("a red fox trots through deep snow " * 80, negative_prompt="blurry", size=(32, 32),
                           frame_num=5, steps=1, decode=False)
    prompt, negative = result.prompt_tokens["prompt"], result.prompt_tokens["negative_prompt"]
    assert prompt.kept == 512 and prompt.tokens > 512 and prompt.truncated
    assert negative.tokens == negative.kept < 512 and not negative.truncated
