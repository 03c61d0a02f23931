"""Staging folders: where a run's video and record are written before they are renamed into outputs/.

Each run writes into a folder of its own under `<outputs>/.staging/`, named
`<host>.<token>.<start>.<pid>`: the host (its name and, on Linux, its pid namespace: a pid means
something only there), a random token (one process stages several runs at once in a batch), the
start time of the owning process (a reused pid is not the owner) and its pid. A killed run leaves
its files there and nowhere else. `sweep_dead_staging` removes the folders whose owner is gone, and
only this host's: an outputs folder shared between hosts (docs/deploy.md) also holds folders of
other hosts, whose processes this one cannot see.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import uuid
from pathlib import Path

from tasks.processes import START_TIME, stat_fields

STAGING = ".staging"
UNKNOWN_START = "0"  # where /proc is missing: the sweep trusts the pid alone

log = logging.getLogger(__name__)


def host_id() -> str:
    """This host as staging folder names carry it: the host name plus, on Linux, the pid namespace."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
    try:
        # containers on one host (docker --network host) share its name but not its pids
        return f"{name}+{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return name


def process_start(pid: int) -> str | None:
    """When process `pid` started, in clock ticks after boot (Linux /proc); None where it cannot be read."""
    fields = stat_fields(pid)
    return fields[START_TIME] if fields is not None else None


def new_staging_folder(outputs_dir: Path) -> Path:
    """A new empty staging folder of this process under `<outputs_dir>/.staging/`."""
    pid = os.getpid()
    folder = outputs_dir / STAGING / f"{host_id()}.{uuid.uuid4().hex[:12]}.{process_start(pid) or UNKNOWN_START}.{pid}"
    folder.mkdir(parents=True)
    return folder


def sweep_dead_staging(outputs_dir: Path) -> list[Path]:
    """Remove the staging folders of this host whose process has died; returns them."""
    root = outputs_dir / STAGING
    if not root.is_dir():
        return []
    here, swept = host_id(), []
    for entry in root.iterdir():
        parts = entry.name.rsplit(".", 3)
        if len(parts) != 4 or parts[0] != here or not parts[3].isdigit():
            continue  # another host's, or not a staging folder: not ours to judge
        if not _owner_alive(int(parts[3]), parts[2]):
            shutil.rmtree(entry, ignore_errors=True)
            log.info("removed %s: its process %s is gone", entry, parts[3])
            swept.append(entry)
    return swept


def _owner_alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    now = process_start(pid)
    # unreadable (it may have exited this instant): keep the folder, the next sweep decides
    return now is None or start == UNKNOWN_START or now == start
