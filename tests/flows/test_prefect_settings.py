"""Prefect's embedded server as wanflow's users start it: telemetry off, a startup timeout a small machine meets,
with no environment written at import and the user's own values winning."""
from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from flows.prefect_settings import EMBEDDED_SERVER_DEFAULTS

ROOT = Path(__file__).parents[2]


def _clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This environment without any Prefect setting: a fresh PREFECT_HOME, no server configured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "WAN_")) and k != "DO_NOT_TRACK"}
    return {**env, "PREFECT_HOME": str(tmp_path / "prefect-home"), "WAN_OUTPUTS_DIR": str(tmp_path / "outputs"),
            "PYTHONPATH": str(ROOT), **extra}


def test_prefect_toml_holds_the_same_defaults_as_the_cli():
    toml = tomllib.loads((ROOT / "prefect.toml").read_text())
    for _, section, field, value in EMBEDDED_SERVER_DEFAULTS:
        table = toml
        for part in section.split("."):
            table = table[part]
        assert table[field] == value


CHECK = """
import os
def prefect_env():
    return {k: v for k, v in os.environ.items() if k.startswith("PREFECT_")}
before = prefect_env()
import flows.cli
from prefect.settings import get_current_settings
from flows.prefect_settings import offline_defaults
assert prefect_env() == before, "importing the CLI wrote Prefect settings into the environment"
with offline_defaults():
    server = get_current_settings().server
    print(server.analytics_enabled, server.ephemeral.startup_timeout_seconds)
"""


def test_the_cli_applies_them_anywhere_without_writing_the_environment_and_the_user_wins(tmp_path):
    def run(**extra: str) -> str:
        done = subprocess.run([sys.executable, "-c", CHECK], cwd=tmp_path, env=_clean_env(tmp_path, **extra),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert run() == "False 90"  # started outside the checkout: no prefect.toml to read
    assert run(PREFECT_SERVER_ANALYTICS_ENABLED="true") == "True 90"


@pytest.mark.slow
def test_the_python_api_in_the_checkout_prints_no_telemetry_traceback(tmp_path):
    """README's Python example on Prefect's embedded server, fresh database: its telemetry job used to race the
    first run for SQLite and print a 'database is locked' traceback."""
    script = ("from flows.generate import generate_video\nfrom flows.request import GenerationRequest\n"
              "generate_video(GenerationRequest(task='tiny', prompt='a red car', frame_count=5, steps=2))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_clean_env(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "database is locked" not in done.stderr, done.stderr[-3000:]
    assert list((tmp_path / "outputs").glob("*/*/video.mp4"))
