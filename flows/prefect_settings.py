"""The Prefect settings wanflow's runs need on a small or offline machine, unless the user set them.

A run with no PREFECT_API_URL starts Prefect's embedded server, which inherits the settings in
force when it starts. Two defaults do not suit wanflow's users:

- its telemetry job (server.analytics_enabled) writes a session row into the fresh SQLite
  database while the first run does, and prints a 'database is locked' traceback (offline it
  also fails to send);
- its startup timeout (20 s) is short for a 2-core machine, where it takes 12-40 s.

`prefect.toml` at the project root sets both for every Prefect process started in the checkout
(the Python API, `prefect` commands, the worker's flow runs); `offline_defaults()` applies them
around the CLI's runs wherever it is started, without writing the environment. Values the user
set (environment, .env, prefect.toml, profile) win in both.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prefect.settings import (
    PREFECT_SERVER_ANALYTICS_ENABLED,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    get_current_settings,
    temporary_settings,
)

# (setting, the settings section that holds it, its field there, wanflow's value)
EMBEDDED_SERVER_DEFAULTS = (
    (PREFECT_SERVER_ANALYTICS_ENABLED, "server", "analytics_enabled", False),
    (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, "server.ephemeral", "startup_timeout_seconds", 90),
)


@contextmanager
def offline_defaults() -> Iterator[None]:
    """Run the body with wanflow's embedded-server defaults for every one the user left unset."""
    current = get_current_settings()
    updates = {}
    for setting, section, field, value in EMBEDDED_SERVER_DEFAULTS:
        holder = current
        for part in section.split("."):
            holder = getattr(holder, part)
        if field not in holder.model_fields_set:
            updates[setting] = value
    with temporary_settings(updates=updates):
        yield
