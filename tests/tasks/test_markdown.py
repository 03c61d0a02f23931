"""Artifact markdown: whatever a user typed renders as that text, never as markup or HTML."""
from __future__ import annotations

import json

import pytest

from tasks.markdown import code, literal, literal_cells
from tests.tasks.rendering import render

HOSTILE = [
    "<img src=x onerror=alert(1)>",
    "<script>alert(1)</script><iframe src=//example.com>",
    "# heading",
    "[link](javascript:alert(1)) ![image](http://example.com/x.png) <https://example.com>",
    "`code` ``two`` ```",
    "| a | b |\n|---|---|\n| c | d |",
    "**bold** __bold__ *em* _em_ ~~struck~~",
    "&lt;b&gt; &amp; &#60;i&#62; \\& \\\\",
    "1. listed",
    "- listed",
    "> quoted",
    "===",
    "    indented",
    "a\n\n<div onclick=alert(1)>block</div>",
    "www.example.com user@example.com",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_literal_renders_as_the_text_itself(text):
    rendered = render(literal(text))
    assert rendered.tags == ["p"] and rendered.attributes == []
    assert rendered.text["p"] == " ".join(text.split())


@pytest.mark.parametrize("text", ["/outputs/2026-03-14/a-fox/video.mp4", "/odd/`name`/``x``", "`", "/a <b>c</b>/*d*"])
def test_code_renders_one_code_span_of_the_text(text):
    rendered = render(f"- video: {code(text)}")
    assert rendered.tags == ["ul", "li", "code"]
    assert rendered.text["code"] == text


def test_table_cells_with_pipes_and_markup_stay_one_literal_cell():
    rows = [{"line": 3, "prompt": "a | b || c\n|---|---|", "output": "<img src=x onerror=alert(1)>", "s": 1.5}]
    cells = literal_cells(rows)
    assert cells[0]["line"] == 3 and cells[0]["s"] == 1.5  # numbers are left as they are
    for key in ("prompt", "output"):
        rendered = render(cells[0][key])
        assert rendered.tags == ["p"] and rendered.text["p"] == " ".join(rows[0][key].split())
    assert json.loads(json.dumps(cells)) == cells  # still a table artifact's JSON
