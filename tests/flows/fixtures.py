"""Fixtures shared by tests/flows and tests/tasks."""
from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import pytest
from prefect.logging import disable_run_logger
from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE, temporary_settings
from prefect.testing.utilities import prefect_test_harness

from tasks.pipelines import process_engines
from tasks.settings import get_settings

_HARNESS: list[ExitStack] = []  # both conftests register this fixture: they must share one server


@pytest.fixture(scope="session")
def prefect_server(pytestconfig):
    """A temporary Prefect server and database for the whole session (~10 s to start)."""
    if not _HARNESS:
        stack = ExitStack()
        stack.enter_context(prefect_test_harness(server_startup_timeout=90))
        _HARNESS.append(stack)
        pytestconfig.add_cleanup(stack.close)
    return _HARNESS[0]


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


@pytest.fixture
def fresh_engines():
    """This process's engine cache without CPU pipelines before the test and after it: a test that loads a
    stand-in pipeline leaves it to no other test."""
    engines = process_engines()
    engines.evict("cpu")
    yield engines
    engines.evict("cpu")


@pytest.fixture
def no_prefect_server():
    """For calling a task body (`.fn`) as a plain function: no run logger, and a Prefect API that refuses every
    connection (no embedded server either), so a body that needs a server fails instead of finding one."""
    unreachable = {PREFECT_API_URL: "http://127.0.0.1:9/api", PREFECT_SERVER_ALLOW_EPHEMERAL_MODE: False}
    with temporary_settings(updates=unreachable), disable_run_logger():
        yield
