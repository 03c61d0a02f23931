"""A flow run's process imports the flow without torch's compiler: with a resident engine on its GPU it computes
nothing itself, and every run started from the UI pays its imports before the flow begins (issue 12's device run:
15 s from the worker taking a run to "Beginning flow run"). The Triton kernels, whose registration imports
torch._inductor, load on the first CUDA forward or with the compile patch (wan_engine/dit.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_importing_the_flows_leaves_torch_s_compiler_unimported():
    probe = ("import json, sys, flows.generate, flows.batch, flows.cli; "
             "print(json.dumps([m for m in ('torch._inductor', 'torch._dynamo', 'triton') if m in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=True)
    assert json.loads(done.stdout.splitlines()[-1]) == []
