"""`RunDescription`: one run as the GPU-phase tasks see it, built once by the flow and handed to each.

The flow validates the request, draws the seed and takes the GPUs; what follows (warm-up, denoise,
encode, publish) is told all of it at once through this frozen description instead of a dozen loose
arguments, so every task reads the same decisions and a new one (a LoRA, a GPU split) is one field.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tasks.allocate import Allocation
from tasks.settings import Tier
from wan_engine.lora import LoraChoice
from wan_engine.sizes import Size


@dataclass(frozen=True)
class RunDescription:
    """What one run generates, how, and where."""

    request: dict[str, Any]  # the validated request as JSON, as metadata.json records it
    task: str                # the model preset (t2v-A14B, tiny, ...)
    checkpoint: str          # a preset name or an official release folder
    prompt: str
    negative_prompt: str     # empty: the official default
    image: str | None        # the first frame of an I2V run
    size: Size
    frame_count: int
    fps: int
    steps: int
    shift: float
    guide_scale: float | None  # None: the per-expert default
    solver: str
    seed: int
    tier: Tier
    teacache_threshold: float
    step_cache: str          # the speed tier's step skipping: teacache or magcache
    allocation: Allocation   # the GPUs held for the run (none for a CPU run)
    loras: tuple[LoraChoice, ...] = ()   # applied to the pipeline for this run, switched between runs
    distilled: bool = False  # the Lightning settings (steps, shift, guide scale, solver are set): no step cache

    @property
    def device(self) -> str:
        """Where the engine runs: the first allocated GPU, or the CPU."""
        return self.allocation.device

    @property
    def sampling(self) -> dict[str, Any]:
        """The engine's sampling arguments of this run, as `plan`, `generate` and `run_rank` take them."""
        return dict(image=self.image, size=tuple(self.size), frame_num=self.frame_count, steps=self.steps,
                    shift=self.shift, guide_scale=self.guide_scale, solver=self.solver, seed=self.seed)

    @property
    def gpus(self) -> int:
        """GPUs the run computes on (a CPU run counts as one device)."""
        return max(len(self.allocation.gpus), 1)
