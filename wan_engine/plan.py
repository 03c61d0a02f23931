"""A run planned before it starts: the `RunPlan` and the functions that derive its parts.

Everything a generation decides before its first step lives in one frozen `RunPlan`: the video size
and frame count, the latent grid and its token count, the solver's timesteps and sigmas, the expert
and guide scale of every step, how classifier-free guidance runs, the conditioning, the seed and the
noise. `WanPipeline.plan(...)` builds it; the loop, the step caches, the compile warm-up and the bench
read it instead of working any of it out again. The latent grid and the token count are computed in
`latent_grid` only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .configs import ModelSpec
from .samplers import make_schedule

HIGH_NOISE, LOW_NOISE = "high_noise", "low_noise"
SINGLE_EXPERT = "model"   # the engine's name for the DiT of a single-expert model (TI2V-5B)

# "batched": cond and uncond as one batch-2 forward; "sequential": two forwards; "none": guide scale 1,
# one forward of the prompt per step and no negative prompt.
CFG_MODES = ("batched", "sequential", "none")


@dataclass(frozen=True)
class LatentGrid:
    """The latent video of a run: (frames, height, width) latents and the DiT tokens they make."""

    frames: int
    height: int
    width: int
    tokens: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.frames, self.height, self.width


def latent_grid(spec: ModelSpec, size: tuple[int, int], frame_num: int,
                image_hw: tuple[int, int] | None = None) -> LatentGrid:
    """The latent grid of a video of `size` (W, H) and `frame_num` frames. With `image_hw` (I2V) `size`
    gives the area only and the image its aspect ratio (the official rule)."""
    (st, sh, sw), (pt, ph, pw) = spec.vae_stride, spec.patch_size
    w, h = size
    if image_hw is None:
        lat_h, lat_w = h // sh, w // sw
    else:
        aspect = image_hw[0] / image_hw[1]
        lat_h = int(round(np.sqrt(w * h * aspect) // sh // ph * ph))
        lat_w = int(round(np.sqrt(w * h / aspect) // sw // pw * pw))
    lat_f = (frame_num - 1) // st + 1
    return LatentGrid(lat_f, lat_h, lat_w, lat_f // pt * (lat_h // ph) * (lat_w // pw))


@dataclass(frozen=True)
class StepPlan:
    """The steps of a run as the loop takes them: per step the timestep, the expert and its guide scale."""

    model: str
    task: str
    moe: bool
    solver: str
    shift: float
    timesteps: tuple[int, ...]         # floats for the lightning solver
    sigmas: tuple[float, ...]          # steps + 1, the last 0
    experts: tuple[str, ...]
    guide_scale: tuple[float, float]   # (low-noise expert, high-noise expert), as given
    guide_scales: tuple[float, ...]    # per step

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def split(self) -> int:
        """Index of the first low-noise step (`steps` when there is none)."""
        return next((i for i, e in enumerate(self.experts) if e == LOW_NOISE), self.steps)

    @property
    def phase_starts(self) -> frozenset[int]:
        """Steps where an expert takes over (step 0 included)."""
        return frozenset(i for i in range(self.steps) if i == 0 or self.experts[i] != self.experts[i - 1])


def plan_steps(spec: ModelSpec, steps: int | None = None, shift: float | None = None, solver: str = "unipc",
               guide_scale: float | tuple[float, float] | None = None) -> StepPlan:
    """The steps of a run with these settings (None: the model's defaults)."""
    steps = steps or spec.steps
    shift = spec.shift if shift is None else float(shift)
    if guide_scale is None:
        guide_scale = spec.guide_scale
    elif isinstance(guide_scale, int | float):
        guide_scale = (float(guide_scale), float(guide_scale))
    low, high = (float(g) for g in guide_scale)
    schedule = make_schedule(solver, steps, shift)
    timesteps = tuple(schedule.timesteps.tolist())
    if spec.is_moe:
        experts = tuple(HIGH_NOISE if t >= spec.boundary * 1000 else LOW_NOISE for t in timesteps)
    else:
        experts = (SINGLE_EXPERT,) * steps
    scales = tuple(high if e == HIGH_NOISE else low for e in experts)
    return StepPlan(spec.name, spec.task, spec.is_moe, solver, shift, timesteps, tuple(schedule.sigmas.tolist()),
                    experts, (low, high), scales)


@dataclass(frozen=True)
class Conditioning:
    """What the video is conditioned on besides the prompt. T2V: nothing. I2V: the first frame, resized to
    the video's pixel grid (float32 [1, 3, H, W] in [-1, 1], on the CPU as the official code resizes it),
    which the VAE encodes into the DiT's extra input channels. TI2V: nothing (text only), or the image fitted
    to the requested area (`wan_engine.ti2v.fit_image`, same form), whose latent becomes the first latent frame."""

    task: str
    image: torch.Tensor | None = None


@dataclass(frozen=True)
class RunPlan:
    """One generation, decided before its first step (see the module docstring)."""

    spec: ModelSpec
    size: tuple[int, int]          # (W, H) as asked for; I2V takes its area, the grid the image's aspect
    frame_num: int
    grid: LatentGrid
    steps: StepPlan
    cfg: str                       # one of CFG_MODES
    conditioning: Conditioning
    seed: int
    noise: torch.Tensor            # float32 [z_dim, f, h, w] on the run's device

    @property
    def branches(self) -> tuple[str, ...]:
        """The model calls of a step: ("cond",) without guidance, else ("cond", "uncond")."""
        return ("cond",) if self.cfg == "none" else ("cond", "uncond")

    @property
    def pixel_size(self) -> tuple[int, int]:
        """(W, H) of the generated video, from the latent grid."""
        return self.grid.width * self.spec.vae_stride[2], self.grid.height * self.spec.vae_stride[1]
