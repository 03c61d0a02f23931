"""The host's GPU queue: arrival order, reservations for the oldest run, tickets of dead runs."""
from __future__ import annotations

import json

from tasks.gpu_queue import GpuQueue, Ticket, ordinal, turn

GPUS = ["gpu-0", "gpu-1", "gpu-2", "gpu-3"]


def _ticket(n: int, strategy: str, candidates=GPUS, gpus_per_job=None) -> Ticket:
    return Ticket(arrival_ns=n, id=f"t{n}", strategy=strategy, candidates=list(candidates),
                  gpus_per_job=gpus_per_job, flow_run_id=None, pid=0, host="h")


def test_an_older_run_that_cannot_be_served_reserves_the_free_gpus_it_waits_for():
    big, small = _ticket(1, "max_speed"), _ticket(2, "concurrent")
    assert turn([big, small], small, {"gpu-0", "gpu-1"}).pick == []
    assert turn([big, small], big, set(GPUS)).pick == GPUS
    assert turn([big, small], small, set(GPUS)).pick == []  # the 4-GPU run takes them all first


def test_an_older_run_that_can_be_served_takes_its_pick_first():
    first, second = _ticket(1, "concurrent"), _ticket(2, "concurrent")
    assert turn([second, first], second, {"gpu-1", "gpu-3"}).pick == ["gpu-3"]
    assert turn([second, first], second, {"gpu-1"}).pick == []
    other_gpus = _ticket(0, "max_speed", candidates=["gpu-4", "gpu-5"])  # wants none of these GPUs
    assert turn([other_gpus, second], second, {"gpu-1"}) == turn([second], second, {"gpu-1"})


def test_place_in_line_counts_the_runs_that_want_the_same_gpus():
    tickets = [_ticket(1, "max_speed"), _ticket(2, "concurrent"), _ticket(3, "concurrent"),
               _ticket(4, "auto", candidates=["gpu-7"])]
    now = turn(tickets, tickets[2], set())
    assert (now.place, now.waiting) == (3, 3)
    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 101)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "101st"]


def test_tickets_of_runs_that_died_are_dropped(tmp_path):
    queue = GpuQueue(tmp_path)
    dead = _ticket(1, "max_speed")
    (tmp_path / dead.file_name).write_text(json.dumps(dead.__dict__))  # nobody holds its lock
    with queue.waiting("concurrent", GPUS) as mine:
        assert queue.tickets() == [mine]
    assert queue.tickets() == [] and not list(tmp_path.glob("*.json"))
