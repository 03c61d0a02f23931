"""The `warm-up-compile` task: compile the engine for the run's shapes before timing starts.

Present in every run so the flow's shape is final; it compiles nothing until the
performance tiers (patches) exist, and says so.
"""
from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE


@task(name="warm-up-compile", retries=0, cache_policy=NO_CACHE)
def warm_up_compile(tier: str, device: str, cache_dir: str) -> float:
    """Returns the seconds spent compiling (0: nothing to compile yet).

    `cache_dir` is where compiled artefacts will persist, so a shape compiled once costs nothing later.
    """
    get_run_logger().info(
        "warm-up skipped: tier %r applies no compiled patches yet (performance tiers are not implemented), "
        "so there is nothing to compile on %s (compile cache: %s)", tier, device, cache_dir,
    )
    return 0.0
