"""Precision patch: the process-wide TF32 / cuDNN settings change while applied and come back exactly."""
from __future__ import annotations

import torch

from patches.precision import PrecisionConfig, apply_precision, precision_state, restore_precision, tf32_status
from tests.patches import generate


def test_apply_changes_and_remove_restores_the_global_settings():
    before = precision_state()
    handle = apply_precision(None)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert torch.backends.cudnn.benchmark
    handle.remove()
    assert precision_state() == before
    torch.get_float32_matmul_precision()  # both API views stay readable (torch raises on a mix)


def test_a_process_on_the_new_tf32_api_is_restored_through_it():
    before = precision_state()
    try:
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        user = precision_state()
        handle = apply_precision(None, PrecisionConfig(cudnn_benchmark=False))
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        handle.remove()
        assert precision_state() == user
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False  # back to a state the legacy readers accept
        restore_precision(before)
    assert precision_state() == before


def test_outputs_bit_identical_after_remove(pipe, reference):
    with apply_precision(pipe):
        patched = generate(pipe)
    assert torch.equal(patched, reference)  # on a CPU the switches steer nothing
    assert torch.equal(generate(pipe), reference)


def test_tf32_is_off_without_a_gpu():
    on, why = tf32_status("cpu")
    assert not on and "no CUDA GPU" in why
