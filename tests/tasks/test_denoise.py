"""The denoise task's body, called as a function: the run's latents, one callback per step, the record of what
the loop computed, and the same latents again for the same seed."""
from __future__ import annotations

import torch

from tasks.denoise import denoise, listen_to_steps
from tests.tasks.runs import tiny_run


def test_the_denoise_body_samples_the_run_it_is_given(no_prefect_server, fresh_engines):
    run = tiny_run(seed=7, steps=4)
    seen = []
    with listen_to_steps(lambda info: seen.append((info.step, info.total))):
        denoised = denoise.fn(run, fresh_engines)
    assert denoised.latents.shape == (16, 2, 8, 8)  # 5 frames -> 2 latent frames; 64 px / 8
    assert denoised.seed == 7 and denoised.settings["steps"] == 4 and len(denoised.step_seconds) == 4
    assert seen == [(i, 4) for i in range(4)]
    assert denoised.model_calls == {"computed": 8, "skipped": 0, "total": 8}  # cond and uncond, no step cache
    assert denoised.block_stack == ["computed"] * 4 and denoised.step_cache is None
    assert denoised.tier["tier"] == "quality" and denoised.energy is None  # a CPU run: no GPU energy
    assert torch.equal(denoise.fn(run, fresh_engines).latents, denoised.latents)
    assert not torch.equal(denoise.fn(tiny_run(seed=8, steps=4), fresh_engines).latents, denoised.latents)


def test_the_denoise_body_reports_what_the_speed_tiers_cache_skipped(no_prefect_server, fresh_engines):
    denoised = denoise.fn(tiny_run(tier="speed", steps=10, teacache_threshold=0.25), fresh_engines)
    cache = denoised.step_cache
    assert cache["method"] == "teacache" and cache["matches_schedule"]
    assert denoised.model_calls["skipped"] > 0 and denoised.skipped_steps
    assert all(denoised.block_stack[i] == "reused" for i in denoised.skipped_steps)
