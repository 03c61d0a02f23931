"""Which GPUs a run takes: the strategies' choice, and the host's queue that serves waiting runs in arrival order.

Runs of one host wait only for that host's GPUs (the tags are host-qualified), so the queue is a
folder of ticket files beside the lock files. A waiting run keeps a shared `flock` on its own
ticket from before the ticket appears (it is written whole under a temporary name, then renamed)
until it leaves the queue, so a ticket that can be locked exclusively belongs to a process that
died, and is dropped. Every file operation is atomic on its own, so the folder needs no lock of
its own; a run that joins while another reads the queue is seen at the next poll.

`turn` walks the live tickets oldest first with the set of free GPUs: an older run that can be
served now is assumed to take its pick; one that cannot reserves the free GPUs among its
candidates, so a run waiting for 4 GPUs collects them as they free and is not starved by a
stream of later 1-GPU runs.
"""
from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Collection, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TypeVar

from tasks.lockfiles import dead_record, remove_locked, write_locked
from tasks.settings import Strategy

G = TypeVar("G", bound=Hashable)  # a GPU: its index or its tag


def choose_gpus(strategy: Strategy, candidates: list[G], free: list[G], gpus_per_job: int | None = None,
                world_sizes: list[int] | None = None) -> list[G]:
    """The GPUs to take now from `free` (a subset of `candidates`), or [] to keep waiting. `world_sizes`: the GPU
    counts one job can compute on (the engine's parallel plan; None: any), of which `auto` takes the largest
    that is free (a run never holds a GPU it does not compute on)."""
    if strategy == "max_speed":
        return list(candidates) if set(candidates) <= set(free) else []
    if strategy == "concurrent":
        wanted = gpus_per_job or 1
        return free[:wanted] if len(free) >= wanted else []
    usable = [w for w in (world_sizes or range(1, len(free) + 1)) if w <= len(free)]
    return free[:max(usable)] if usable else []


@dataclass(frozen=True)
class Ticket:
    """A run waiting for GPUs of this host, as its ticket file records it."""

    arrival_ns: int
    id: str
    strategy: Strategy
    candidates: list[str]  # the GPU tags it may take, in preference order
    gpus_per_job: int | None
    flow_run_id: str | None
    pid: int
    host: str
    world_sizes: list[int] | None = None  # the GPU counts its job can compute on (auto takes the largest free)

    @property
    def file_name(self) -> str:
        return f"{self.arrival_ns:020d}-{self.id}.json"  # names sort in arrival order

    def pick(self, free: Collection[str]) -> list[str]:
        """What this run would take from the `free` tags."""
        return choose_gpus(self.strategy, self.candidates, [t for t in self.candidates if t in free],
                           self.gpus_per_job, self.world_sizes)


_TICKET_FIELDS = {f.name for f in fields(Ticket)}


@dataclass(frozen=True)
class Turn:
    """What a waiting run may take now, and its place among the runs that want some of its GPUs."""

    pick: list[str]
    place: int  # 1 for the oldest
    waiting: int


def turn(tickets: list[Ticket], mine: Ticket, free: Collection[str]) -> Turn:
    """`mine`'s pick from the `free` tags once the older `tickets` have had theirs."""
    available = set(free)
    rivals = [t for t in tickets if t.id == mine.id or set(t.candidates) & set(mine.candidates)]
    for ticket in sorted(tickets, key=lambda t: (t.arrival_ns, t.id)):
        if ticket.id == mine.id:
            break
        pick = ticket.pick(available)
        available -= set(pick) if pick else set(ticket.candidates)  # served, or reserving what it waits for
    place = 1 + sum((t.arrival_ns, t.id) < (mine.arrival_ns, mine.id) for t in rivals)
    return Turn(pick=mine.pick(available), place=place, waiting=len(rivals))


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, ..., 11th, 12th, 13th, 21st."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


class GpuQueue:
    """The ticket folder of this host's waiting runs."""

    def __init__(self, directory: Path):
        self.directory = directory

    @contextmanager
    def waiting(self, strategy: Strategy, candidates: list[str], gpus_per_job: int | None = None,
                world_sizes: list[int] | None = None, flow_run_id: str | None = None) -> Iterator[Ticket]:
        """Stand in the queue for the duration of the block."""
        ticket = Ticket(arrival_ns=time.time_ns(), id=uuid.uuid4().hex, strategy=strategy, candidates=candidates,
                        gpus_per_job=gpus_per_job, world_sizes=world_sizes, flow_run_id=flow_run_id,
                        pid=os.getpid(), host=socket.gethostname())
        path = self.directory / ticket.file_name
        fd = write_locked(path, asdict(ticket))
        try:
            yield ticket
        finally:
            remove_locked(path, fd)

    def tickets(self) -> list[Ticket]:
        """The live tickets, oldest first; tickets of processes that died are removed."""
        live = []
        for path in sorted(self.directory.glob("*.json")):
            with dead_record(path) as dead:
                if dead is not None:
                    path.unlink()
                    continue
            try:
                record = json.loads(path.read_text())
                # only the fields this version knows: a ticket written by an older wanflow still takes its turn
                live.append(Ticket(**{k: v for k, v in record.items() if k in _TICKET_FIELDS}))
            except FileNotFoundError:
                continue  # its run left the queue meanwhile
        return live
