"""Small process helpers for starting and stopping local Prefect servers and workers (no Prefect import,
so scripts can use them before they set PREFECT_HOME for their children)."""
from __future__ import annotations

import os
import signal
import socket
import time


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(pid: int, grace_s: float = 20.0) -> None:
    """SIGTERM a process group started in its own session (a server, a worker), SIGKILL it after
    `grace_s`: what `prefect server stop` does with the pid file of a detached server."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    os.killpg(pid, signal.SIGKILL)
