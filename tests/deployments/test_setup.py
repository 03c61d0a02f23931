"""The parts of `wanflow setup` and `wanflow worker`: prefect.yaml, GPU limits, pool, automation, worker."""
from __future__ import annotations

import importlib
import uuid
from datetime import timedelta

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
from prefect.client.schemas.objects import StateType
from prefect.events.schemas.automations import Posture
from prefect.settings import PREFECT_API_URL, PREFECT_HOME, Settings, temporary_settings

from deployments.server import SERVER_ENV, ServerError, ensure_server
from deployments.setup import (
    CRASH_AUTOMATION,
    PROJECT_DIR,
    ensure_crash_automation,
    ensure_gpu_limits,
    ensure_work_pool,
    host_gpu_tags,
    read_project,
    work_pool_name,
)
from deployments.worker import worker_command, worker_environment
from flows.batch import load_manifest
from flows.cli import main
from tasks.allocate import limit_name
from tasks.gpus import read_gpu_profile
from tasks.leases import try_acquire
from tasks.settings import get_settings


def test_prefect_yaml_deploys_both_flows_on_one_process_pool():
    project = read_project()
    deployments = {d["name"]: d for d in project["deployments"]}
    assert set(deployments) == {"generate-video", "batch-generate"}
    for name, deployment in deployments.items():
        path, function = deployment["entrypoint"].split(":")
        assert path.startswith("flows/") and (PROJECT_DIR / path).is_file()
        assert getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), function).name == name
    assert work_pool_name(project) == "wanflow-gpu"
    pool = deployments["generate-video"]["work_pool"]
    assert pool is deployments["batch-generate"]["work_pool"]  # one anchor under definitions
    assert pool["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
    [schedule] = deployments["batch-generate"]["schedules"]
    assert schedule["cron"] and schedule["active"] is False  # paused until someone points it at a manifest
    default_manifest = PROJECT_DIR / deployments["batch-generate"]["parameters"]["manifest"]
    assert all(e.request.task == "tiny" for e in load_manifest(default_manifest, profile=read_gpu_profile([])))
    [pull] = project["pull"]
    assert pull["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ $WAN_PROJECT_DIR }}"


def test_gpu_limits_are_host_qualified_and_setup_keeps_held_slots(prefect_server, wan_env, monkeypatch):
    prefix = f"g{uuid.uuid4().hex[:6]}"
    monkeypatch.setenv("WAN_GPU_INVENTORY", "[{}, {}]")
    monkeypatch.setenv("WAN_GPU_TAG_PREFIX", prefix)
    monkeypatch.setenv("WAN_NODE_NAME", "node-b")
    get_settings.cache_clear()
    tags = host_gpu_tags()
    assert tags == [f"{prefix}-node-b-0", f"{prefix}-node-b-1"]
    with get_client(sync_client=True) as client:
        assert ensure_gpu_limits(client, tags) == tags
        held = try_acquire(client, tags[:1], 60)
        client.update_global_concurrency_limit(limit_name(tags[1]), GlobalConcurrencyLimitUpdate(limit=3))
        assert ensure_gpu_limits(client, tags) == [tags[1]]  # a wrong limit is put right, a correct one left alone
        limits = [client.read_global_concurrency_limit_by_name(limit_name(tag)) for tag in tags]
        assert [(limit.limit, limit.active_slots) for limit in limits] == [(1, 1), (1, 0)]
        client.release_concurrency_slots_with_lease(held)


def test_work_pool_and_crash_automation_are_created_once(prefect_server):
    pool = f"pool-{uuid.uuid4().hex[:6]}"
    with get_client(sync_client=True) as client:
        assert ensure_work_pool(client, pool) and not ensure_work_pool(client, pool)
        assert client.read_work_pool(pool).type == "process"
        assert [ensure_crash_automation(client), ensure_crash_automation(client)] == ["created", "updated"]
        [automation] = client.read_automations_by_name(CRASH_AUTOMATION)
    trigger, [action] = automation.trigger, automation.actions
    assert trigger.posture == Posture.Proactive and trigger.within == timedelta(seconds=90)
    assert trigger.after == {"prefect.flow-run.heartbeat"} and "prefect.flow-run.Completed" in trigger.expect
    assert action.type == "change-flow-run-state" and action.state == StateType.CRASHED


def test_setup_refuses_a_configured_server_that_does_not_answer_and_says_how_to_start_it(tmp_path):
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api", PREFECT_HOME: tmp_path}):
        with pytest.raises(ServerError, match="does not answer") as refused:
            ensure_server()
    assert "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=prefect.server.concurrency.lease_storage.filesystem" in str(
        refused.value) and "prefect server start --host 127.0.0.1 --port 9" in str(refused.value)


def test_setup_refuses_a_server_that_keeps_gpu_leases_in_memory(prefect_server):
    # the test harness's server runs with Prefect's default lease storage: a restart of it would leak GPUs
    with pytest.raises(ServerError, match=r"keeps GPU leases in prefect\.server\.concurrency\.lease_storage\.memory"):
        ensure_server()


def test_the_server_settings_setup_uses_are_prefect_settings(monkeypatch):
    for key, value in SERVER_ENV.items():
        monkeypatch.setenv(key, value)
    server = Settings().server
    assert server.concurrency.lease_storage == "prefect.server.concurrency.lease_storage.filesystem"
    assert server.services.repossessor.loop_seconds == 5  # expired leases reclaimed every 5 s, not 15
    assert server.analytics_enabled is False


def test_worker_command_runs_this_hosts_worker_on_the_pool(wan_env, monkeypatch, capsys):
    monkeypatch.setenv("WAN_NODE_NAME", "node-b")
    get_settings.cache_clear()
    assert worker_command(limit=3)[1:] == ["-m", "deployments.prefect_worker", "--pool", "wanflow-gpu",
                                           "--name", "wanflow-node-b", "--limit", "3"]
    env = worker_environment()
    assert (env["WAN_PROJECT_DIR"], env["PREFECT_WORKER_QUERY_SECONDS"], env["WAN_NODE_NAME"]) == (
        str(PROJECT_DIR), "2", "node-b")
    monkeypatch.setenv("PREFECT_WORKER_QUERY_SECONDS", "5")
    assert worker_environment()["PREFECT_WORKER_QUERY_SECONDS"] == "5"  # the user's value wins
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["worker"]) == 1
    assert "run `wanflow setup` first" in capsys.readouterr().err
