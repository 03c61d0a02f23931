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


def test_an_engine_worker_that_keeps_dying_at_start_is_restarted_with_a_growing_pause():
    """A single crash restarts the engine at once; one that ends again and again soon after its start (a broken
    driver, a bad setting) waits 2 s, then 4 s, ... rather than spinning a new process every second."""
    from deployments.supervisor import Supervisor, restart_delay

    assert [restart_delay(n) for n in (1, 2, 3, 4, 8, 20)] == [0.0, 2.0, 4.0, 8.0, 60.0, 60.0]
    failing = [sys.executable, "-c", "raise SystemExit(3)"]
    supervisor = Supervisor("test", SLEEP, dict(os.environ), {"gpu-0": failing})
    starts = []
    start = supervisor._start_engine
    supervisor._start_engine = lambda tag: (starts.append(time.monotonic()), start(tag))
    supervisor._start_engine("gpu-0")
    deadline = time.monotonic() + 4.5
    while time.monotonic() < deadline:
        supervisor.restart_dead_engines()
        time.sleep(0.05)
    supervisor.children["engine-gpu-0"].wait()
    # started, ended: again at once; ended: again 2 s later; ended: the next waits 4 s, past the deadline
    assert len(starts) == 3, [round(t - starts[0], 2) for t in starts]
    assert starts[2] - starts[1] >= 2.0
