"""A resident engine worker serves only the run holding its GPU, streams the steps back, stops a job whose
caller asks or goes away, and its channel is cheap next to a denoising step."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from multiprocessing.connection import Listener

import pytest
import torch

import wan_engine
from tasks import engine_channel
from tasks.allocate import Allocation
from tasks.engine_channel import EngineRefused, EngineWorkerLost, Job, call
from tasks.engine_worker import EngineWorker, check_lease
from tasks.gpus import GpuInfo
from tasks.lockfiles import write_locked
from tasks.pipelines import EngineCache
from tests.tasks.runs import tiny_run
from wan_engine import GenerationCancelled

GPU = GpuInfo(index=0, device="cpu", name="simulated", total_bytes=10**9, free_bytes=10**9, compute_capability=(9, 0))


def holder_file(leases, tags, pid=None):
    lease_id = uuid.uuid4()
    fd = write_locked(leases / f"{lease_id}.json", {"lease_id": str(lease_id), "tags": tags, "pid": pid or os.getpid()})
    return lease_id, fd


def test_only_the_live_holder_of_the_gpus_lease_may_call_its_worker(tmp_path):
    mine, fd = holder_file(tmp_path, ["gpu-0"])
    check_lease(Job("denoise", lease_id=mine), "gpu-0", os.getpid(), tmp_path)  # accepted
    with pytest.raises(EngineRefused, match="names no lease"):
        check_lease(Job("denoise"), "gpu-0", os.getpid(), tmp_path)
    with pytest.raises(EngineRefused, match="not gpu-1 for the calling pid"):
        check_lease(Job("denoise", lease_id=mine), "gpu-1", os.getpid(), tmp_path)  # another GPU's slot
    with pytest.raises(EngineRefused, match="for the calling pid 1"):
        check_lease(Job("denoise", lease_id=mine), "gpu-0", 1, tmp_path)  # another process presenting it
    with pytest.raises(EngineRefused, match="not held on this host"):
        check_lease(Job("denoise", lease_id=uuid.uuid4()), "gpu-0", os.getpid(), tmp_path)
    os.close(fd)  # the holder died without removing its file
    with pytest.raises(EngineRefused, match="died"):
        check_lease(Job("denoise", lease_id=mine), "gpu-0", os.getpid(), tmp_path)


@pytest.fixture
def worker(tmp_path, monkeypatch):
    """An engine worker for gpu-0 on the CPU, serving from a thread of this process; leases in tmp_path."""
    monkeypatch.setattr(engine_channel, "engine_dir", lambda: tmp_path / "engines")
    monkeypatch.setattr("tasks.engine_worker.holder_dir", lambda: tmp_path / "leases")
    engine_channel.engine_dir().mkdir()
    listener = Listener(str(engine_channel.socket_path("gpu-0")), family="AF_UNIX", authkey=engine_channel.authkey())
    served = EngineWorker("gpu-0", "cpu", EngineCache())
    threading.Thread(target=served.serve, args=(listener,), daemon=True).start()
    yield served
    listener.close()


def held_run(tmp_path, **fields):
    lease_id, fd = holder_file(tmp_path / "leases", ["gpu-0"])
    return tiny_run(allocation=Allocation(gpus=[GPU], tags=["gpu-0"], lease_id=lease_id), **fields), fd


def test_the_worker_denoises_the_run_as_this_process_would_and_streams_its_steps(worker, tmp_path):
    run, fd = held_run(tmp_path, seed=5, steps=3)
    steps = []
    denoised = call("gpu-0", Job("denoise", run, run.allocation.lease_id), on_step=lambda i, r: steps.append(i.step))
    again = call("gpu-0", Job("denoise", run, run.allocation.lease_id))
    assert steps == [0, 1, 2] and torch.equal(denoised.latents, again.latents)
    assert denoised.engine["resident"] and denoised.engine["loads"] == again.engine["loads"] == 1
    started = time.perf_counter()
    for _ in range(20):
        assert call("gpu-0", Job("status"))["loads"] == 1
    assert (time.perf_counter() - started) / 20 < 0.05  # a call costs milliseconds, a step of a real model seconds
    os.close(fd)


def test_a_job_stops_between_steps_when_its_caller_cancels(worker, tmp_path):
    run, fd = held_run(tmp_path, steps=50)
    with pytest.raises(GenerationCancelled):
        call("gpu-0", Job("denoise", run, run.allocation.lease_id), should_cancel=lambda: True)
    assert call("gpu-0", Job("status"))["busy"] is False  # free for the next run
    os.close(fd)


def test_a_job_that_does_not_stop_after_its_cancel_ends_the_worker_process(tmp_path, monkeypatch):
    """A step longer than the cancel grace (a big model) must not keep a cancelled run's GPU busy."""
    monkeypatch.setattr(engine_channel, "engine_dir", lambda: tmp_path / "engines")
    monkeypatch.setattr("tasks.engine_worker.holder_dir", lambda: tmp_path / "leases")
    monkeypatch.setattr("tasks.engine_worker.CANCEL_GRACE_S", 0.5)
    engine_channel.engine_dir().mkdir()

    def one_long_step(checkpoint, device, dtype):
        pipe = wan_engine.load_pipeline(checkpoint, device=device, dtype=dtype)
        pipe.generate = lambda *args, **kwargs: time.sleep(5)  # never asks whether to stop
        return pipe

    exits = []
    served = EngineWorker("gpu-0", "cpu", EngineCache(load_pipeline=one_long_step))
    served.exit = lambda status: exits.append((status, time.monotonic()))
    listener = Listener(str(engine_channel.socket_path("gpu-0")), family="AF_UNIX", authkey=engine_channel.authkey())
    threading.Thread(target=served.serve, args=(listener,), daemon=True).start()
    run, fd = held_run(tmp_path)
    cancel_at = []

    def cancel_once_running() -> bool:
        if not cancel_at and served.busy.locked():
            cancel_at.append(time.monotonic())
        return bool(cancel_at)

    caller = threading.Thread(target=lambda: _ignore(call, "gpu-0", Job("denoise", run, run.allocation.lease_id),
                                                      should_cancel=cancel_once_running), daemon=True)
    caller.start()
    deadline = time.monotonic() + 60
    while not exits:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert exits[0][0] == 75 and exits[0][1] - cancel_at[0] < 2  # the grace (0.5 s), not the step (5 s)
    listener.close()
    os.close(fd)


def _ignore(function, *args, **kwargs):
    try:
        function(*args, **kwargs)
    except Exception:
        pass


def test_a_caller_without_the_gpus_lease_is_refused(worker, tmp_path):
    lease_id, fd = holder_file(tmp_path / "leases", ["gpu-1"])
    run = tiny_run(allocation=Allocation(gpus=[GPU], tags=["gpu-0"], lease_id=lease_id))
    with pytest.raises(EngineRefused, match="refused"):
        call("gpu-0", Job("denoise", run, lease_id))
    os.close(fd)


def test_a_worker_that_dies_mid_call_fails_the_call_saying_so(tmp_path, monkeypatch):
    monkeypatch.setattr(engine_channel, "engine_dir", lambda: tmp_path)
    key = engine_channel.authkey()
    dying = ("import pickle, sys, os; from multiprocessing.connection import Listener\n"
             f"l = Listener({str(tmp_path / 'gpu-0.sock')!r}, family='AF_UNIX', authkey={key!r})\n"
             "print('ready', flush=True); c = l.accept(); c.recv_bytes(); os._exit(9)\n")
    process = subprocess.Popen([sys.executable, "-c", dying], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "ready"
        with pytest.raises(EngineWorkerLost, match=r"resident engine worker of gpu-0 \(pid \d+\) died during denoise"):
            call("gpu-0", Job("denoise", tiny_run(), uuid.uuid4()))
    finally:
        process.kill()
        process.wait()


def test_with_no_worker_answering_a_run_fails_with_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(engine_channel, "engine_dir", lambda: tmp_path)
    with pytest.raises(EngineWorkerLost, match="is `wanflow worker` running"):
        call("gpu-0", Job("status"), wait_s=0.5)
