"""The samplers against the official Wan2.2 schedulers: schedules, 10-step trajectories, Euler, errors."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import load_ref, rel_err
from wan_engine.samplers import SOLVERS, make_schedule, make_solver, shift_sigmas

# the (steps, shift) pairs and trajectories stored in d_schedulers.pt (oracle README section 5)
SCHEDULE_CASES = [(solver, steps, shift) for solver in ("unipc", "dpm++")
                  for steps, shift in ((10, 5), (10, 12), (40, 12), (40, 5), (50, 5), (20, 5), (4, 3))]
TRAJECTORY_CASES = [(solver, 10, shift) for solver in ("unipc", "dpm++") for shift in (5, 12)]


def _key(solver: str, steps: int, shift: float) -> str:
    return f"{solver}_steps{steps}_shift{shift:g}"


@pytest.fixture(scope="module")
def refs() -> dict:
    return load_ref("d_schedulers.pt")


@pytest.mark.parametrize(("solver", "steps", "shift"), SCHEDULE_CASES, ids=lambda v: str(v))
def test_schedule_matches_official(refs, solver, steps, shift):
    ref = refs["schedules"][_key(solver, steps, shift)]
    schedule = make_schedule(solver, steps, shift)
    assert schedule.timesteps.dtype == torch.int64 and schedule.sigmas.dtype == torch.float32
    assert torch.equal(schedule.timesteps, ref["timesteps"])
    torch.testing.assert_close(schedule.sigmas, ref["sigmas"], atol=1e-7, rtol=0)
    assert schedule.sigmas[-1] == 0


@pytest.mark.parametrize(("steps", "shift"), [(10, 5), (40, 12), (4, 3)])
def test_shift_matches_official_sampling_sigmas(refs, steps, shift):
    ref = refs["schedules"][_key("dpm++", steps, shift)]["get_sampling_sigmas"]
    unshifted = torch.linspace(1, 0, steps + 1, dtype=torch.float64)[:steps]
    torch.testing.assert_close(shift_sigmas(unshifted, shift), ref, atol=1e-12, rtol=0)


def test_schedules_start_where_the_official_ones_do():
    assert make_schedule("unipc", 40, 12).timesteps[0] == 999
    assert make_schedule("dpm++", 40, 12).timesteps[0] == 1000
    assert torch.equal(make_schedule("euler", 40, 12).sigmas, make_schedule("unipc", 40, 12).sigmas)


@pytest.mark.parametrize(("solver", "steps", "shift"), TRAJECTORY_CASES, ids=lambda v: str(v))
def test_trajectory_matches_official(refs, solver, steps, shift):
    ref = refs["trajectories"][_key(solver, steps, shift)]
    sampler = make_solver(solver, steps, shift)
    x = ref["sample0"]
    errors = []
    for model_output, expected in zip(ref["model_outputs"], ref["samples"], strict=True):
        x = sampler.step(model_output, x)
        errors.append(rel_err(x, expected))
    assert max(errors) < 1e-5, errors


def test_euler_follows_a_straight_flow_onto_x0():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 2, 16, 3, 4, 4, generator=g)
    sampler = make_solver("euler", 10, 5.0)
    sigmas = sampler.schedule.sigmas.tolist()
    x = (1 - sigmas[0]) * x0 + sigmas[0] * noise
    for sigma in sigmas[1:]:
        x = sampler.step(noise - x0, x)  # the exact velocity of x = (1 - sigma)·x0 + sigma·noise
        torch.testing.assert_close(x, (1 - sigma) * x0 + sigma * noise, atol=1e-5, rtol=0)
    torch.testing.assert_close(x, x0, atol=1e-6, rtol=0)


@pytest.mark.parametrize("solver", SOLVERS)
def test_batch_equals_samples_run_alone(solver):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 2, 4, 4, generator=g)
    outputs = torch.randn(6, 2, 16, 2, 4, 4, generator=g)
    batched, alone = make_solver(solver, 6, 5.0), [make_solver(solver, 6, 5.0) for _ in range(2)]
    xb, xs = x, list(x.split(1))
    for v in outputs:
        xb = batched.step(v, xb)
        xs = [s.step(vi, xi) for s, vi, xi in zip(alone, v.split(1), xs, strict=True)]
    assert torch.equal(xb, torch.cat(xs))


@pytest.mark.parametrize("solver", SOLVERS)
def test_a_solver_serves_one_generation(solver):
    sampler = make_solver(solver, 2, 5.0)
    x = torch.zeros(1, 4)
    x = sampler.step(torch.ones(1, 4), sampler.step(torch.ones(1, 4), x))
    with pytest.raises(RuntimeError, match="already ran all 2 steps"):
        sampler.step(torch.ones(1, 4), x)


def test_unknown_solver_is_named_with_the_choices():
    for build in (make_schedule, make_solver):
        with pytest.raises(ValueError) as err:
            build("ddim", 10, 5.0)
        assert "'ddim'" in str(err.value)
        assert all(name in str(err.value) for name in SOLVERS)


@pytest.mark.parametrize(("steps", "shift", "message"), [(0, 5.0, "steps"), (-3, 5.0, "steps"),
                                                          (10, 0.0, "shift")])
def test_bad_steps_or_shift_are_rejected(steps, shift, message):
    with pytest.raises(ValueError, match=message):
        make_solver("unipc", steps, shift)
