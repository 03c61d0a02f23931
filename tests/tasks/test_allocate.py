"""allocate-gpus: strategies, waiting in arrival order, cancelling a wait, releasing, slots of killed processes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import httpx
import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.settings import PREFECT_API_URL
from prefect.states import Cancelled, Cancelling, State

from tasks import allocate
from tasks.allocate import acquire_gpus, allocate_gpus, ensure_limits, gpu_environment, hold_gpus, release_gpus
from tasks.gpu_queue import choose_gpus
from tasks.gpus import GpuLink, SimulatedGpu, read_gpu_profile
from tasks.leases import limit_name, reconcile_stale_slots, share_locks, try_acquire

TWO_GPUS = read_gpu_profile([SimulatedGpu(), SimulatedGpu()])
FOUR_GPUS = read_gpu_profile([SimulatedGpu()] * 4)


@pytest.fixture
def tag_base() -> str:
    """Tags of their own for each test, so slots never leak between tests."""
    return f"t{uuid.uuid4().hex[:8]}"


def _active(tag: str) -> int:
    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(limit_name(tag)).active_slots


def _acquire(profile, strategy, tag_base, **kwargs):
    with get_client(sync_client=True) as client:
        return acquire_gpus(client, profile, strategy, tag_base, poll_seconds=0.2, **kwargs)


def test_choose_gpus_by_strategy():
    assert choose_gpus("concurrent", [0, 1, 2, 3], [1, 3]) == [1]
    assert choose_gpus("concurrent", [0, 1, 2, 3], [1, 3], gpus_per_job=2) == [1, 3]
    assert choose_gpus("concurrent", [0, 1, 2, 3], [3], gpus_per_job=2) == []
    assert choose_gpus("max_speed", [0, 1], [0, 1]) == [0, 1]
    assert choose_gpus("max_speed", [0, 1], [1]) == []
    assert choose_gpus("auto", [0, 1, 2, 3], [0, 2, 3]) == [0, 2, 3]
    assert choose_gpus("auto", [0, 1, 2, 3], [0, 2, 3], world_sizes=[1, 2, 4]) == [0, 2]  # no job on 3
    assert choose_gpus("auto", [0, 1], []) == []
    assert choose_gpus("auto", [0, 1, 2, 3], [1, 2, 3], world_sizes=[1]) == [1]  # no more than the job computes on


def test_gpu_environment_never_enables_nvlink_multicast():
    profile = TWO_GPUS.model_copy(update={"links": [GpuLink(a=0, b=1, p2p=False, nvlink=False)]})
    assert gpu_environment(profile.gpus[:1], profile) == {"NCCL_NVLS_ENABLE": "0"}
    assert gpu_environment(profile.gpus, profile) == {"NCCL_NVLS_ENABLE": "0", "NCCL_P2P_DISABLE": "1"}


def test_concurrent_jobs_get_their_own_gpu_and_a_third_waits(prefect_server, tag_base):
    first = _acquire(TWO_GPUS, "concurrent", tag_base)
    second = _acquire(TWO_GPUS, "concurrent", tag_base)
    assert {first.tags[0], second.tags[0]} == {f"{tag_base}-0", f"{tag_base}-1"}
    said, third = [], []
    waiter = threading.Thread(target=lambda: third.append(
        _acquire(TWO_GPUS, "concurrent", tag_base, on_wait=said.append)))
    waiter.start()
    time.sleep(1.5)
    assert not third
    assert said == [f"waiting for 1 GPU of {tag_base}-0, {tag_base}-1 (concurrent), 1st in line of 1"]
    release_gpus(second)
    waiter.join(timeout=30)
    assert third[0].tags == second.tags and third[0].waited_s > 1
    release_gpus(first)
    release_gpus(third[0])
    assert _active(f"{tag_base}-0") == _active(f"{tag_base}-1") == 0


def test_max_speed_takes_every_selected_gpu(prefect_server, tag_base):
    allocation = _acquire(FOUR_GPUS, "max_speed", tag_base, gpu_ids=[1, 2])
    assert allocation.gpu_ids == [1, 2] and allocation.device == "cpu"
    assert [_active(f"{tag_base}-{i}") for i in (1, 2)] == [1, 1]
    other = _acquire(FOUR_GPUS, "auto", tag_base)
    assert other.gpu_ids == [0, 3]  # auto: everything that is free now
    assert [_active(f"{tag_base}-{i}") for i in range(4)] == [1, 1, 1, 1]
    release_gpus(allocation)
    release_gpus(other)


def test_no_gpu_allocates_nothing(prefect_server, tag_base):
    allocation = _acquire(read_gpu_profile([]), "auto", tag_base)
    assert allocation.gpus == [] and allocation.lease_id is None and allocation.device == "cpu"


def test_hold_releases_on_failure(prefect_server, tag_base):
    allocation = _acquire(TWO_GPUS, "max_speed", tag_base)
    with pytest.raises(RuntimeError, match="boom"), hold_gpus(allocation):
        assert _active(f"{tag_base}-0") == 1
        raise RuntimeError("boom")
    assert _active(f"{tag_base}-0") == _active(f"{tag_base}-1") == 0


def test_waiting_run_says_so_in_its_state_message(prefect_server, tag_base):
    """The UI lists a run's state message: a waiting run names the GPUs it waits for."""
    blocker = _acquire(TWO_GPUS, "max_speed", tag_base)

    @flow(name=f"wait-{tag_base}")
    def waits_for_gpus():
        allocation = allocate_gpus(TWO_GPUS, "concurrent", tag_base, poll_seconds=0.2)
        release_gpus(allocation)
        return allocation.tags

    result = []
    runner = threading.Thread(target=lambda: result.append(waits_for_gpus()))
    runner.start()
    message = None
    with get_client(sync_client=True) as client:
        for _ in range(100):
            messages = [run.state.message or "" for run in client.read_flow_runs() if run.state]
            message = next((m for m in messages if tag_base in m), None)
            if message:
                break
            time.sleep(0.2)
    release_gpus(blocker)
    runner.join(timeout=60)
    assert message == f"waiting for 1 GPU of {tag_base}-0, {tag_base}-1 (concurrent), 1st in line of 1"
    assert len(result[0]) == 1


HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from prefect.client.orchestration import get_client
    from tasks.leases import share_locks, try_acquire
    tag, lock_dir = sys.argv[1], Path(sys.argv[2])
    share_locks(lock_dir, [tag])
    with get_client(sync_client=True) as client:
        assert try_acquire(client, [tag], 60) is not None
    print("held", flush=True)
    time.sleep(600)
""")


def test_slot_of_a_killed_process_is_reconciled(prefect_server, tag_base, tmp_path):
    """Embedded mode runs no lease expiry: a SIGKILLed holder's slot is given back by the next run."""
    tag = f"{tag_base}-0"
    with get_client(sync_client=True) as client:
        ensure_limits(client, [tag])
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, tag, str(tmp_path)], env=env, stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "held"
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    assert _active(tag) == 1
    with get_client(sync_client=True) as client:
        assert reconcile_stale_slots(client, [tag], tmp_path) == [tag]
    assert _active(tag) == 0

    # A live holder keeps its slot.
    fds = share_locks(tmp_path, [tag])
    with get_client(sync_client=True) as client:
        lease = try_acquire(client, [tag], 60)
        assert reconcile_stale_slots(client, [tag], tmp_path) == []
        assert _active(tag) == 1
        client.release_concurrency_slots_with_lease(lease)
    for fd in fds:
        os.close(fd)


def _wait_for(condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _allocating_flow(name: str, tag_base: str, after_allocation: list):
    """A flow that takes both GPUs (max_speed), records the allocation its body got, and gives them back."""

    @flow(name=name)
    def allocating():
        allocation = allocate_gpus(TWO_GPUS, "max_speed", tag_base, poll_seconds=0.2)
        if isinstance(allocation, State):
            return Cancelled(message=allocation.message)
        after_allocation.append(allocation)
        release_gpus(allocation)

    return allocating


def test_cancelling_a_waiting_run_ends_it_cancelled_without_the_gpu(prefect_server, tag_base):
    """The UI's Cancel on a run that waits for a GPU: it stops waiting, never takes the slot, never resumes."""
    blocker = _acquire(TWO_GPUS, "max_speed", tag_base)
    after_allocation = []

    waits_for_gpus = _allocating_flow(f"cancel-{tag_base}", tag_base, after_allocation)

    states = []
    runner = threading.Thread(target=lambda: states.append(waits_for_gpus(return_state=True)))
    runner.start()
    with get_client(sync_client=True) as client:
        def waiting_run():
            runs = [r for r in client.read_flow_runs() if r.state and tag_base in (r.state.message or "")]
            return runs[0] if runs else None

        _wait_for(waiting_run, what="the run to say it waits")
        client.set_flow_run_state(waiting_run().id, Cancelling())  # what the UI's Cancel button sends
        time.sleep(0.5)
        release_gpus(blocker)
        runner.join(timeout=60)
        assert states[0].is_cancelled() and "cancelled while waiting for" in states[0].message, states[0]
        assert client.read_flow_run(states[0].state_details.flow_run_id).state.is_cancelled()
    assert not after_allocation
    assert _active(f"{tag_base}-0") == _active(f"{tag_base}-1") == 0


def test_a_four_gpu_run_is_served_before_later_one_gpu_runs(prefect_server, tag_base):
    """Arrival order: GPUs freed one by one go to the oldest waiter (max_speed, 4 GPUs), not to later 1-GPU runs."""
    blockers = [_acquire(FOUR_GPUS, "concurrent", tag_base) for _ in range(4)]
    got: dict[str, object] = {}
    said: dict[str, list[str]] = {"big": [], "small-0": [], "small-1": []}

    def wait(name, strategy):
        got[name] = _acquire(FOUR_GPUS, strategy, tag_base, on_wait=said[name].append)

    threads = {"big": threading.Thread(target=wait, args=("big", "max_speed"))}
    threads["big"].start()
    _wait_for(lambda: said["big"], what="the 4-GPU run to wait")
    for name in ("small-0", "small-1"):
        threads[name] = threading.Thread(target=wait, args=(name, "concurrent"))
        threads[name].start()
        _wait_for(lambda name=name: said[name], what=f"{name} to wait")
    for blocker in blockers:
        release_gpus(blocker)
        time.sleep(0.6)  # more than the waiters' poll: each freed GPU is seen alone
    threads["big"].join(timeout=30)
    assert got["big"].gpu_ids == [0, 1, 2, 3]
    assert "small-0" not in got and "small-1" not in got
    gpus = f"{tag_base}-0..{tag_base}-3"
    assert said["big"][0] == f"waiting for 4 GPUs of {gpus} (max_speed), 1st in line of 1"
    assert said["small-1"][0] == f"waiting for 1 GPU of {gpus} (concurrent), 3rd in line of 3"
    release_gpus(got["big"])
    for name in ("small-0", "small-1"):
        threads[name].join(timeout=30)
        release_gpus(got[name])
    assert got["small-0"].waited_s > got["big"].waited_s - 1


def test_a_cancel_that_lands_while_the_gpus_are_taken_gives_them_back(prefect_server, tag_base, monkeypatch):
    take_lease, after_allocation = allocate.take_lease, []

    def cancel_while_taking(*args, **kwargs):
        taken = take_lease(*args, **kwargs)
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(FlowRunContext.get().flow_run.id, Cancelling())
        return taken

    monkeypatch.setattr(allocate, "take_lease", cancel_while_taking)

    takes_gpus = _allocating_flow(f"cancel-late-{tag_base}", tag_base, after_allocation)

    state = takes_gpus(return_state=True)
    assert state.is_cancelled() and "cancelled before its GPU work" in state.message, state
    assert not after_allocation
    assert _active(f"{tag_base}-0") == _active(f"{tag_base}-1") == 0


def test_the_allocate_body_holds_nothing_on_a_host_without_gpus_and_asks_no_server(no_prefect_server):
    allocation = allocate_gpus.fn(read_gpu_profile([]), "auto", "gpu", lease_seconds=90.0)
    assert (allocation.device, allocation.gpus, allocation.tags, allocation.lease_id) == ("cpu", [], [], None)
    assert allocation.lease_seconds == 90.0
    assert allocate_gpus.fn(TWO_GPUS, "max_speed", "gpu", gpu_ids=[7]).gpus == []  # none of the selected GPUs here


def test_without_a_server_the_allocate_body_cannot_take_gpus(no_prefect_server):
    """The check the test above relies on: under `no_prefect_server` a body that asks the server fails."""
    with pytest.raises(httpx.ConnectError, match="Connection refused"):
        allocate_gpus.fn(TWO_GPUS, "max_speed", f"g{uuid.uuid4().hex[:8]}")
