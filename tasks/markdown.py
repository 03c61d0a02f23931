"""Markdown for Prefect artifacts that shows what a user typed (prompts, paths) as literal text.

The Prefect UI renders markdown artifacts, and the string cells of table artifacts, as markdown
with raw HTML: a prompt put in verbatim could add headings, links, images or HTML elements to a
run's page. `literal` backslash-escapes every ASCII punctuation character (CommonMark lets any be
escaped, and an escaped `<` or `&` is plain text, never HTML or an entity) and keeps the text on
one line, so that a line break cannot start a new block.
"""
from __future__ import annotations

import re

_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")
_BACKTICKS = re.compile(r"`+")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def literal(text: str) -> str:
    """`text` as markdown that renders as exactly that text (whitespace runs as one space)."""
    return _PUNCTUATION.sub(r"\\\1", _one_line(text))


def code(text: str) -> str:
    """`text` as an inline code span (monospace, nothing inside interpreted), whatever backticks it holds."""
    text = _one_line(text)
    fence = "`" * (max((len(run) for run in _BACKTICKS.findall(text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""  # CommonMark strips one such space
    return f"{fence}{pad}{text}{pad}{fence}"


def literal_cells(rows: list[dict]) -> list[dict]:
    """Table-artifact rows with every string cell made literal (the UI renders string cells as markdown)."""
    return [{key: literal(value) if isinstance(value, str) else value for key, value in row.items()} for row in rows]
