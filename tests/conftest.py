"""Shared test fixtures: where the oracle checkpoint tree and reference tensors live."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

# Where Triton is installed but no GPU is, its interpreter runs the engine's kernels on the CPU
# (tests/wan_engine/test_triton_kernels.py). Triton reads the switch when first imported, so it is set here,
# before any test module imports the engine; a GPU machine runs the kernels for real.
if importlib.util.find_spec("triton") is not None and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ORACLE_DIR = Path(__file__).parent / "fixtures" / "oracle"
REFS_DIR = ORACLE_DIR / "refs"


def load_ref(name: str) -> dict:
    """One reference file written by tests/oracle/make_refs.py (official code, CPU, fp32)."""
    return torch.load(REFS_DIR / name, weights_only=False)


@pytest.fixture(scope="session")
def oracle_dir() -> Path:
    return ORACLE_DIR


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b|| in float64: the conformance measure of DESIGN.md."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
