"""Prompt cleaning and umT5 tokenisation, matching the official Wan2.2 text front end.

The official pipeline cleans every prompt ("whitespace" mode) and then tokenises it with the
Hugging Face umT5 tokenizer padded and truncated to a fixed ``text_len`` with ``</s>`` appended.
Here the same ``tokenizer.json`` is driven directly through the ``tokenizers`` library, which
gives identical ids without pulling in ``transformers``. The official code cuts a longer prompt
without a word; `PromptTokenizer.count` says how many tokens a prompt had and how many were kept.
"""
from __future__ import annotations

import copy
import html
import re
from dataclasses import dataclass
from pathlib import Path

import ftfy
import torch
from tokenizers import Tokenizer
from torch import Tensor

TOKENIZER_FILE = "tokenizer.json"
PAD_TOKEN = "<pad>"

# The Unicode White_Space set, which is what the official `regex`-module `\s` matches. Python's
# `re` `\s` would also match U+001C..U+001F; spelling the class out keeps the two identical.
_WHITESPACE = re.compile(r"[\t-\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")


def clean_prompt(text: str) -> str:
    """Fix mojibake, unescape HTML (twice, for double-escaped text) and collapse whitespace."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip()


@dataclass(frozen=True)
class TokenCount:
    """A prompt's length in umT5 tokens (</s> included) and how many of them the text encoder sees."""

    tokens: int
    kept: int
    truncated: bool


class PromptTokenizer:
    """Cleans prompts and turns them into fixed-length umT5 ids and attention masks."""

    def __init__(self, tokenizer_dir: str | Path, text_len: int = 512):
        path = Path(tokenizer_dir) / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"umT5 tokenizer file not found: {path}")
        self.text_len = text_len
        self.tokenizer = Tokenizer.from_file(str(path))
        pad_id = self.tokenizer.token_to_id(PAD_TOKEN)
        if pad_id is None:
            raise ValueError(f"{path} has no {PAD_TOKEN} token")
        self.counter = copy.deepcopy(self.tokenizer)  # neither truncates nor pads: the prompt's whole length
        # Truncation leaves room for the </s> that the post-processor appends, as the official does.
        self.tokenizer.enable_truncation(max_length=text_len)
        self.tokenizer.enable_padding(length=text_len, pad_id=pad_id, pad_token=PAD_TOKEN)

    def __call__(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Returns (ids, mask), both int64 [B, text_len]; mask is 1 on real tokens incl. </s>."""
        encodings = self.tokenizer.encode_batch([clean_prompt(p) for p in prompts], add_special_tokens=True)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64).view(-1, self.text_len)  # [B, L]
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64).view(-1, self.text_len)
        return ids, mask

    def count(self, prompts: list[str]) -> list[TokenCount]:
        """Per prompt, its tokens after cleaning (</s> included) and those kept within `text_len`."""
        encodings = self.counter.encode_batch([clean_prompt(p) for p in prompts], add_special_tokens=True)
        return [TokenCount(len(e.ids), min(len(e.ids), self.text_len), len(e.ids) > self.text_len)
                for e in encodings]
