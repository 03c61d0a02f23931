"""Processes as Linux shows them: tying a child's life to its parent's (the children of `wanflow worker` and a
run's own rank processes must not outlive the process that owns them), and reading /proc/<pid>/stat."""
from __future__ import annotations

import ctypes
import signal
from collections.abc import Iterator
from pathlib import Path

PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Indices into stat_fields(): proc(5)'s fields 3 (state), 4 (ppid) and 22 (starttime, clock ticks after boot).
STATE, PPID, START_TIME = 0, 1, 19


def stat_fields(pid: int | str) -> list[str] | None:
    """The fields of /proc/<pid>/stat after "pid (command)", None where the process is gone or there is no /proc.

    Split after the last ")": the command name may hold spaces and parentheses.
    """
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def processes() -> Iterator[tuple[int, list[str]]]:
    """Every process of this host (its pid namespace) with its stat fields; those that end meanwhile are left out."""
    for entry in Path("/proc").glob("[0-9]*"):
        fields = stat_fields(entry.name)
        if fields is not None:
            yield int(entry.name), fields


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies (call it in the child: between fork and exec,
    or first thing after exec). Linux only; elsewhere a no-op."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
