"""One job over several local devices with no resident workers: the run starts one rank process per device.

`run_job(devices, load, ...)` runs a generation on `devices`: on one device in this process (`generate`), on
k > 1 as k child processes (spawned, so CUDA and the parent's state never leak into them), each loading its
pipeline with `load(device)` (a picklable callable: a module-level function or a `functools.partial` of one,
which also applies the run's patches) and running `wan_engine.parallel.run_rank` in a job group of its own
(NCCL on GPUs, gloo on CPUs). Results are equal to the one-device run up to the roundings of the split.

The parent stays in charge: it relays rank 0's progress to `callback`, asks `should_cancel` and passes a yes to
every rank (they stop together at the next step), and ends every child it started, however the job ends. A
failed job raises `JobFailed` with the first failing rank's error.
"""
from __future__ import annotations

import datetime
import queue
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .parallel import DEFAULT_TIMEOUT, ParallelPlan, RankFailed, default_parallel_plan, init_job_group, run_rank
from .pipeline import GenerationCancelled, GenerationResult, StepInfo, WanPipeline

CANCEL_GRACE_S = 10.0   # after a cancel, how long the ranks get to stop at a step boundary before they are killed


class JobFailed(RuntimeError):
    """A rank of a local job failed; `rank` and `error` say which and how."""

    def __init__(self, rank: int, error: str):
        super().__init__(f"rank {rank} of the job failed: {error}")
        self.rank = rank
        self.error = error


def run_job(devices: Sequence[str | torch.device], load: Callable[[torch.device], WanPipeline],
            parallel: ParallelPlan | None = None, *, callback: Callable[[StepInfo], None] | None = None,
            should_cancel: Callable[[], bool] | None = None, timeout: datetime.timedelta = DEFAULT_TIMEOUT,
            **run_args) -> GenerationResult:
    """Generate one video on `devices` (`run_args` as `WanPipeline.generate`). `parallel`: how the ranks share
    the job (None: `choose_parallel_plan` for the model and the run's guidance)."""
    devices = [torch.device(d) for d in devices]
    if len(devices) == 1:
        if parallel is not None and parallel.world != 1:
            raise ValueError(f"the parallel plan needs {parallel.world} devices, got 1")
        return load(devices[0]).generate(**run_args, callback=callback, should_cancel=should_cancel)
    ctx = mp.get_context("spawn")
    cancel, progress = ctx.Event(), ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="wanflow-job-") as out:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        args = (devices, port, load, parallel, run_args, timeout, cancel, progress, out)
        procs = [ctx.Process(target=_rank_process, args=(rank, *args), daemon=True) for rank in range(len(devices))]
        for p in procs:
            p.start()
        try:
            _supervise(procs, cancel, progress, callback, should_cancel)
        finally:
            for p in procs:   # only ours, by their handles
                if p.is_alive():
                    p.kill()
                p.join()
        return _outcome(Path(out), len(devices))


def _supervise(procs: list, cancel, progress, callback, should_cancel) -> None:
    """Relay progress and cancellation until every rank has exited (or a cancel's grace ran out)."""
    cancelled_at = None
    while any(p.is_alive() for p in procs):
        try:
            info = progress.get(timeout=0.2)
            if callback is not None:
                callback(info)
        except queue.Empty:
            pass
        if cancelled_at is None and should_cancel is not None and should_cancel():
            cancel.set()
            cancelled_at = time.monotonic()
        if cancelled_at is not None and time.monotonic() - cancelled_at > CANCEL_GRACE_S:
            return
        if any(p.exitcode not in (None, 0) for p in procs):   # died without a word: the others will fail too
            deadline = time.monotonic() + 5
            while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
                time.sleep(0.1)
            return


def _outcome(out: Path, world: int) -> GenerationResult:
    """The job's result, or the error that ended it: a cancellation, else the first rank's own error."""
    if (out / "cancelled").exists():
        raise GenerationCancelled((out / "cancelled").read_text())
    errors = {r: (out / f"error-{r}.txt").read_text() for r in range(world) if (out / f"error-{r}.txt").exists()}
    origins = {r: e for r, e in errors.items() if not e.startswith(RankFailed.__name__)}
    if origins:
        rank = min(origins)
        raise JobFailed(rank, origins[rank].split(": ", 1)[1])
    if errors:   # every rank reports another's failure: the origin said nothing (it died)
        rank = min(errors)
        raise JobFailed(rank, errors[rank].split(": ", 1)[1])
    if not (out / "result.pt").exists():
        raise JobFailed(0, "a rank ended without a result or an error (killed?)")
    return torch.load(out / "result.pt", weights_only=False)


def _rank_process(rank: int, devices: list[torch.device], port: int, load, parallel: ParallelPlan | None,
                  run_args: dict, timeout: datetime.timedelta, cancel, progress, out: str) -> None:
    """One rank: its pipeline on its device, its part of the job, what it made or why it stopped under `out`."""
    device = devices[rank]
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:   # ranks sharing the host's cores: threads spinning beside a collective slow every step down
        torch.set_num_threads(max(1, torch.get_num_threads() // len(devices)))
    store = dist.TCPStore("127.0.0.1", port, len(devices), is_master=rank == 0, timeout=timeout)
    job = init_job_group(rank, len(devices), store, "nccl" if device.type == "cuda" else "gloo", timeout)
    try:
        with job.reporting():   # a rank that cannot load fails the others with its error, like one that raises later
            pipe = load(device)
            parallel = parallel or default_parallel_plan(pipe, len(devices), **{
                k: run_args[k] for k in ("steps", "shift", "solver", "guide_scale") if k in run_args})
        result = run_rank(pipe, job, parallel, **run_args, callback=progress.put if rank == 0 else None,
                          should_cancel=cancel.is_set)
        if rank == 0:
            torch.save(result, Path(out) / "result.pt.tmp")
            Path(out, "result.pt.tmp").rename(Path(out) / "result.pt")
    except GenerationCancelled as exc:
        Path(out, "cancelled").write_text(str(exc))
    except Exception as exc:
        Path(out, f"error-{rank}.txt").write_text(f"{type(exc).__name__}: {exc}")
    finally:
        job.close()
