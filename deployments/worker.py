"""`wanflow worker`: this host's worker on the wanflow work pool.

The `wanflow worker` process is a supervisor (deployments/supervisor.py) that runs Prefect's
process worker as its child (deployments/prefect_worker.py), gives back at once the GPUs of
runs whose process died, and on SIGTERM or Ctrl-C cancels the runs in flight on this host,
frees their GPUs and exits 0. The worker's environment, which every flow run process it
starts inherits, holds what wanflow's runs need:
- WAN_PROJECT_DIR: this host's checkout, where prefect.yaml's pull step starts each run;
- PREFECT_WORKER_QUERY_SECONDS=2 (Prefect's default is 10): a run triggered in the UI starts
  within ~2 s, and a queued one that a finished run made room for waits no longer;
- the WAN_* settings of this host (WAN_NODE_NAME, WAN_CHECKPOINT_ROOT, ...) as they are;
- WAN_ENGINE_TAGS: the GPUs on which the supervisor keeps a resident engine worker (WAN_RESIDENT_GPUS,
  default every detected GPU), so that a run holding one sends its GPU phase there (tasks/engine_channel.py).
User values win over these defaults, WAN_ENGINE_TAGS excepted: it says what this worker started.
"""
from __future__ import annotations

import json
import os
import socket
import sys

from deployments.server import configured_api_url
from deployments.setup import PROJECT_DIR, read_project, work_pool_name
from deployments.supervisor import Supervisor
from tasks.gpus import GpuProfile, read_gpu_profile
from tasks.settings import Settings, get_settings

WORKER_ENV = {"PREFECT_WORKER_QUERY_SECONDS": "2"}


class WorkerError(RuntimeError):
    """The worker cannot start; the message says why."""


def worker_name() -> str:
    """wanflow-<WAN_NODE_NAME or host name>: how the UI and the stop messages name this host's worker."""
    return f"wanflow-{get_settings().node_name or socket.gethostname()}"


def worker_command(pool: str | None = None, name: str | None = None, limit: int | None = None) -> list[str]:
    """The command line of the Prefect worker the supervisor runs for this host."""
    pool = pool or work_pool_name(read_project(PROJECT_DIR))
    command = [sys.executable, "-m", "deployments.prefect_worker", "--pool", pool, "--name", name or worker_name()]
    if limit is not None:
        command += ["--limit", str(limit)]
    return command


def resident_engines(settings: Settings, profile: GpuProfile) -> dict[str, str]:
    """GPU tag -> device of every GPU that gets a resident engine worker: WAN_RESIDENT_GPUS, else every detected
    GPU (a simulated inventory's only when listed: they compute on the CPU)."""
    if settings.resident_gpus is None:
        gpus = [] if profile.simulated else profile.gpus
    else:
        gpus = profile.select(settings.resident_gpus).gpus
    return {f"{settings.gpu_tag_base}-{g.index}": g.device for g in gpus}


def engine_command(tag: str, device: str) -> list[str]:
    return [sys.executable, "-m", "tasks.engine_worker", "--tag", tag, "--device", device]


def worker_environment(engine_tags: list[str] | None = None) -> dict[str, str]:
    return {"WAN_PROJECT_DIR": str(PROJECT_DIR), **WORKER_ENV, **os.environ,
            "WAN_ENGINE_TAGS": json.dumps(engine_tags or [])}


def run_worker(pool: str | None = None, name: str | None = None, limit: int | None = None) -> int:
    """Run this host's worker until SIGTERM or Ctrl-C; returns the exit status."""
    if not configured_api_url():
        raise WorkerError("no Prefect server configured: run `wanflow setup` first, or set PREFECT_API_URL")
    name = name or worker_name()
    settings = get_settings()
    engines = resident_engines(settings, read_gpu_profile(settings.gpu_inventory))
    return Supervisor(name, worker_command(pool, name, limit), worker_environment(list(engines)),
                      {tag: engine_command(tag, device) for tag, device in engines.items()}).run()
