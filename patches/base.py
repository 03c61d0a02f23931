"""The patch contract: what every `apply_x(pipe, cfg)` returns, and helpers that undo changes exactly.

A patch is a frozen config dataclass plus `apply_x(pipe, cfg) -> PatchHandle`; `handle.remove()`
puts the engine (and any process-wide setting the patch touched) back exactly as it was, so a
pipeline's outputs after `remove()` are bit-identical to before `apply`. Removing twice is harmless.
`PatchStack` composes handles and removes them in reverse order of application (tiers use it).

The helpers record the previous state before a change and return the undo, so a patch is written as
a list of recorded changes rather than hand-written restore code.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import ExitStack
from typing import Protocol

log = logging.getLogger(__name__)

Undo = Callable[[], None]
_MISSING = object()


class Handle(Protocol):
    """Anything a patch's apply returns: it can be removed."""

    def remove(self) -> None: ...


class PatchHandle:
    """One applied patch. `detail` says what it did on this machine (for logs and run metadata)."""

    def __init__(self, name: str, undo: Undo | None = None, detail: str = ""):
        self.name = name
        self.detail = detail
        self._undo = undo
        self._active = True

    @property
    def active(self) -> bool:
        return self._active

    def remove(self) -> None:
        if not self._active:
            return
        self._active = False
        if self._undo is not None:
            self._undo()

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self._active else "removed"
        return f"<{type(self).__name__} {self.name} ({state}): {self.detail}>"


class PatchStack(PatchHandle):
    """Handles applied one after another; `remove()` undoes them last-first, each exactly once,
    and still undoes the rest when one of them raises (the first error is re-raised)."""

    def __init__(self, name: str, detail: str = ""):
        self._stack = ExitStack()
        self.handles: list[Handle] = []
        super().__init__(name, self._stack.close, detail)

    def push(self, handle: Handle) -> Handle:
        self.handles.append(handle)
        self._stack.callback(handle.remove)
        return handle

    def undo_on_remove(self, undo: Undo) -> None:
        """Record a bare undo (one change of a multi-step patch)."""
        self._stack.callback(undo)


def keep_attr(obj: object, name: str) -> Undo:
    """Remember `obj`'s own attribute `name` (in its instance __dict__, or its absence there);
    the returned undo restores exactly that, so a class-level default shows through again."""
    old = vars(obj).get(name, _MISSING)

    def undo() -> None:
        if old is _MISSING:
            vars(obj).pop(name, None)
        else:
            vars(obj)[name] = old

    return undo


def swap_attr(obj: object, name: str, value: object) -> Undo:
    """Set `obj.name = value` on the instance; the undo restores the instance's previous state."""
    undo = keep_attr(obj, name)
    vars(obj)[name] = value
    return undo


def keep_setting(owner: object, name: str) -> Undo:
    """Remember a module-level setting (e.g. a torch config flag); the undo writes it back."""
    old = getattr(owner, name)
    return lambda: setattr(owner, name, old)


def set_env(name: str, value: str) -> Undo:
    """Set an environment variable; the undo puts back its previous value (or absence), unless someone
    changed it since."""
    old = os.environ.get(name)
    os.environ[name] = value

    def undo() -> None:
        if os.environ.get(name) != value:
            return
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old

    return undo
