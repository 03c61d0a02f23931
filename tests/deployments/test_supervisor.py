"""How `wanflow worker`'s supervisor finds the runs in flight on this host and tells a live process from a dead one."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

from deployments.supervisor import alive, flow_run_processes

SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]


def test_the_flow_run_processes_a_worker_started_are_found_with_their_run_ids():
    run_id = uuid.uuid4()
    run = subprocess.Popen(SLEEP, env={**os.environ, "PREFECT__FLOW_RUN_ID": str(run_id)})
    helper = subprocess.Popen(SLEEP)  # a child that is no flow run
    try:
        assert flow_run_processes(os.getpid()) == {run_id: run.pid}
        assert alive(run.pid)
        run.kill()
        deadline = time.monotonic() + 10
        while alive(run.pid):  # dead, and not yet collected by its parent: a zombie counts as dead
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert flow_run_processes(os.getpid()) == {}
    finally:
        for process in (run, helper):
            process.kill()
            process.wait()
    assert not alive(run.pid)


PARENT = """
import subprocess, sys, time
from tasks.processes import die_with_parent
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True,
                         preexec_fn=die_with_parent)
print(child.pid, flush=True)
time.sleep(60)
"""


def test_a_child_of_the_supervisor_dies_with_it():
    """A supervisor killed outright must not leave its Prefect worker polling for runs (the kernel kills it)."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert alive(child)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while alive(child):
        assert time.monotonic() < deadline, "the child outlived its supervisor"
        time.sleep(0.05)
