"""Files that live as long as the process that wrote them: a shared `flock` held from before the file
appears until after it is removed, so a file that can be locked exclusively outlived its writer.

The GPU queue's tickets and the holder files of GPU leases are such files.
"""
from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def write_locked(path: Path, record: dict) -> int:
    """Write `record` to `path` as JSON, appearing whole, under a shared lock kept on the returned fd.

    The writer removes the file, then closes the fd (see `remove_locked`).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        os.write(fd, json.dumps(record).encode())
        os.rename(partial, path)  # the lock belongs to the open file, so it moves with it
    except BaseException:
        os.close(fd)
        partial.unlink(missing_ok=True)
        raise
    return fd


def remove_locked(path: Path, fd: int) -> None:
    """Remove a file written by `write_locked`, then let go of its lock."""
    try:
        path.unlink(missing_ok=True)
    finally:
        os.close(fd)


@contextmanager
def dead_record(path: Path) -> Iterator[dict | None]:
    """The record of a file whose writer died, None while the writer lives (or once the file is gone).

    A dead file stays locked through the block, so no one else acts on it; the block removes it when done.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None  # its writer lives
            return
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # removed after we opened it: someone already dealt with it
            yield None
            return
        yield json.loads(os.read(fd, 1 << 20) or b"{}")
    finally:
        os.close(fd)
