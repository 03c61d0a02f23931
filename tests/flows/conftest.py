"""Fixtures for the flow tests: offline Prefect, one test server per session, fresh settings."""
from tests.flows.harness import configure_offline_prefect

configure_offline_prefect()

from tests.flows.fixtures import fresh_engines, no_prefect_server, prefect_server, wan_env  # noqa: E402, F401
