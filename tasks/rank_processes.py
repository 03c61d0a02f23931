"""A run's own rank processes: with no resident engine workers (a Python call, `wanflow generate`), a run held
on several GPUs starts one engine worker per GPU as its children, for its denoising only.

They are the same engine workers `wanflow worker` keeps (tasks/engine_worker.py), on sockets in a private
folder, serving only the run's process (which holds the GPUs: no lease is checked) and killed by the kernel
if it dies. Each loads the run's pipeline on its GPU; they are stopped when the block ends.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tasks.runs import RunDescription

STOP_S = 10.0  # after SIGINT, then SIGKILL


@contextmanager
def rank_processes(run: RunDescription) -> Iterator[Path]:
    """One engine worker per GPU of `run`, children of this process; yields the folder of their sockets."""
    directory = Path(tempfile.mkdtemp(prefix="wanflow-ranks-"))  # short: a socket path has 107 bytes at most
    children = []
    try:
        for gpu, tag in zip(run.allocation.gpus, run.allocation.tags, strict=True):
            children.append(subprocess.Popen([sys.executable, "-m", "tasks.engine_worker", "--tag", tag, "--device",
                                              gpu.device, "--dir", str(directory), "--owner", str(os.getpid())]))
        yield directory
    finally:
        for child in children:
            child.send_signal(signal.SIGINT)
        for child in children:
            try:
                child.wait(STOP_S)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        shutil.rmtree(directory, ignore_errors=True)
