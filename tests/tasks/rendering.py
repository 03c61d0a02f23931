"""Markdown rendered as the Prefect UI renders artifacts: CommonMark with GFM tables and strikethrough, raw
HTML allowed (the UI's renderer is `marked`; markdown-it-py, which rich brings, follows the same spec)."""
from __future__ import annotations

from dataclasses import dataclass, field
from html.parser import HTMLParser

from markdown_it import MarkdownIt

_MARKDOWN = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


@dataclass
class Rendered:
    """The elements a markdown text became, and the text of each element."""

    tags: list[str] = field(default_factory=list)
    attributes: list[tuple[str, str | None]] = field(default_factory=list)
    text: dict[str, str] = field(default_factory=dict)  # tag -> its text, concatenated over its elements


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.rendered = Rendered()
        self.open: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.rendered.tags.append(tag)
        self.rendered.attributes += attrs
        if tag not in _VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        if tag in self.open:
            del self.open[len(self.open) - 1 - self.open[::-1].index(tag):]

    def handle_data(self, data):
        for tag in self.open:
            self.rendered.text[tag] = self.rendered.text.get(tag, "") + data


def render(markdown: str) -> Rendered:
    collector = _Collector()
    collector.feed(_MARKDOWN.render(markdown))
    collector.close()
    return collector.rendered
