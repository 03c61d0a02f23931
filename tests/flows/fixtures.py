"""Fixtures shared by tests/flows and tests/tasks."""
from __future__ import annotations

from pathlib import Path

import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.settings import get_settings


@pytest.fixture(scope="session")
def prefect_server():
    """A temporary Prefect server and database for the whole session (~10 s to start)."""
    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture
def wan_env(monkeypatch, tmp_path) -> Path:
    """Fresh wanflow settings: outputs in a temporary folder, quick GPU polling; returns the outputs folder."""
    outputs = tmp_path / "outputs"
    monkeypatch.setenv("WAN_OUTPUTS_DIR", str(outputs))
    monkeypatch.setenv("WAN_GPU_POLL_SECONDS", "0.3")
    monkeypatch.delenv("WAN_GPU_INVENTORY", raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env
    get_settings.cache_clear()
    yield outputs
    get_settings.cache_clear()
