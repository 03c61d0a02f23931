"""`wanflow setup`: prepare a Prefect server to run this host's GPUs, idempotently.

Creates, or updates to what wanflow needs:
- one concurrency limit per GPU of this host: tag `<prefix>-<i>`, or `<prefix>-<node>-<i>`
  with WAN_NODE_NAME when several hosts share the server; one slot each;
- the process work pool the deployments of prefect.yaml name;
- those deployments (`prefect deploy --all` on prefect.yaml), whose parameter schemas then
  refuse unknown parameters, so the server rejects such a run when it is created;
- the automation that marks a run Crashed when its process died: the deployments' runs
  send a heartbeat every 30 s (prefect.yaml), and a run silent for 90 s is dead.
It starts nothing except the local server it may need (deployments/server.py); a host's
worker is `wanflow worker`.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import yaml
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import DeploymentUpdate, GlobalConcurrencyLimitUpdate, WorkPoolCreate
from prefect.client.schemas.filters import WorkPoolFilter, WorkPoolFilterName
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.workers.process import ProcessWorker

from deployments.server import DEFAULT_PORT, ensure_server
from tasks.allocate import limit_name
from tasks.gpus import read_gpu_profile
from tasks.settings import get_settings

log = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parents[1]  # the checkout holding prefect.yaml and flows/
CRASH_AUTOMATION = "wanflow: mark runs whose process died as Crashed"
HEARTBEAT_GRACE = timedelta(seconds=90)  # three missed heartbeats (PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30)
FINAL_EVENTS = ("Completed", "Failed", "Cancelled", "Crashed")


class SetupError(RuntimeError):
    """Setup could not finish; the message says which step and why."""


@dataclass
class SetupReport:
    """What setup found and changed."""

    api_url: str
    server: str  # "configured", "restarted", "running" or "started"
    gpu_tags: list[str] = field(default_factory=list)
    changed_tags: list[str] = field(default_factory=list)
    work_pool: str = ""
    work_pool_created: bool = False
    deployments: list[str] = field(default_factory=list)
    automation: str = ""  # "created" or "updated"

    def lines(self) -> list[str]:
        tags = ", ".join(self.gpu_tags) or "none (no GPU on this host: CPU runs take no slot)"
        return [
            f"Prefect API: {self.api_url} ({self.server})",
            f"GPU limits (1 slot each): {tags}" + (f"; created or corrected: {', '.join(self.changed_tags)}"
                                                  if self.changed_tags else ""),
            f"work pool: {self.work_pool} (process){' created' if self.work_pool_created else ''}",
            f"deployments: {', '.join(self.deployments)}",
            f"automation {self.automation}: {CRASH_AUTOMATION!r}",
        ]


def read_project(project_dir: Path = PROJECT_DIR) -> dict:
    """prefect.yaml of the project."""
    path = project_dir / "prefect.yaml"
    if not path.is_file():
        raise SetupError(f"{path} not found: run setup from a wanflow checkout (or pass --project-dir)")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def work_pool_name(project: dict) -> str:
    """The one work pool every deployment of prefect.yaml runs on."""
    names = {d["work_pool"]["name"] for d in project["deployments"]}
    if len(names) != 1:
        raise SetupError(f"prefect.yaml: the deployments name {len(names)} work pools ({names}); wanflow uses one")
    return names.pop()


def host_gpu_tags() -> list[str]:
    """The concurrency tags of this host's GPUs."""
    settings = get_settings()
    return [f"{settings.gpu_tag_base}-{gpu.index}" for gpu in read_gpu_profile(settings.gpu_inventory).gpus]


def ensure_gpu_limits(client: SyncPrefectClient, tags: list[str]) -> list[str]:
    """One active slot per tag; returns the tags whose limit was created or corrected.

    A correct limit is left alone: re-running setup while runs hold GPUs keeps their slots.
    """
    changed = []
    for tag in tags:
        try:
            limit = client.read_global_concurrency_limit_by_name(limit_name(tag))
        except ObjectNotFound:
            client.create_concurrency_limit(tag=tag, concurrency_limit=1)
            changed.append(tag)
            continue
        if limit.limit != 1 or not limit.active:
            client.update_global_concurrency_limit(limit_name(tag), GlobalConcurrencyLimitUpdate(limit=1, active=True))
            changed.append(tag)
    return changed


def ensure_work_pool(client: SyncPrefectClient, name: str) -> bool:
    """The process work pool `name`; returns whether it was created."""
    try:
        pool = client.read_work_pool(name)
    except ObjectNotFound:
        client.create_work_pool(WorkPoolCreate(
            name=name, type="process", base_job_template=ProcessWorker.get_default_base_job_template(),
            description="wanflow GPU hosts: one `wanflow worker` per host",
        ))
        return True
    if pool.type != "process":
        raise SetupError(f"work pool {name!r} exists with type {pool.type!r}; wanflow needs a process pool")
    return False


def deploy_project(api_url: str, project_dir: Path = PROJECT_DIR) -> None:
    """`prefect deploy --all` on the project's prefect.yaml, against `api_url`."""
    env = {**os.environ, "PREFECT_API_URL": api_url}
    done = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file",
         str(project_dir / "prefect.yaml")],
        cwd=project_dir, env=env, capture_output=True, text=True,
    )
    if done.returncode:
        raise SetupError(f"prefect deploy failed ({done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")


def deployed_names(client: SyncPrefectClient, pool: str) -> list[str]:
    """The deployments the server has on the work pool."""
    pools = WorkPoolFilter(name=WorkPoolFilterName(any_=[pool]))
    return sorted(d.name for d in client.read_deployments(work_pool_filter=pools))


def forbid_unknown_parameters(client: SyncPrefectClient, pool: str) -> None:
    """Make the parameter schema of every deployment on the pool refuse unknown top-level parameters.

    `prefect deploy` builds the schema from the flow's signature without `additionalProperties`, so a
    run created with a misspelt parameter passed the server's check (enforce_parameter_schema) and
    crashed in its process with only "exit status 1". With it the server answers 409 at creation:
    "Additional properties are not allowed ('colour' was unexpected)".
    """
    pools = WorkPoolFilter(name=WorkPoolFilterName(any_=[pool]))
    for deployment in client.read_deployments(work_pool_filter=pools):
        schema = deployment.parameter_openapi_schema or {"type": "object", "properties": {}}
        if schema.get("additionalProperties") is not False:
            client.update_deployment(deployment.id, DeploymentUpdate(
                parameter_openapi_schema={**schema, "additionalProperties": False}))


def crash_automation() -> AutomationCore:
    """Crash a flow run that stopped sending heartbeats before reaching a final state."""
    return AutomationCore(
        name=CRASH_AUTOMATION,
        description="A run's process died (killed, out of memory, host lost): its state would stay Running.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{state}" for state in FINAL_EVENTS)},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=HEARTBEAT_GRACE,
        ),
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED,
            message=f"no heartbeat for {HEARTBEAT_GRACE.seconds} s: the run's process died; its GPU slots are "
                    f"freed when their lease expires",
        )],
    )


def ensure_crash_automation(client: SyncPrefectClient) -> str:
    """Create the crashed-run automation, or bring an existing one up to date."""
    wanted = crash_automation()
    existing = client.read_automations_by_name(CRASH_AUTOMATION)
    if not existing:
        client.create_automation(wanted)
        return "created"
    client.update_automation(existing[0].id, wanted)
    for duplicate in existing[1:]:
        client.delete_automation(duplicate.id)
    return "updated"


def setup(project_dir: Path = PROJECT_DIR, port: int = DEFAULT_PORT) -> SetupReport:
    """Prepare the configured Prefect server (or a local one) for this host; see the module docstring."""
    project = read_project(project_dir)
    api_url, how = ensure_server(port)
    report = SetupReport(api_url=api_url, server=how, gpu_tags=host_gpu_tags(), work_pool=work_pool_name(project))
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        report.changed_tags = ensure_gpu_limits(client, report.gpu_tags)
        report.work_pool_created = ensure_work_pool(client, report.work_pool)
        deploy_project(api_url, project_dir)
        forbid_unknown_parameters(client, report.work_pool)
        report.deployments = deployed_names(client, report.work_pool)
        report.automation = ensure_crash_automation(client)
    return report
