"""Fixtures shared by the patch tests: an oracle-fixture pipeline per module and its unpatched result."""
from __future__ import annotations

import pytest
import torch

import wan_engine
from tests.conftest import ORACLE_DIR
from tests.patches import generate


@pytest.fixture(scope="module")
def pipe():
    return wan_engine.load_pipeline(ORACLE_DIR / "t2v-A14B-tiny", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def reference(pipe) -> torch.Tensor:
    """The unpatched result, made before any test of the module patches the pipeline."""
    return generate(pipe)
