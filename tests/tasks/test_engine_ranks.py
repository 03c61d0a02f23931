"""A run held on two GPUs computes on both: two resident engine workers (CPU-backed, gloo) form a process group
for the job only, or, with no resident workers, the run's own two rank processes do; either way the latents
equal one process's within 1e-5 (fp32)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from tasks import engine_channel
from tasks.allocate import Allocation
from tasks.denoise import denoise
from tasks.engine_channel import Job, call, call_ranks
from tasks.gpu_phase import run_denoise
from tasks.gpus import GpuInfo
from tasks.lockfiles import write_locked
from tasks.pipelines import EngineCache
from tasks.processes import PPID, processes
from tests.tasks.runs import tiny_run


def gpu(index: int) -> GpuInfo:
    return GpuInfo(index=index, device="cpu", name="simulated", total_bytes=10**9, free_bytes=10**9,
                   compute_capability=(9, 0))


@pytest.fixture
def two_workers(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setattr(engine_channel, "engine_dir", lambda: home / "wanflow-engines")
    env = {**os.environ, "PREFECT_HOME": str(home), "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen([sys.executable, "-m", "tasks.engine_worker", "--tag", f"gpu-{i}", "--device", "cpu"],
                                env=env) for i in range(2)]
    try:
        for i in range(2):
            assert call(f"gpu-{i}", Job("status"), wait_s=60)["tag"] == f"gpu-{i}"
        yield home
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()


def test_two_resident_workers_compute_one_run_as_one_process_would(two_workers):
    lease_id = uuid.uuid4()
    fd = write_locked(two_workers / "wanflow-gpu-locks" / "leases" / f"{lease_id}.json",
                      {"lease_id": str(lease_id), "tags": ["gpu-0", "gpu-1"], "pid": os.getpid()})
    run = tiny_run(seed=3, steps=3, allocation=Allocation(gpus=[gpu(0), gpu(1)], tags=["gpu-0", "gpu-1"],
                                                          lease_id=lease_id))
    steps = []
    started = time.monotonic()
    denoised = call_ranks(["gpu-0", "gpu-1"], run, on_step=lambda info, reused: steps.append(info.step))
    assert time.monotonic() - started < 120
    os.close(fd)
    alone = run_denoise(EngineCache(), tiny_run(seed=3, steps=3))
    assert steps == [0, 1, 2]
    torch.testing.assert_close(denoised.latents, alone.latents, atol=1e-5, rtol=1e-5)
    engine = denoised.engine
    assert engine["parallel"]["world_size"] == 2 and engine["parallel"]["gpus"] == [0, 1]
    assert engine["parallel"]["ulysses"] * engine["parallel"]["cfg"] == 2
    assert [r["rank"] for r in engine["ranks"]] == [0, 1] and all(r["denoise_s"] > 0 for r in engine["ranks"])


def test_without_resident_workers_a_run_on_two_gpus_starts_its_own_two_rank_processes(no_prefect_server):
    run = tiny_run(seed=3, steps=3, allocation=Allocation(gpus=[gpu(0), gpu(1)], tags=["gpu-0", "gpu-1"]))
    denoised = denoise.fn(run)
    alone = run_denoise(EngineCache(), tiny_run(seed=3, steps=3))
    torch.testing.assert_close(denoised.latents, alone.latents, atol=1e-5, rtol=1e-5)
    assert not denoised.engine["resident"] and denoised.engine["parallel"]["world_size"] == 2
    assert denoised.engine["pid"] != os.getpid()  # rank 0 ran in a child
    assert not [p for p in child_commands() if "tasks.engine_worker" in p]  # and the children are gone


def child_commands() -> list[str]:
    """The command lines of this process's children, from /proc."""
    found = []
    for pid, fields in processes():
        if int(fields[PPID]) == os.getpid():
            try:
                found.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
            except OSError:
                continue  # it ended meanwhile
    return found
