"""Offline Prefect for the flow and task tests: a throwaway PREFECT_HOME and a test server.

`configure_offline_prefect()` must run before `prefect` is first imported (Prefect reads
its settings at import): both conftests of tests/flows and tests/tasks call it first.
"""
from __future__ import annotations

import os
import sys
import tempfile

OFFLINE_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_CLI_PROMPT": "false",
    "COLUMNS": "200",
}


def configure_offline_prefect() -> None:
    if "prefect" in sys.modules:
        if not os.environ.get("PREFECT_HOME"):
            raise RuntimeError("prefect was imported before PREFECT_HOME was set: it would write to ~/.prefect")
        return
    os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="wanflow-prefect-home-"))
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
