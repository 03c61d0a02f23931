"""Size: the one parser of W*H, and the tuple the engine takes."""
from __future__ import annotations

import pytest

from wan_engine.configs import MODEL_SPECS
from wan_engine.sizes import Size


def test_a_size_reads_and_writes_the_form_people_type():
    size = Size.parse("832*480")
    assert (size.width, size.height, size.pixels) == (832, 480, 832 * 480)
    assert str(size) == f"{size}" == "832*480" and size == (832, 480)  # a (W, H) tuple where the engine takes one
    assert all(Size.parse(name) in spec.sizes for spec in MODEL_SPECS.values() for name in spec.size_names())


@pytest.mark.parametrize("text", ["832x480", "832*", "*480", "0*480", "-832*480", "832*480*1", "a*b", ""])
def test_anything_else_is_refused_with_the_form(text):
    with pytest.raises(ValueError, match="write width\\*height in pixels, like 832\\*480"):
        Size.parse(text)
