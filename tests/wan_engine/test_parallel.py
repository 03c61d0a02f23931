"""One job on two CPU processes (gloo, float32, the tiny T2V, I2V and TI2V checkpoints) against the one-process loop.

Spawning costs seconds on a small machine, so one spawned job of two ranks runs every check in turn and rank 0
saves what it made; the checks end with a rank that raises mid-run, which must fail both ranks quickly."""
from __future__ import annotations

import datetime
import functools
import os
import socket
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

import wan_engine
from patches.compile import CompileConfig, apply_compile, warm_up
from patches.teacache import TeaCacheConfig, apply_teacache
from tests.conftest import ORACLE_DIR, rel_err
from wan_engine import RunHook
from wan_engine.parallel import ParallelPlan, RankFailed, init_job_group, run_rank
from wan_engine.ulysses import Ulysses

JOB_TIMEOUT = datetime.timedelta(seconds=20)   # every collective's bound in the spawned job
FAILING_JOB_TIMEOUT = datetime.timedelta(seconds=5)
SPAWN_LIMIT_S = 300
T2V = dict(prompt="a red fox in the snow", negative_prompt="blurry", size=(48, 48), frame_num=9, steps=4, seed=3)
I2V = dict(prompt="a boat on a lake", size=(48, 32), frame_num=5, steps=3, seed=4)
# TI2V at 96x32 (a 3:1 image keeps that size), 9 frames: 3 latent frames of 3 tokens, so a rank's tokens start
# inside a frame, and the image's frame (t = 0) has modulation rows of its own
TI2V = dict(prompt="a heron on a pier", size=(96, 32), frame_num=9, steps=3, seed=5)
TEACACHE = dict(steps=8, config=TeaCacheConfig(threshold=0.2, use_ret_steps=False))
# name -> (checkpoint, run arguments, parallel plan); T2V at 48x48, 9 frames: 27 tokens, an uneven split on 2
CHECKS = {
    "t2v_ulysses": ("t2v", T2V, ParallelPlan(2, 1)),
    "t2v_cfg": ("t2v", T2V, ParallelPlan(1, 2)),
    "t2v_unguided_ulysses": ("t2v", {**T2V, "guide_scale": 1.0}, ParallelPlan(2, 1)),
    "i2v_ulysses": ("i2v", I2V, ParallelPlan(2, 1)),
    "i2v_cfg": ("i2v", I2V, ParallelPlan(1, 2)),
    "ti2v_image_ulysses": ("ti2v", TI2V, ParallelPlan(2, 1)),
    "ti2v_image_cfg": ("ti2v", TI2V, ParallelPlan(1, 2)),
    "ti2v_text_ulysses": ("ti2v", {**TI2V, "image": None}, ParallelPlan(2, 1)),
}
FOLDERS = {"t2v": "t2v-A14B-tiny", "i2v": "i2v-A14B-tiny", "ti2v": "ti2v-5B-tiny"}


def _image(task: str) -> Image.Image:
    h, w = (30, 90) if task == "ti2v" else (40, 56)
    gradient = np.linspace(0, 255, h * w * 3).reshape(h, w, 3).astype(np.uint8)
    return Image.fromarray(gradient)


def _run_args(task: str, args: dict) -> dict:
    return {"image": _image(task), **args} if task in ("i2v", "ti2v") else dict(args)


def _load(task: str):
    return wan_engine.load_pipeline(ORACLE_DIR / FOLDERS[task], device="cpu", dtype=torch.float32)


class _RaiseAtStep(RunHook):
    def block_stack(self, call, tokens, run_blocks):
        if call.step == 1:
            raise ValueError("rank 1 ran out of luck")
        return run_blocks(tokens)


class _DieAtStep(RunHook):
    def block_stack(self, call, tokens, run_blocks):
        if call.step == 1:
            os._exit(0)   # gone without a word, like a killed process (exit 0: the spawner waits for the others)
        return run_blocks(tokens)


@torch.no_grad()
def _per_token_forwards(pipe, ulysses: Ulysses) -> tuple[torch.Tensor, torch.Tensor]:
    """One DiT forward with a timestep per token (TI2V's form), whole and split over the group."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 16, 3, 6, 6, generator=gen)   # 27 tokens: an uneven split
    t = torch.randint(0, 1000, (1, 27), generator=gen)
    context = torch.randn(1, 7, 4096, generator=gen)
    dit = pipe.experts["low_noise"]
    return dit(x, t, context), dit(x, t, context, ulysses=ulysses)


def _rank_main(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0, timeout=JOB_TIMEOUT)
    job = init_job_group(rank, 2, store, "gloo", JOB_TIMEOUT)
    pipes = {task: _load(task) for task in FOLDERS}
    results = {"per_token_t": _per_token_forwards(pipes["t2v"], Ulysses.of(job.group))}
    for name, (task, args, parallel) in CHECKS.items():
        results[name] = run_rank(pipes[task], job, parallel, **_run_args(task, args), decode=name == "t2v_ulysses")
    # a step-cached run: TeaCache on both ranks, its schedule from the plan, so both skip the same calls
    handle = apply_teacache(pipes["t2v"], TEACACHE["config"], steps=TEACACHE["steps"])
    results["t2v_teacache_ulysses"] = run_rank(pipes["t2v"], job, ParallelPlan(2, 1), **T2V | {"steps": 8},
                                               decode=False)
    results["teacache_calls"] = [(c.step, c.branches, c.computed) for c in handle.calls]
    # and with one branch per rank: each rank follows its own branch's row of the (unbatched) schedule
    results["t2v_teacache_cfg"] = run_rank(pipes["t2v"], job, ParallelPlan(1, 2), **T2V | {"steps": 8}, decode=False)
    results[f"teacache_cfg_calls_{rank}"] = [(c.step, c.branches, c.computed) for c in handle.calls]
    handle.remove()
    # compiled blocks (full graphs, the all-to-alls inside them), traced by AOTAutograd without generating kernels
    with apply_compile(pipes["t2v"], CompileConfig(backend="aot_eager")):
        results["t2v_ulysses_compiled"] = run_rank(pipes["t2v"], job, ParallelPlan(2, 1), **T2V, decode=False,
                                                   warm_up=functools.partial(warm_up, pipes["t2v"]))
    # a cancel asked on rank 1 only stops both ranks at the same step; the group serves on
    asked = []

    def should_cancel() -> bool:   # rank 1 says yes when asked before the second step
        asked.append(True)
        return rank == 1 and len(asked) == 2

    try:
        run_rank(pipes["t2v"], job, ParallelPlan(2, 1), **T2V, should_cancel=should_cancel, decode=False)
        outcome = "no cancel"
    except wan_engine.GenerationCancelled as exc:
        outcome = str(exc)
    (Path(out) / f"cancel-{rank}.txt").write_text(outcome)
    if rank == 1:
        torch.save(results["teacache_cfg_calls_1"], Path(out) / "teacache_cfg_calls_1.pt")
    if rank == 0:
        torch.save(results, Path(out) / "results.pt")
    job.close()
    # a failing job, in a group of its own with a short timeout: rank 1 raises at step 1 (and lives on, as a
    # resident worker would), rank 0 must fail within the timeout with rank 1's error
    job = init_job_group(rank, 2, dist.PrefixStore("job-2", store), "gloo", FAILING_JOB_TIMEOUT)
    broken = _RaiseAtStep()
    if rank == 1:
        pipes["t2v"].hooks.register(broken)
    started = time.monotonic()
    try:
        run_rank(pipes["t2v"], job, ParallelPlan(2, 1), **T2V, decode=False)
        outcome = "no error"
    except Exception as exc:
        outcome = f"{type(exc).__name__}|{getattr(exc, 'rank', '')}|{exc}"
    (Path(out) / f"failure-{rank}.txt").write_text(f"{time.monotonic() - started:.3f}\n{outcome}")
    # the same processes (long-lived workers) form the next job's group, under a prefix of the store, and serve it
    pipes["t2v"].hooks.remove(broken)
    job = init_job_group(rank, 2, dist.PrefixStore("job-3", store), "gloo", JOB_TIMEOUT)
    again = run_rank(pipes["t2v"], job, ParallelPlan(1, 2), **T2V, decode=False)
    job.close()
    if rank == 0:
        torch.save(again, Path(out) / "after_failure.pt")


def _rank_2x2(rank: int, port: int, out: str) -> None:
    """Four ranks: 2 CFG halves x 2 Ulysses ranks each; then a plan whose Ulysses degree the heads refuse."""
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, 4, is_master=rank == 0, timeout=JOB_TIMEOUT)
    job = init_job_group(rank, 4, store, "gloo", JOB_TIMEOUT)
    pipe = _load("t2v")
    result = run_rank(pipe, job, ParallelPlan(2, 2), **T2V, decode=False)
    try:
        run_rank(pipe, job, ParallelPlan(4, 1), **T2V, decode=False)
        refused = "accepted"
    except ValueError as exc:
        refused = str(exc)
    if rank == 0:
        torch.save({"t2v_2x2": result}, Path(out) / "results.pt")
    (Path(out) / f"refused-{rank}.txt").write_text(refused)
    # last: rank 3 dies mid-run (no error of its own to report); the others must fail, not wait
    if rank == 3:
        pipe.hooks.register(_DieAtStep())
    started = time.monotonic()
    try:
        run_rank(pipe, job, ParallelPlan(2, 2), **T2V, decode=False)
        outcome = "no error"
    except Exception as exc:
        outcome = type(exc).__name__
    (Path(out) / f"died-{rank}.txt").write_text(f"{time.monotonic() - started:.3f}\n{outcome}")


def _rank_entry(rank: int, main, port: int, out: str) -> None:
    try:
        main(rank, port, out)
    except BaseException:
        (Path(out) / f"crash-{rank}.txt").write_text(traceback.format_exc())
        raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(main, nprocs: int, out: Path) -> Path:
    """Runs `main(rank, port, out)` in `nprocs` processes (bounded, all killed at the end); fails on a crash."""
    ctx = mp.start_processes(_rank_entry, args=(main, _free_port(), str(out)), nprocs=nprocs, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + SPAWN_LIMIT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the two-rank job ran past {SPAWN_LIMIT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
    crashes = sorted(out.glob("crash-*.txt"))
    assert not crashes, crashes[0].read_text()
    return out


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    """Runs the two-rank job once and returns the folder of what its ranks wrote."""
    return _spawn(_rank_main, 2, tmp_path_factory.mktemp("parallel"))


@pytest.fixture(scope="module")
def results(job) -> dict:
    return torch.load(job / "results.pt", weights_only=False)


@pytest.fixture(scope="module")
def pipes() -> dict:
    return {task: _load(task) for task in FOLDERS}


@pytest.mark.parametrize("name", list(CHECKS))
def test_two_ranks_equal_the_one_process_loop(results, pipes, name):
    task, args, parallel = CHECKS[name]
    got = results[name]
    expected = pipes[task].generate(**_run_args(task, args), decode=name == "t2v_ulysses")
    assert rel_err(got.latents, expected.latents) < 1e-5
    assert got.parallel["world"] == 2 and (got.parallel["ulysses"], got.parallel["cfg"]) == (parallel.ulysses,
                                                                                              parallel.cfg)
    assert len(got.parallel["rank_denoise_seconds"]) == 2
    assert got.prompt_tokens.keys() == expected.prompt_tokens.keys()
    if expected.frames is not None:   # decoded on rank 0 like the one-process run
        assert np.abs(got.frames.astype(int) - expected.frames.astype(int)).max() <= 1


def test_a_forward_with_a_timestep_per_token_splits_its_modulation_with_its_tokens(results):
    whole, split = results["per_token_t"]
    assert rel_err(split, whole) < 1e-5


def test_a_step_cached_run_takes_the_same_skips_and_equals_the_one_process_loop(results, pipes):
    pipe = pipes["t2v"]
    handle = apply_teacache(pipe, TEACACHE["config"], steps=TEACACHE["steps"])
    try:
        expected = pipe.generate(**T2V | {"steps": 8}, decode=False)
        calls = [(c.step, c.branches, c.computed) for c in handle.calls]
    finally:
        handle.remove()
    assert any(not computed for *_, computed in calls), "the check needs a schedule that skips"
    assert results["teacache_calls"] == calls
    assert rel_err(results["t2v_teacache_ulysses"].latents, expected.latents) < 1e-5


def test_compiled_blocks_split_over_two_ranks_equal_the_one_process_loop(results, pipes):
    expected = pipes["t2v"].generate(**T2V, decode=False)
    assert rel_err(results["t2v_ulysses_compiled"].latents, expected.latents) < 1e-5
    assert results["t2v_ulysses_compiled"].timings["warm_up"] > 0   # compiled at the split shapes before step 1


def test_a_cancel_on_one_rank_stops_both_at_the_same_step_and_the_group_serves_on(job):
    assert [(job / f"cancel-{r}.txt").read_text() for r in (0, 1)] == ["cancelled before step 2/4"] * 2
    # the failure check after it ran on the same group: both ranks got there and into step 1
    assert (job / "failure-0.txt").exists() and (job / "failure-1.txt").exists()


def test_the_ranks_serve_the_next_job_after_a_failed_one(job, pipes):
    again = torch.load(job / "after_failure.pt", weights_only=False)
    assert rel_err(again.latents, pipes["t2v"].generate(**T2V, decode=False).latents) < 1e-5


def test_a_rank_that_raises_fails_the_job_on_every_rank_within_the_timeout(job):
    (seconds_0, outcome_0), (seconds_1, outcome_1) = (
        (job / f"failure-{r}.txt").read_text().split("\n", 1) for r in (0, 1))
    assert outcome_1 == "ValueError||rank 1 ran out of luck"
    kind, rank, message = outcome_0.split("|", 2)
    assert (kind, rank) == (RankFailed.__name__, "1") and "rank 1 ran out of luck" in message
    assert float(seconds_0) < FAILING_JOB_TIMEOUT.total_seconds() + 5


def test_four_ranks_as_two_cfg_halves_of_two_ulysses_ranks_equal_the_one_process_loop(tmp_path, pipes):
    out = _spawn(_rank_2x2, 4, tmp_path)
    got = torch.load(out / "results.pt", weights_only=False)["t2v_2x2"]
    assert rel_err(got.latents, pipes["t2v"].generate(**T2V, decode=False).latents) < 1e-5
    assert got.parallel | {"rank_denoise_seconds": None} == {"world": 4, "ulysses": 2, "cfg": 2,
                                                               "rank_denoise_seconds": None}
    refused = {(out / f"refused-{r}.txt").read_text() for r in range(4)}
    assert refused == {"Ulysses degree 4 does not divide the model's 2 heads"}   # on every rank, no hang
    for r in range(3):   # the survivors fail well before the job's timeout
        seconds, outcome = (out / f"died-{r}.txt").read_text().split("\n")
        assert outcome in ("RankFailed", "DistBackendError", "RuntimeError") and float(seconds) < 10, (r, outcome)


def test_a_job_of_one_rank_in_this_process_equals_generate(pipes):
    store = dist.TCPStore("127.0.0.1", _free_port(), 1, is_master=True, timeout=JOB_TIMEOUT)
    job = init_job_group(0, 1, store, "gloo", JOB_TIMEOUT)
    try:
        got = run_rank(pipes["t2v"], job, ParallelPlan(1, 1), **T2V, decode=False)
    finally:
        job.close()
    assert rel_err(got.latents, pipes["t2v"].generate(**T2V, decode=False).latents) < 1e-6
    assert got.parallel["world"] == 1 and got.settings["cfg"] == "batched"


def test_a_step_cached_run_with_one_branch_per_rank_equals_the_one_process_loop(job, results, pipes):
    pipe = pipes["t2v"]
    handle = apply_teacache(pipe, TEACACHE["config"], steps=TEACACHE["steps"])
    pipe.cfg_batch = False   # the one-process run with cond and uncond as separate calls: the same schedule
    try:
        expected = pipe.generate(**T2V | {"steps": 8}, decode=False)
        calls = [(c.step, c.branches, c.computed) for c in handle.calls]
    finally:
        pipe.cfg_batch = None
        handle.remove()
    rank_1 = torch.load(job / "teacache_cfg_calls_1.pt")
    assert results["teacache_cfg_calls_0"] == [c for c in calls if c[1] == ("cond",)]
    assert rank_1 == [c for c in calls if c[1] == ("uncond",)]
    assert any(not computed for *_, computed in calls)
    assert rel_err(results["t2v_teacache_cfg"].latents, expected.latents) < 1e-5
