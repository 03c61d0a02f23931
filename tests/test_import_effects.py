"""Importing the project changes no environment variable: settings are read, never written, at import.

An environment write at import would change every later import in the process (a worker's flow
runs, the tests) depending on what happened to be imported first. The check imports every module
of every package in a fresh interpreter and compares the environment before and after. The
libraries are imported before the first look: importing torch._dynamo writes torch's own default
TORCHINDUCTOR_CACHE_DIR, which is torch's doing, not the project's.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("wan_engine", "patches", "tasks", "deployments", "flows")

PROBE = """
import importlib, json, os, pkgutil, sys
import torch, torch._dynamo, prefect, pydantic_settings  # the libraries' own writes happen before the first look
before = dict(os.environ)
for package in sys.argv[1:]:
    for module in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."):
        importlib.import_module(module.name)
after = dict(os.environ)
changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
print(json.dumps({k: [before.get(k), after.get(k)] for k in changed}))
"""


def environment_changes_on_import(*packages: str) -> dict[str, list[str | None]]:
    """Variable -> [before, after] for every variable that importing `packages` (all their modules) changed."""
    done = subprocess.run([sys.executable, "-c", PROBE, *packages], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def test_importing_the_project_writes_no_environment_variable():
    assert environment_changes_on_import(*PACKAGES) == {}


def test_the_check_sees_a_write_at_import(tmp_path, monkeypatch):
    package = tmp_path / "writes_at_import"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "config.py").write_text("import os\nos.environ['WANFLOW_PROBE'] = '1'\n")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{ROOT}")
    assert environment_changes_on_import("writes_at_import") == {"WANFLOW_PROBE": [None, "1"]}
