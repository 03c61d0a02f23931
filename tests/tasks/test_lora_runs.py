"""LoRAs in the engine cache: a resident engine switches LoRAs between runs without reloading the base model;
each run equals a fresh load's with the same LoRAs, metadata records every file with its sha256 and the mode
(WAN_LORA_MODE: unmerged LoRAs are swapped inside their hooks), and a run on two resident rank workers applies
the same LoRAs on both ranks."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import uuid

import torch

from tasks.allocate import Allocation
from tasks.engine_channel import call_ranks
from tasks.gpu_phase import run_denoise
from tasks.lockfiles import write_locked
from tasks.pipelines import EngineCache
from tests.lora_files import in_layout, official_lora, write_lora
from tests.tasks.runs import tiny_run
from tests.tasks.test_engine_ranks import gpu, two_workers  # noqa: F401  (pytest fixture)
from wan_engine.configs import DISTILLED
from wan_engine.lora import LoraChoice


def _run(loras=()):
    d = DISTILLED
    return tiny_run(loras=loras, distilled=True, steps=d.steps, shift=d.shift, guide_scale=d.guide_scale,
                    solver=d.solver)


def test_switching_loras_between_runs_loads_the_model_once(tmp_path):
    a = write_lora(tmp_path / "a.safetensors", in_layout(official_lora(1), "official"))
    b = write_lora(tmp_path / "b.safetensors", in_layout(official_lora(2), "comfy"))
    run_a, run_b = _run((LoraChoice(str(a), 1.0),)), _run((LoraChoice(str(b), 0.7, "low"),))
    engines = EngineCache()
    first = run_denoise(engines, run_a)
    second = run_denoise(engines, run_b)
    plain = run_denoise(engines, _run())
    assert engines.loads == 1 and engines.lora_switches == 3
    assert not torch.equal(first.latents, second.latents) and not torch.equal(second.latents, plain.latents)
    assert torch.equal(run_denoise(EngineCache(), run_b).latents, second.latents)   # a fresh load's result
    assert torch.equal(run_denoise(EngineCache(), _run()).latents, plain.latents)   # removed bit-exactly
    sha256 = hashlib.sha256(b.read_bytes()).hexdigest()
    assert second.loras == [dict(path=str(b), name="b.safetensors", sha256=sha256, strength=0.7, expert="low",
                                 rank=4, layout="kohya", mode="merged")]
    assert plain.loras == [] and first.model_calls == {"computed": 4, "skipped": 0, "total": 4}
    _, speed = engines.tiered(dataclasses.replace(_run(), tier="speed"))
    assert speed.step_cache is None and speed.summary()["patches"][-1] == {
        "name": "step_cache", "on": False, "detail": "off in distilled mode (4 steps leave nothing to skip)"}


def test_two_resident_rank_workers_switch_loras_like_one_process(two_workers, tmp_path):  # noqa: F811
    a = write_lora(tmp_path / "a.safetensors", in_layout(official_lora(1), "official"))
    b = write_lora(tmp_path / "b.safetensors", in_layout(official_lora(2), "diffusers"))
    lease_id = uuid.uuid4()
    fd = write_locked(two_workers / "wanflow-gpu-locks" / "leases" / f"{lease_id}.json",
                      {"lease_id": str(lease_id), "tags": ["gpu-0", "gpu-1"], "pid": os.getpid()})
    allocation = Allocation(gpus=[gpu(0), gpu(1)], tags=["gpu-0", "gpu-1"], lease_id=lease_id)
    try:
        for path in (a, b):
            run = dataclasses.replace(_run((LoraChoice(str(path)),)), allocation=allocation)
            denoised = call_ranks(["gpu-0", "gpu-1"], run)
            alone = run_denoise(EngineCache(), _run((LoraChoice(str(path)),)))
            torch.testing.assert_close(denoised.latents, alone.latents, atol=1e-5, rtol=1e-5)
            assert denoised.engine["loads"] == 1 and denoised.loras[0]["name"] == path.name
    finally:
        os.close(fd)


def test_lora_mode_setting_unmerged_swaps_between_runs_and_is_recorded(tmp_path, monkeypatch):
    from tasks.settings import get_settings
    a = write_lora(tmp_path / "a.safetensors", in_layout(official_lora(1), "official"))
    b = write_lora(tmp_path / "b.safetensors", in_layout(official_lora(2), "diffusers"))
    merged = run_denoise(EngineCache(), _run((LoraChoice(str(b), 0.7),)))
    monkeypatch.setenv("WAN_LORA_MODE", "unmerged")
    get_settings.cache_clear()
    try:
        engines = EngineCache()
        run_denoise(engines, _run((LoraChoice(str(a)),)))
        (handle,) = engines._loras.values()
        second = run_denoise(engines, _run((LoraChoice(str(b), 0.7),)))
        assert list(engines._loras.values()) == [handle]   # swapped inside its hooks, not removed and re-applied
        assert second.loras[0]["mode"] == "unmerged" and merged.loras[0]["mode"] == "merged"
        torch.testing.assert_close(second.latents, merged.latents, atol=1e-4, rtol=1e-4)
        plain = run_denoise(engines, _run())
        assert torch.equal(plain.latents, run_denoise(EngineCache(), _run()).latents)
        assert engines.loads == 1 and engines.lora_switches == 3
    finally:
        get_settings.cache_clear()
