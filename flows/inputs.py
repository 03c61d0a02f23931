"""The files a request names: confined to the configured roots and checked before any GPU slot is taken.

Every path wanflow reads on a caller's behalf (a request's image and checkpoint folder, a batch
manifest, LoRA files when they come) goes through `confine`: resolved (symlinks and `..`
followed, relative paths from the working directory) and accepted only inside one of the roots
of a setting (tasks/settings.py: WAN_INPUT_ROOTS, for checkpoints WAN_CHECKPOINT_ROOT too). A
path outside is refused with the same message whether or not it exists, so a caller learns
nothing about the rest of the file system.

Inside the roots, an image is opened and checked (format, size, PIL's decompression-bomb limit)
and a checkpoint folder goes through the loader's own validation, so a bad file fails the request
in a second, not a GPU run after its slot was taken.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from wan_engine import check_checkpoint
from wan_engine.configs import ModelSpec

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
MAX_IMAGE_SIDE = 8192  # the largest video is 1280 wide; a first frame beyond 8K is a mistake or an attack


class InputError(ValueError):
    """A path a request names that cannot be used; the message says why (the caller adds the field)."""


def confine(path: str | os.PathLike, roots: Sequence[Path], setting: str) -> Path:
    """`path` resolved, if it lies inside one of `roots`; `setting` names where the roots come from."""
    try:
        resolved = Path(path).expanduser().resolve()
        allowed = [Path(root).expanduser().resolve() for root in roots]
    except (OSError, RuntimeError, ValueError) as exc:  # a NUL byte, a symlink loop, an unreadable parent
        raise InputError(f"{str(path)!r} is not a usable path ({exc})") from exc
    if any(resolved.is_relative_to(root) for root in allowed):
        return resolved
    listed = os.pathsep.join(str(root) for root in allowed)
    raise InputError(f"{str(path)!r} is outside the folders {setting} allows ({listed}); move the file there "
                     f"or add its folder to {setting}")


def check_image(path: Path, given: str) -> None:
    """Open the image at `path` (`given` is how the caller wrote it) and check its format and size."""
    if not path.is_file():
        raise InputError(f"{given!r} is not a file")
    try:
        with warnings.catch_warnings():
            # PIL only warns between its pixel limit and twice that; past the limit is a refusal here
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=IMAGE_FORMATS) as image:
                width, height = image.size
                if max(width, height) <= MAX_IMAGE_SIDE:
                    image.load()  # a truncated or corrupt file fails here, not in the GPU phase
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"{given!r} is refused as a decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        allowed = f"{', '.join(IMAGE_FORMATS[:-1])} or {IMAGE_FORMATS[-1]}"
        raise InputError(f"{given!r} is not a {allowed} image (the formats allowed)") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # what PIL's decoders raise for damaged data
        raise InputError(f"{given!r} cannot be read as an image: {exc}") from exc
    if max(width, height) > MAX_IMAGE_SIDE:
        raise InputError(f"{given!r} is {width}x{height} pixels; its longest side may be at most {MAX_IMAGE_SIDE}")


def validate_checkpoint(folder: Path) -> ModelSpec:
    """The loader's validation of a checkpoint folder (wan_engine.check_checkpoint), remembered while no file
    in the folder changes: a batch of a hundred entries checks its checkpoint once."""
    return _validated(folder, _fingerprint(folder))


@lru_cache(maxsize=32)
def _validated(folder: Path, fingerprint: tuple) -> ModelSpec:
    return check_checkpoint(folder)


def _fingerprint(folder: Path) -> tuple:
    """Name, size and modification time of every file of a release's layout (three levels down, as deep as
    google/umt5-xxl/), cheap next to reading the weights' headers even for a folder that is no checkpoint."""
    entries = []
    for parent, dirs, files in os.walk(folder):
        depth = len(Path(parent).relative_to(folder).parts)
        dirs[:] = [] if depth >= 2 else [d for d in dirs if not d.startswith(".")]
        for name in files:
            try:
                stat = os.stat(os.path.join(parent, name))
            except OSError:  # a dangling link: the validation reports it
                continue
            entries.append((os.path.relpath(os.path.join(parent, name), folder), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(entries))
