"""The Prefect worker that `wanflow worker` runs as its child (deployments/supervisor.py).

It is Prefect's process worker, which can be told to stop taking runs while the runs it
started go on (and can still be cancelled through Prefect):

    python -m deployments.prefect_worker --pool wanflow-gpu --name wanflow-<host> [--limit N]

SIGTERM: take no new runs. SIGINT: stop, Prefect's own shutdown, which kills the runs still
in flight without their clean-up; so the supervisor sends it only once they are gone.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from prefect.workers.process import ProcessWorker

log = logging.getLogger("deployments.prefect_worker")  # not __main__: run with -m


class DrainableProcessWorker(ProcessWorker):
    """A process worker that takes no new runs once `draining` is set."""

    draining = False

    @classmethod
    def __dispatch_key__(cls) -> str:
        return "wanflow-process"  # Prefect's registry of worker types keeps "process" for ProcessWorker

    async def get_and_submit_flow_runs(self):
        if self.draining:
            return []
        return await super().get_and_submit_flow_runs()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--limit", type=int)
    args = parser.parse_args(argv)
    log.setLevel(logging.INFO)  # Prefect's console handler on the root logger prints it
    worker = DrainableProcessWorker(work_pool_name=args.pool, name=args.name, limit=args.limit)

    def drain(signum: int, frame: object) -> None:
        worker.draining = True
        log.info("worker %r takes no new runs", args.name)

    signal.signal(signal.SIGTERM, drain)
    try:
        asyncio.run(worker.start(printer=log.info))
    except KeyboardInterrupt:  # SIGINT: the supervisor stops us
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
