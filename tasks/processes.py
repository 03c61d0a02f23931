"""Tying a child process's life to its parent's (Linux): the children of `wanflow worker` and a run's own rank
processes must not outlive the process that owns them."""
from __future__ import annotations

import ctypes
import signal

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies (call it in the child: between fork and exec,
    or first thing after exec). Linux only; elsewhere a no-op."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
