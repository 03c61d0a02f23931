"""`tiny_run`: a RunDescription of the tiny preset on the CPU, for calling task bodies directly."""
from __future__ import annotations

import dataclasses

from tasks.allocate import Allocation
from tasks.runs import RunDescription
from wan_engine.sizes import Size

TINY_RUN = RunDescription(
    request={"task": "tiny", "prompt": "a heron in the reeds", "steps": 4, "solver": "unipc", "tier": "quality"},
    task="tiny", checkpoint="tiny", prompt="a heron in the reeds", negative_prompt="", image=None,
    size=Size(64, 64), frame_count=5, fps=16, steps=4, shift=12.0, guide_scale=None, solver="unipc", seed=0,
    tier="quality", teacache_threshold=0.25, step_cache="teacache", allocation=Allocation(),
)


def tiny_run(**fields) -> RunDescription:
    """TINY_RUN with `fields` changed (the request record follows the fields it shares)."""
    request = {**TINY_RUN.request, **{k: v for k, v in fields.items() if k in TINY_RUN.request}}
    return dataclasses.replace(TINY_RUN, request=request, **fields)
