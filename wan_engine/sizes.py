"""`Size`: a video's width and height in pixels, and the one parser of the `W*H` form people type.

Requests, the CLI and the Prefect UI write a size as `832*480` (the official code's form); everything
past the point where it is read holds a `Size`, which is a `(width, height)` tuple wherever the engine
takes one.
"""
from __future__ import annotations

from typing import NamedTuple


class Size(NamedTuple):
    """Width and height in pixels; `str()` writes it back as `W*H`."""

    width: int
    height: int

    @classmethod
    def parse(cls, text: str) -> Size:
        """`"832*480"` -> Size(832, 480); anything else is a ValueError that says the form."""
        width, star, height = text.strip().partition("*")
        if not (star and width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
            raise ValueError(f"{text!r} is not a size: write width*height in pixels, like 832*480")
        return cls(int(width), int(height))

    def __str__(self) -> str:
        return f"{self.width}*{self.height}"

    @property
    def pixels(self) -> int:
        return self.width * self.height
