"""`wanflow worker`: this host's Prefect worker on the wanflow work pool.

It is `prefect worker start --pool <pool> --type process` with what wanflow's runs need in
its environment, which every flow run process it starts inherits:
- WAN_PROJECT_DIR: this host's checkout, where prefect.yaml's pull step starts each run;
- PREFECT_WORKER_QUERY_SECONDS=2 (Prefect's default is 10): a run triggered in the UI starts
  within ~2 s, and a queued one that a finished run made room for waits no longer;
- the WAN_* settings of this host (WAN_NODE_NAME, WAN_CHECKPOINT_ROOT, ...) as they are.
User values win over these defaults.
"""
from __future__ import annotations

import os
import socket
import sys

from deployments.server import configured_api_url
from deployments.setup import PROJECT_DIR, read_project, work_pool_name
from flows.settings import get_settings

WORKER_ENV = {"PREFECT_WORKER_QUERY_SECONDS": "2"}


class WorkerError(RuntimeError):
    """The worker cannot start; the message says why."""


def worker_command(pool: str | None = None, name: str | None = None, limit: int | None = None) -> list[str]:
    """The `prefect worker start` command line for this host."""
    pool = pool or work_pool_name(read_project(PROJECT_DIR))
    name = name or f"wanflow-{get_settings().node_name or socket.gethostname()}"
    command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process", "--name", name]
    if limit is not None:
        command += ["--limit", str(limit)]
    return command


def worker_environment() -> dict[str, str]:
    return {"WAN_PROJECT_DIR": str(PROJECT_DIR), **WORKER_ENV, **os.environ}


def run_worker(pool: str | None = None, name: str | None = None, limit: int | None = None) -> None:
    """Replace this process with the worker (signals and Ctrl-C go straight to it)."""
    if not configured_api_url():
        raise WorkerError("no Prefect server configured: run `wanflow setup` first, or set PREFECT_API_URL")
    command = worker_command(pool, name, limit)
    os.execve(command[0], command, worker_environment())
