"""The Wan2.2 generation pipeline: one denoising loop for every task.

A run is planned first (`plan(...)` -> `RunPlan`: grid, steps, experts, guide scales, CFG mode,
conditioning, seed and noise), then its inputs are encoded (`encode_prompt`, `encode_conditioning`),
then `sample` runs the loop: per step the plan's expert predicts the cond and uncond branches (one
batch-2 forward, two forwards, or the prompt alone at guide scale 1), they are combined with the
step's guide scale and the solver steps; `decode` turns the latents into frames. `generate(...)` is
the short form of all four. T2V, I2V and TI2V differ only by their `Conditioning` (TI2V with an image: its
latent is the first latent frame, kept through the loop at t = 0, see `wan_engine.ti2v`).

`Denoiser` holds the experts and the loop; `WanPipeline` adds the text encoder and the VAE. A
`Denoiser` alone (random weights, `wanflow bench`) plans and samples from given text contexts.

Seams for performance patches (they act only through these):
- `hooks`: `RunHook`s told `begin_run(plan)`, wrapping the block stack of every DiT call (told its
  step, timestep, expert and branches: step caching lives here), then told `end_run()`;
- `repeated_blocks()`: the modules worth compiling;
- `sample(callback=...)`: per-step `StepInfo` with timings (progress);
- `sample(should_cancel=...)`: checked between steps (cancellation).

`sample(ranks=...)` runs one rank's share of a parallel job (`wan_engine.parallel`): the same loop, with the
DiT's tokens split over the rank's Ulysses group and, with CFG parallelism, one branch per rank and the two
predictions exchanged each step.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .configs import DEFAULT_NEGATIVE_PROMPT, ModelSpec
from .hooks import BlockCall, HookRegistry
from .plan import CFG_MODES, HIGH_NOISE, LOW_NOISE, Conditioning, RunPlan, latent_grid, plan_steps
from .samplers import Schedule, solver_for
from .t5 import UMT5Encoder, encode_prompts
from .text import PromptTokenizer, TokenCount
from .ti2v import SIZE_MULTIPLE, fit_image, frame_timesteps, keep_first_frame
from .vae import WanVAE21
from .vae22 import WanVAE22

if TYPE_CHECKING:   # parallel.py builds on this module; the loop only uses the groups it is handed
    from .parallel import RankGroups

log = logging.getLogger(__name__)

__all__ = ["HIGH_NOISE", "LOW_NOISE", "BlockCall", "Denoiser", "WanPipeline"]


class GenerationCancelled(RuntimeError):
    """Raised between steps when the caller's `should_cancel()` says so."""


@dataclass(frozen=True)
class StepInfo:
    step: int          # 0-based
    total: int
    timestep: int
    expert: str
    seconds: float


@dataclass(frozen=True)
class PromptContext:
    """The encoded prompts of a run: the rows the loop feeds the DiT, and their token counts."""

    context: torch.Tensor                # [1 or 2, L, 4096] in the DiT dtype: rows cond (, uncond)
    tokens: dict[str, TokenCount]        # "prompt" (and "negative_prompt"): tokens, and whether cut


@dataclass
class Sampled:
    """What the loop made: the clean latents and the time each step took."""

    latents: torch.Tensor                # float32 [1, 16, f, h, w] on the device
    seconds: float
    step_seconds: list[float]
    experts_per_step: list[str]


@dataclass
class GenerationResult:
    latents: torch.Tensor                # float32 CPU [16, f, h, w]
    frames: np.ndarray | None            # uint8 [F, H, W, 3]; None when decode=False
    seed: int
    settings: dict                       # the resolved sampling settings (steps, shift, ...)
    timings: dict[str, float] = field(default_factory=dict)   # phase -> seconds
    step_seconds: list[float] = field(default_factory=list)
    experts_per_step: list[str] = field(default_factory=list)
    # "prompt" and "negative_prompt": their tokens, and whether the text encoder's limit cut them
    prompt_tokens: dict[str, TokenCount] = field(default_factory=dict)
    # a parallel job's plan (world, ulysses, cfg) and every rank's denoise seconds; empty for one process
    parallel: dict = field(default_factory=dict)


def video_to_frames(video: torch.Tensor) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3]."""
    frames = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().numpy()


def _image_path(image: str | Path) -> Path:
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"input image {path} does not exist")
    return path


def load_image(image: Image.Image | str | Path) -> torch.Tensor:
    """An RGB image as float32 [3, H, W] in [-1, 1] (the official to_tensor * 2 - 1)."""
    if not isinstance(image, Image.Image):
        image = Image.open(_image_path(image))
    arr = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float().div(255).mul(2).sub(1)   # [3, H, W]


def i2v_mask(frame_num: int, lat_h: int, lat_w: int, device: torch.device) -> torch.Tensor:
    """[1, 4, f, h, w]: 1 where the first video frame is given. The first frame stands for
    four (the VAE's temporal stride), so frame 0 of the latent is all ones."""
    f = (frame_num - 1) // 4 + 1
    msk = torch.zeros(1, 4, f, lat_h, lat_w, device=device)
    msk[:, :, 0] = 1
    return msk


@dataclass(frozen=True)
class MemoryPlan:
    """Where the weights live between uses (decided from free memory, never from GPU names)."""

    experts_resident: bool   # both DiT experts stay on the device
    text_encoder_resident: bool
    # umT5 encodes on the CPU (the official --t5_cpu): not even a visit to the device fits beside the
    # weights held there, as on a 24 GB card with TI2V-5B
    text_encoder_on_cpu: bool = False


def activation_bytes(config, tokens: int) -> int:
    """Rough working memory of one batch-1 DiT forward over `tokens` video tokens: the float32
    residual stream and its temporaries (16 bytes per channel) plus the FFN hidden (4 per channel)."""
    return tokens * (config.dim * 16 + config.ffn_dim * 4)


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _on_device(module: nn.Module, device: torch.device) -> bool:
    return next(module.parameters()).device.type == device.type


T5_VISIT_SLACK = 2 << 30   # umT5's own working memory for a prompt, and the allocator's


def plan_memory(free_bytes: int | None, expert_bytes: int, n_experts: int, t5_bytes: int,
                vae_bytes: int, activation_bytes: int) -> MemoryPlan:
    """Keep everything on the device when it fits; else keep the experts and let T5 wait on
    the CPU, visiting the device to encode; else hold only the active expert on the device. T5
    encodes on the CPU when its visit would not fit beside the weights the device holds then."""
    if free_bytes is None:  # CPU: nothing to move
        return MemoryPlan(True, True)
    experts = expert_bytes * n_experts + vae_bytes + activation_bytes
    if experts + t5_bytes <= free_bytes:
        return MemoryPlan(True, True)
    resident = experts <= free_bytes
    held = expert_bytes * (n_experts if resident else 1) + vae_bytes   # while T5 encodes
    return MemoryPlan(resident, False, held + t5_bytes + T5_VISIT_SLACK > free_bytes)


class Denoiser:
    """The DiT experts of one Wan2.2 task and the denoising loop: plans runs and samples them from
    encoded inputs. `WanPipeline` adds the text encoder and the VAE; a bare `Denoiser` serves a
    random-weight bench. `checkpoint_dir` is where the weights came from (None: random weights)."""

    def __init__(self, spec: ModelSpec, experts: dict[str, nn.Module], device: torch.device, dtype: torch.dtype,
                 memory: MemoryPlan, checkpoint_dir: Path | None = None):
        self.spec = spec
        self.experts = experts
        self.device = device
        self.dtype = dtype
        self.memory = memory
        self.checkpoint_dir = checkpoint_dir
        self.hooks = HookRegistry()
        # cond and uncond as one batch-2 forward: True / False, or None to decide per run from free memory
        self.cfg_batch: bool | None = None

    # ------------------------------------------------------------------ seams
    def repeated_blocks(self) -> list[nn.Module]:
        return [block for dit in self.experts.values() for block in dit.blocks]

    @contextmanager
    def running(self, plan: RunPlan) -> Iterator[None]:
        """The hooks' run: `begin_run(plan)` before, `end_run()` after, however the body ends."""
        self.hooks.begin_run(plan)
        try:
            yield
        finally:
            self.hooks.end_run()

    # ------------------------------------------------------------------ helpers
    def _activate(self, name: str) -> nn.Module:
        """The expert to run now; when experts are not resident the other one goes to the CPU."""
        if not self.memory.experts_resident:
            for other, dit in self.experts.items():
                if other != name:
                    dit.to("cpu")
            self.experts[name].to(self.device)
        return self.experts[name]

    def batch_cfg(self, tokens: int) -> bool:
        """Whether a run of `tokens` video tokens takes cond and uncond in one batch-2 forward: the
        `cfg_batch` setting, else yes on the CPU, else when free device memory holds a second
        forward's working memory beyond the one a batch-1 run needs anyway."""
        if self.cfg_batch is not None:
            return self.cfg_batch
        if self.device.type != "cuda":
            return True
        free, _ = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        if not self.memory.experts_resident:   # the expert swapped in later displaces the one held now
            held = [_param_bytes(dit) for dit in self.experts.values() if _on_device(dit, self.device)]
            free += sum(held) - max(_param_bytes(dit) for dit in self.experts.values())
        cfg = next(iter(self.experts.values())).config
        per_sample = activation_bytes(cfg, tokens)
        batched = free >= 2 * per_sample
        log.info("classifier-free guidance: %s (free %.1f GB, a batch-1 forward needs about %.1f GB)",
                 "one batch-2 forward per step" if batched else "two forwards per step", free / 1e9,
                 per_sample / 1e9)
        return batched

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ planning
    def plan(self, image: Image.Image | str | Path | None = None, size: tuple[int, int] = (832, 480),
             frame_num: int = 81, steps: int | None = None, shift: float | None = None,
             guide_scale: float | tuple[float, float] | None = None, solver: str = "unipc", seed: int = 0,
             noise: torch.Tensor | None = None, cfg: str | None = None) -> RunPlan:
        """Decide a run before its first step (None: the model's default). For I2V `size` gives the target
        area and the image the aspect ratio. `noise` ([16, f, h, w]) replaces the seeded draw; `cfg` one of
        CFG_MODES instead of the choice from the guide scale and free memory."""
        spec = self.spec
        if frame_num < 1 or (frame_num - 1) % spec.vae_stride[0]:
            raise ValueError(f"frame_num={frame_num} is not 4k+1 (allowed: 5, 9, ..., 81, ...)")
        w, h = size
        multiple = SIZE_MULTIPLE if spec.task == "ti2v" else 16
        if h % multiple or w % multiple:
            raise ValueError(f"size={w}*{h}: width and height must be multiples of {multiple}")
        if spec.task == "i2v" and image is None:
            raise ValueError(f"{spec.name} is image-to-video: pass image=")
        if spec.task == "t2v" and image is not None:
            raise ValueError(f"{spec.name} is text-to-video: it takes no image")
        if cfg is not None and cfg not in CFG_MODES:
            raise ValueError(f"cfg must be one of {CFG_MODES}, got {cfg!r}")
        step_plan = plan_steps(spec, steps, shift, solver, guide_scale)
        if spec.task == "i2v":
            img = load_image(image)                                              # [3, H, W]
            grid = latent_grid(spec, size, frame_num, tuple(img.shape[1:]))
            pixels = (grid.height * spec.vae_stride[1], grid.width * spec.vae_stride[2])
            conditioning = Conditioning("i2v", F.interpolate(img[None], size=pixels, mode="bicubic"))   # [1, 3, H, W]
        elif spec.task == "ti2v" and image is not None:   # the image sets the aspect ratio, `size` the area
            first = fit_image(image if isinstance(image, Image.Image) else Image.open(_image_path(image)), w * h)
            grid = latent_grid(spec, (first.shape[3], first.shape[2]), frame_num)
            conditioning = Conditioning("ti2v", first)   # [1, 3, H, W]
        else:
            grid = latent_grid(spec, size, frame_num)
            conditioning = Conditioning(spec.task)
        shape = (spec.z_dim, *grid.shape)
        if noise is None:
            # drawn like the official code: a generator on the run's device, seeded once
            gen = torch.Generator(device=self.device).manual_seed(seed)
            noise = torch.randn(*shape, dtype=torch.float32, device=self.device, generator=gen)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise must be {list(shape)} for this run, got {list(noise.shape)}")
        if cfg is None:
            unguided = all(g == 1.0 for g in step_plan.guide_scales)
            cfg = "none" if unguided else "batched" if self.batch_cfg(grid.tokens) else "sequential"
        return RunPlan(spec, (w, h), frame_num, grid, step_plan, cfg, conditioning, seed,
                       noise.to(self.device, torch.float32))

    # ------------------------------------------------------------------ the loop
    def predict(self, plan: RunPlan, step: int, latents: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None, ranks: RankGroups | None = None) -> torch.Tensor:
        """The guided velocity [1, 16, f, h, w] of `step` at `latents` [1, 16, f, h, w]: the step's expert on
        the plan's branches (context rows cond (, uncond); y [1, C_y, f, h, w] or None), combined with the
        step's guide scale. Inside `running(plan)` when hooks are registered. With `ranks`, this rank's share
        of the step of a parallel job (every rank of the job calls it)."""
        return self._velocity(plan, step, latents, context, *self._run_inputs(plan, y), ranks)

    def _run_inputs(self, plan: RunPlan, y: torch.Tensor | None) -> tuple:
        """What every step of a run reuses: y per row of a forward, and the timesteps on the device ([steps],
        or [steps, f] for TI2V with an image: its latent frame at t = 0, which is not a DiT input channel)."""
        timesteps = torch.tensor(plan.steps.timesteps, device=self.device)   # [steps] int64
        if plan.conditioning.task == "ti2v":
            return None, timesteps if y is None else frame_timesteps(timesteps, plan.grid.frames)
        rows_y = y.repeat(2, 1, 1, 1, 1) if y is not None and plan.cfg == "batched" else y   # [B, C_y, f, h, w]
        return rows_y, timesteps

    def _velocity(self, plan: RunPlan, step: int, latents: torch.Tensor, context: torch.Tensor,
                  rows_y: torch.Tensor | None, timesteps: torch.Tensor,
                  ranks: RankGroups | None = None) -> torch.Tensor:
        s = plan.steps
        name, t = s.experts[step], s.timesteps[step]
        dit = self._activate(name)
        ulysses = None if ranks is None else ranks.ulysses
        if ranks is not None and ranks.cfg_group is not None:
            # CFG parallel: this rank's branch only, then the pair swaps predictions
            branch = ranks.branch
            hook = self.hooks.bind(BlockCall(step, t, name, (plan.branches[branch],)))
            pred = dit(latents, timesteps[step:step + 1], context[branch:branch + 1], y=rows_y,
                       block_stack_hook=hook, ulysses=ulysses)   # [1, 16, f, h, w]
            cond, uncond = ranks.exchange_branches(pred)
        elif plan.cfg == "batched":
            # rows (cond, uncond), in the order of `context`
            hook = self.hooks.bind(BlockCall(step, t, name, ("cond", "uncond")))
            ts = timesteps[step:step + 1]   # [1] or [1, f]
            cond, uncond = dit(latents.repeat(2, 1, 1, 1, 1), ts.expand(2, *ts.shape[1:]), context,
                               y=rows_y, block_stack_hook=hook, ulysses=ulysses).chunk(2)   # 2 x [1, 16, f, h, w]
        else:
            preds = {}
            for row, branch in enumerate(plan.branches):
                hook = self.hooks.bind(BlockCall(step, t, name, (branch,)))
                preds[branch] = dit(latents, timesteps[step:step + 1], context[row:row + 1], y=rows_y,
                                    block_stack_hook=hook, ulysses=ulysses)
            if plan.cfg == "none":
                return preds["cond"]
            cond, uncond = preds["cond"], preds["uncond"]
        return uncond + s.guide_scales[step] * (cond - uncond)

    @torch.no_grad()
    def sample(self, plan: RunPlan, context: torch.Tensor, y: torch.Tensor | None = None,
               callback: Callable[[StepInfo], None] | None = None,
               should_cancel: Callable[[], bool] | None = None, ranks: RankGroups | None = None) -> Sampled:
        """Run every step of `plan` from its noise (context and y as for `predict`). With `ranks`, this rank's
        share of a parallel job: every rank of the job calls it with the same plan and inputs, asks its own
        `should_cancel` and stops when any rank's says so."""
        s = plan.steps
        if ranks is not None and ranks.cfg_group is not None and plan.cfg != "sequential":
            raise ValueError(f"CFG parallelism runs one branch per forward: the plan's cfg must be 'sequential', "
                             f"not {plan.cfg!r}")
        solver = solver_for(s.solver, Schedule(torch.tensor(s.sigmas, dtype=torch.float32),
                                               torch.tensor(s.timesteps)))   # int64, float32 for lightning
        latents = plan.noise[None]                                          # [1, z, f, h, w]
        # TI2V with an image: y is the image's latent, latent frame 0 throughout
        first = y if plan.conditioning.task == "ti2v" else None
        if first is not None:
            latents = keep_first_frame(latents, first)
        inputs = self._run_inputs(plan, y)
        step_seconds: list[float] = []
        started = time.perf_counter()
        with self.running(plan):
            for i in range(s.steps):
                cancel = should_cancel is not None and should_cancel()
                if ranks is not None:   # every rank must stop at the same step, or the others wait on it
                    cancel = ranks.any(cancel, self.device)
                if cancel:
                    raise GenerationCancelled(f"cancelled before step {i + 1}/{s.steps}")
                t_step = time.perf_counter()
                latents = solver.step(self._velocity(plan, i, latents, context, *inputs, ranks), latents)
                if first is not None:
                    latents = keep_first_frame(latents, first)
                if callback is not None:
                    self._sync()   # progress reports completed work: one sync per step, after it is queued
                    step_seconds.append(time.perf_counter() - t_step)
                    callback(StepInfo(i, s.steps, s.timesteps[i], s.experts[i], step_seconds[-1]))
        self._sync()
        seconds = time.perf_counter() - started
        return Sampled(latents, seconds, step_seconds or [seconds / s.steps] * s.steps, list(s.experts))


class WanPipeline(Denoiser):
    """Loaded models of one Wan2.2 task: the experts and their loop, the text encoder and the VAE.
    Build with `load_pipeline`."""

    def __init__(self, spec: ModelSpec, experts: dict[str, nn.Module], text_encoder: UMT5Encoder,
                 tokenizer: PromptTokenizer, vae: WanVAE21 | WanVAE22, device: torch.device, dtype: torch.dtype,
                 memory: MemoryPlan, checkpoint_dir: Path):
        super().__init__(spec, experts, device, dtype, memory, checkpoint_dir)
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.vae = vae

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """[B, L, 4096] zero-padded contexts (zeros past each prompt's length), on the device."""
        visits = not (self.memory.text_encoder_resident or self.memory.text_encoder_on_cpu)
        if visits:
            self.text_encoder.to(self.device)
        context, _ = encode_prompts(self.text_encoder, self.tokenizer, prompts)
        if visits:
            self.text_encoder.to("cpu")
        return context.to(self.device)

    @torch.no_grad()
    def encode_prompt(self, plan: RunPlan, prompt: str, negative_prompt: str = "") -> PromptContext:
        """The context rows of `plan`'s branches: the prompt, and the negative prompt (empty: the official
        default) unless the plan runs unguided."""
        prompts = [prompt] if plan.cfg == "none" else [prompt, negative_prompt or DEFAULT_NEGATIVE_PROMPT]
        names = ("prompt", "negative_prompt")[:len(prompts)]
        tokens = dict(zip(names, self.tokenizer.count(prompts), strict=True))
        return PromptContext(self.encode_text(prompts).to(self.dtype), tokens)   # [1 or 2, L, 4096]

    @torch.no_grad()
    def encode_conditioning(self, plan: RunPlan) -> torch.Tensor | None:
        """The DiT's extra input channels: I2V `y` [1, 20, f, h, w] (first-frame mask | VAE latent of the
        image, then black frames); for TI2V with an image, that image's latent [1, 48, 1, h, w], the first
        latent frame; None for T2V and text-only TI2V."""
        first = plan.conditioning.image
        if first is None:
            return None
        if plan.conditioning.task == "ti2v":
            return self.vae.encode(first[:, :, None].to(self.device, torch.float32))
        h, w = first.shape[-2:]
        clip = torch.cat([first[:, :, None], torch.zeros(1, 3, plan.frame_num - 1, h, w)], dim=2)
        y_lat = self.vae.encode(clip.to(self.device, torch.float32))   # [1, 16, f, h/8, w/8]
        return torch.cat([i2v_mask(plan.frame_num, plan.grid.height, plan.grid.width, self.device), y_lat], dim=1)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, prompt: str, negative_prompt: str = "", image: Image.Image | str | Path | None = None,
                 size: tuple[int, int] = (832, 480), frame_num: int = 81, steps: int | None = None,
                 shift: float | None = None, guide_scale: float | tuple[float, float] | None = None,
                 solver: str = "unipc", seed: int = 0, decode: bool = True,
                 callback: Callable[[StepInfo], None] | None = None,
                 should_cancel: Callable[[], bool] | None = None,
                 noise: torch.Tensor | None = None) -> GenerationResult:
        """Generate one video: plan -> encode -> sample -> decode. None means the model's default; for
        I2V `size` gives the target area and the image the aspect ratio. `noise` ([16, f, h, w])
        replaces the seeded draw."""
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        plan = self.plan(image=image, size=size, frame_num=frame_num, steps=steps, shift=shift,
                         guide_scale=guide_scale, solver=solver, seed=seed, noise=noise)
        y = self.encode_conditioning(plan)
        self._sync()
        timings["conditioning"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        text = self.encode_prompt(plan, prompt, negative_prompt)
        self._sync()
        timings["text"] = time.perf_counter() - t0

        sampled = self.sample(plan, text.context, y, callback=callback, should_cancel=should_cancel)
        timings["denoise"] = sampled.seconds
        return self.result(plan, sampled, text, negative_prompt, timings, decode)

    def result(self, plan: RunPlan, sampled: Sampled, text: PromptContext, negative_prompt: str,
               timings: dict[str, float], decode: bool) -> GenerationResult:
        """The result of a sampled run, its latents decoded to frames when `decode`."""
        s = plan.steps
        result = GenerationResult(
            latents=sampled.latents[0].float().cpu(), frames=None, seed=plan.seed,
            settings=dict(task=self.spec.name, size=list(plan.size), frame_num=plan.frame_num, steps=s.steps,
                          shift=s.shift, guide_scale=list(s.guide_scale), solver=s.solver, seed=plan.seed,
                          negative_prompt=negative_prompt or DEFAULT_NEGATIVE_PROMPT,
                          cfg_batch=plan.cfg == "batched", cfg=plan.cfg),
            timings=timings, step_seconds=sampled.step_seconds, experts_per_step=sampled.experts_per_step,
            prompt_tokens=text.tokens)
        if decode:
            t0 = time.perf_counter()
            result.frames = self.decode(result.latents)
            timings["decode"] = time.perf_counter() - t0
        return result

    @torch.no_grad()
    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """[16, f, h, w] latents -> [3, F, H, W] float in [-1, 1] (VAE in float32)."""
        return self.vae.decode(latents.to(self.device, torch.float32)[None])[0]

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """[16, f, h, w] latents -> uint8 frames [F, H, W, 3]."""
        return video_to_frames(self.decode_video(latents))
