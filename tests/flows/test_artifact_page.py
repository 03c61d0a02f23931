"""The run's artifact page in a real browser: a prompt and an outputs folder holding HTML and markdown
show as text (scripts/check_artifact_escaping.py; needs headless Chromium, skipped without it)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="headless Chromium is not installed (Debian: apt-get install -y chromium)")
def test_a_hostile_prompt_shows_as_text_on_the_artifact_page(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)  # the script starts a server of its own
    done = subprocess.run([sys.executable, "scripts/check_artifact_escaping.py", "--output-dir", str(tmp_path),
                           "--no-screenshot"], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["problems"] == []
    assert report["headings"] == [f"tiny: {report['prompt'][:80]}"] and report["code"][0] == report["video"]
    assert "<img" in report["prompt"] and "img" not in report["elements"]
