"""The logger for task-side code that runs inside a Prefect run or outside one (tests, the CLI)."""
from __future__ import annotations

import logging

from prefect import get_run_logger
from prefect.exceptions import MissingContextError


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The current run's logger (its lines reach the Prefect UI), else the `wanflow` logger."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("wanflow")
