"""Shared test fixtures: where the oracle checkpoint tree and reference tensors live."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
