"""The run's page in a real browser shows the video's preview on its Artifacts tab, in the default UI and in /v2
(scripts/check_run_preview.py; needs headless Chromium, skipped without it)."""
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
def test_the_run_page_shows_the_videos_preview(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)  # the script starts a server of its own
    done = subprocess.run([sys.executable, "scripts/check_run_preview.py", "--output-dir", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["problems"] == [] and set(report["pages"]) == {"v1", "v2"}
    for page in report["pages"].values():
        [preview] = page["previews"]
        assert preview["naturalWidth"] == 128 and preview["in_artifact_card"]
