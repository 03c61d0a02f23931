"""GPU leases: a lease the server forgot is taken again or fails the run, releases say what they did,
and the lease of a holder that died is given back at once."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL

from flows.generate import generate_video
from flows.request import GenerationRequest
from tasks import allocate
from tasks.allocate import acquire_gpus, gpu_lease_lost, hold_gpus, release_gpus
from tasks.denoise import listen_to_steps
from tasks.gpus import SimulatedGpu, read_gpu_profile
from tasks.leases import GpuLeaseLost, Reaped, limit_name, lock_dir, reap_dead_leases, try_acquire
from tasks.settings import get_settings

ONE_GPU = read_gpu_profile([SimulatedGpu()])


@pytest.fixture
def tag_base() -> str:
    return f"l{uuid.uuid4().hex[:8]}"


@pytest.fixture
def quick_renewal(monkeypatch):
    """Renew every 0.3 s (the server's shortest lease is 60 s), so a forgotten lease is noticed at once."""
    monkeypatch.setattr(allocate, "RENEW_FRACTION", 0.005)


def _active(tag: str) -> int:
    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(limit_name(tag)).active_slots


def _acquire(tag_base: str):
    with get_client(sync_client=True) as client:
        return acquire_gpus(client, ONE_GPU, "max_speed", tag_base, poll_seconds=0.2)


def _forget(lease_id: UUID) -> None:
    """What a server that lost the lease looks like to its holder: another client releases it."""
    with get_client(sync_client=True) as client:
        client.release_concurrency_slots_with_lease(lease_id)


def _wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_release_the_server_did_not_need_is_not_logged_as_a_release(prefect_server, tag_base, caplog):
    caplog.set_level(logging.INFO, logger="wanflow")
    allocation = _acquire(tag_base)
    with hold_gpus(allocation):
        _forget(allocation.lease_id)
    assert f"released {tag_base}-0" not in caplog.text
    assert f"{tag_base}-0: the server no longer held this run's lease; nothing to release" in caplog.text
    assert release_gpus(allocation) is False and _active(f"{tag_base}-0") == 0


def test_a_forgotten_lease_is_taken_again(prefect_server, tag_base, quick_renewal, caplog):
    caplog.set_level(logging.INFO, logger="wanflow")
    allocation = _acquire(tag_base)
    first = allocation.lease_id
    with hold_gpus(allocation):
        _forget(first)
        _wait_for(lambda: allocation.lease_id != first)
        assert _active(f"{tag_base}-0") == 1 and gpu_lease_lost() is None
        assert (lock_dir() / "leases" / f"{allocation.lease_id}.json").is_file()
        assert not (lock_dir() / "leases" / f"{first}.json").exists()
    assert "(it answered 410); took them again under a new lease" in caplog.text
    assert f"released {tag_base}-0" in caplog.text and _active(f"{tag_base}-0") == 0


def test_a_lease_lost_to_another_run_stops_the_gpu_work(prefect_server, tag_base, quick_renewal, caplog):
    caplog.set_level(logging.INFO, logger="wanflow")
    allocation = _acquire(tag_base)
    with pytest.raises(GpuLeaseLost, match=f"lost GPU {tag_base}-0: the server no longer held"):
        with hold_gpus(allocation):
            _forget(allocation.lease_id)
            with get_client(sync_client=True) as client:
                thief = try_acquire(client, [f"{tag_base}-0"], 60)
            _wait_for(gpu_lease_lost)
            assert "another run holds some of them now" in gpu_lease_lost()
    assert "released" not in caplog.text
    assert _active(f"{tag_base}-0") == 1  # the other run's slot, untouched
    _forget(thief)


def test_generation_fails_naming_the_gpu_when_its_lease_is_lost(prefect_server, wan_env, monkeypatch,
                                                                  quick_renewal):
    base = f"g{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("WAN_GPU_INVENTORY", "[{}]")
    monkeypatch.setenv("WAN_GPU_TAG_PREFIX", base)
    get_settings.cache_clear()
    thieves = []

    def lose_the_gpu_at_step_2(info):
        if info.step == 1:
            [holder] = [json.loads(p.read_text()) for p in (lock_dir() / "leases").glob("*.json")
                        if f"{base}-0" in json.loads(p.read_text())["tags"]]
            _forget(UUID(holder["lease_id"]))
            with get_client(sync_client=True) as client:
                thieves.append(try_acquire(client, [f"{base}-0"], 60))
            _wait_for(gpu_lease_lost)

    with listen_to_steps(lose_the_gpu_at_step_2):
        state = generate_video(GenerationRequest(task="tiny", frame_count=5, strategy="concurrent"),
                               return_state=True)
    assert state.is_failed() and f"lost GPU {base}-0" in state.message, state.message
    assert not list(wan_env.glob("*/*/video.mp4"))
    assert _active(f"{base}-0") == 1  # the other run's slot, untouched
    _forget(thieves[0])


HOLDER = textwrap.dedent("""
    import sys, time
    from prefect.client.orchestration import get_client
    from tasks.allocate import acquire_gpus
    from tasks.gpus import SimulatedGpu, read_gpu_profile
    with get_client(sync_client=True) as client:
        allocation = acquire_gpus(client, read_gpu_profile([SimulatedGpu()]), "max_speed", sys.argv[1])
    print(allocation.lease_id, flush=True)
    time.sleep(600)
""")


def _killed_holder(tag_base: str) -> UUID:
    """A process that takes the GPU's lease and is SIGKILLed; returns its lease."""
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, tag_base], env=env, stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        lease_id = UUID(holder.stdout.readline().strip())
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    assert _active(f"{tag_base}-0") == 1
    return lease_id


def test_the_lease_of_a_killed_holder_is_given_back_at_once(prefect_server, tag_base):
    lease_id = _killed_holder(tag_base)
    with get_client(sync_client=True) as client:
        reaped = [r for r in reap_dead_leases(client) if f"{tag_base}-0" in r.tags]
        assert reaped == [Reaped(lease_id, [f"{tag_base}-0"], None)]
        assert _active(f"{tag_base}-0") == 0
        assert not (lock_dir() / "leases" / f"{lease_id}.json").exists()

        live = _acquire(tag_base)  # a live holder's lease is never reaped
        assert all(r.lease_id != live.lease_id for r in reap_dead_leases(client))
        assert _active(f"{tag_base}-0") == 1
    release_gpus(live)

    _killed_holder(tag_base)  # a run waiting for the GPU on this host frees it too, without a reaper
    started = time.monotonic()
    release_gpus(_acquire(tag_base))
    assert time.monotonic() - started < 10
