"""The Wan2.2 generation pipeline: one denoising loop for every task.

T2V and I2V differ only by their `Conditioning` (extra DiT input channels); the loop is
shared: draw seeded noise, encode the prompts, then per step pick the expert by timestep
(A14B MoE), run the conditional and unconditional branches, combine them with the
expert's guide scale and step the solver. The two branches run as one batch-2 forward
when memory allows (`WanPipeline.cfg_batch`), else as two forwards.

Seams for performance patches (they act only through these):
- `block_stack_hook(call, tokens, run_blocks)`: wraps the block stack of every DiT call,
  told which step, timestep, expert and branch it is (step caching lives here);
- `repeated_blocks()`: the modules worth compiling;
- `generate(callback=...)`: per-step `StepInfo` with timings (progress);
- `generate(should_cancel=...)`: checked between steps (cancellation).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .configs import DEFAULT_NEGATIVE_PROMPT, ModelSpec
from .samplers import make_solver
from .t5 import UMT5Encoder, encode_prompts
from .text import PromptTokenizer, TokenCount
from .vae import WanVAE21

log = logging.getLogger(__name__)

HIGH_NOISE, LOW_NOISE = "high_noise", "low_noise"


class GenerationCancelled(RuntimeError):
    """Raised between steps when the caller's `should_cancel()` says so."""


@dataclass(frozen=True)
class BlockCall:
    """Which DiT call a block-stack hook is wrapping."""

    step: int
    timestep: int
    expert: str
    branches: tuple[str, ...]  # the rows of the batch, in order: ("cond",), ("uncond",) or ("cond", "uncond")


BlockStackHook = Callable[[BlockCall, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class StepInfo:
    step: int          # 0-based
    total: int
    timestep: int
    expert: str
    seconds: float


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


def video_to_frames(video: torch.Tensor) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3]."""
    frames = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().numpy()


def load_image(image: Image.Image | str | Path) -> torch.Tensor:
    """An RGB image as float32 [3, H, W] in [-1, 1] (the official to_tensor * 2 - 1)."""
    if not isinstance(image, Image.Image):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"input image {path} does not exist")
        image = Image.open(path)
    arr = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float().div(255).mul(2).sub(1)   # [3, H, W]


def i2v_latent_grid(image_hw: tuple[int, int], max_area: int, stride: int = 8, patch: int = 2) -> tuple[int, int]:
    """Latent (h, w) of an I2V video: the image's aspect ratio at `max_area` pixels (official rule)."""
    h, w = image_hw
    aspect = h / w
    lat_h = round(np.sqrt(max_area * aspect) // stride // patch * patch)
    lat_w = round(np.sqrt(max_area / aspect) // stride // patch * patch)
    return int(lat_h), int(lat_w)


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


def activation_bytes(config, tokens: int) -> int:
    """Rough working memory of one batch-1 DiT forward over `tokens` video tokens: the float32
    residual stream and its temporaries (16 bytes per channel) plus the FFN hidden (4 per channel)."""
    return tokens * (config.dim * 16 + config.ffn_dim * 4)


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _on_device(module: nn.Module, device: torch.device) -> bool:
    return next(module.parameters()).device.type == device.type


def plan_memory(free_bytes: int | None, expert_bytes: int, n_experts: int, t5_bytes: int,
                vae_bytes: int, activation_bytes: int) -> MemoryPlan:
    """Keep everything on the device when it fits; else keep the experts and let T5 wait on
    the CPU; else hold only the active expert on the device."""
    if free_bytes is None:  # CPU: nothing to move
        return MemoryPlan(True, True)
    experts = expert_bytes * n_experts + vae_bytes + activation_bytes
    if experts + t5_bytes <= free_bytes:
        return MemoryPlan(True, True)
    return MemoryPlan(experts <= free_bytes, False)


class WanPipeline:
    """Loaded models of one Wan2.2 task plus the denoising loop. Build with `load_pipeline`."""

    def __init__(self, spec: ModelSpec, experts: dict[str, nn.Module], text_encoder: UMT5Encoder,
                 tokenizer: PromptTokenizer, vae: WanVAE21, device: torch.device, dtype: torch.dtype,
                 memory: MemoryPlan, checkpoint_dir: Path):
        self.spec = spec
        self.experts = experts
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.vae = vae
        self.device = device
        self.dtype = dtype
        self.memory = memory
        self.checkpoint_dir = checkpoint_dir
        self.block_stack_hook: BlockStackHook | None = None
        # cond and uncond as one batch-2 forward: True / False, or None to decide per run from free memory
        self.cfg_batch: bool | None = None

    # ------------------------------------------------------------------ seams
    def repeated_blocks(self) -> list[nn.Module]:
        return [block for dit in self.experts.values() for block in dit.blocks]

    # ------------------------------------------------------------------ helpers
    def expert_for(self, timestep: int) -> str:
        if not self.spec.is_moe:
            return next(iter(self.experts))
        return HIGH_NOISE if timestep >= self.spec.boundary * 1000 else LOW_NOISE

    def _activate(self, name: str) -> nn.Module:
        """The expert to run now; when experts are not resident the other one goes to the CPU."""
        if not self.memory.experts_resident:
            for other, dit in self.experts.items():
                if other != name:
                    dit.to("cpu")
            self.experts[name].to(self.device)
        return self.experts[name]

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """[B, L, 4096] zero-padded contexts (zeros past each prompt's length)."""
        if not self.memory.text_encoder_resident:
            self.text_encoder.to(self.device)
        context, _ = encode_prompts(self.text_encoder, self.tokenizer, prompts)
        if not self.memory.text_encoder_resident:
            self.text_encoder.to("cpu")
        return context

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

    def _check_frames(self, frame_num: int) -> None:
        if frame_num < 1 or (frame_num - 1) % self.spec.vae_stride[0]:
            raise ValueError(f"frame_num={frame_num} is not 4k+1 (allowed: 5, 9, ..., 81, ...)")

    def image_conditioning(self, image: Image.Image | str | Path, size: tuple[int, int],
                           frame_num: int) -> torch.Tensor:
        """I2V `y` [1, 20, f, h, w]: first-frame mask | VAE latent of (image, then black frames)."""
        img = load_image(image)                                    # [3, H, W]
        lat_h, lat_w = i2v_latent_grid(tuple(img.shape[1:]), size[0] * size[1],
                                       self.spec.vae_stride[1], self.spec.patch_size[1])
        h, w = lat_h * self.spec.vae_stride[1], lat_w * self.spec.vae_stride[2]
        first = F.interpolate(img[None], size=(h, w), mode="bicubic")   # [1, 3, h, w], on the CPU as official
        clip = torch.cat([first[:, :, None], torch.zeros(1, 3, frame_num - 1, h, w)], dim=2)
        y_lat = self.vae.encode(clip.to(self.device, torch.float32))   # [1, 16, f, h/8, w/8]
        return torch.cat([i2v_mask(frame_num, lat_h, lat_w, self.device), y_lat], dim=1)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, prompt: str, negative_prompt: str = "", image: Image.Image | str | Path | None = None,
                 size: tuple[int, int] = (832, 480), frame_num: int = 81, steps: int | None = None,
                 shift: float | None = None, guide_scale: float | tuple[float, float] | None = None,
                 solver: str = "unipc", seed: int = 0, decode: bool = True,
                 callback: Callable[[StepInfo], None] | None = None,
                 should_cancel: Callable[[], bool] | None = None,
                 noise: torch.Tensor | None = None) -> GenerationResult:
        """Generate one video. None means the model's default; for I2V `size` gives the target
        area and the image the aspect ratio. `noise` ([16, f, h, w]) replaces the seeded draw."""
        spec = self.spec
        self._check_frames(frame_num)
        w, h = size
        if h % 16 or w % 16:
            raise ValueError(f"size={w}*{h}: width and height must be multiples of 16")
        if spec.task == "i2v" and image is None:
            raise ValueError(f"{spec.name} is image-to-video: pass image=")
        if spec.task == "t2v" and image is not None:
            raise ValueError(f"{spec.name} is text-to-video: it takes no image")
        steps = steps or spec.steps
        shift = spec.shift if shift is None else shift
        if guide_scale is None:
            guide_scale = spec.guide_scale
        elif isinstance(guide_scale, int | float):
            guide_scale = (float(guide_scale), float(guide_scale))
        sampler = make_solver(solver, steps, shift)
        timesteps = sampler.schedule.timesteps.tolist()
        negative_prompt = negative_prompt or DEFAULT_NEGATIVE_PROMPT
        timings: dict[str, float] = {}

        t0 = time.perf_counter()
        cond_y = None
        if spec.task == "i2v":
            cond_y = self.image_conditioning(image, size, frame_num)
            lat_h, lat_w = cond_y.shape[-2:]
        else:
            lat_h, lat_w = h // spec.vae_stride[1], w // spec.vae_stride[2]
        lat_f = (frame_num - 1) // spec.vae_stride[0] + 1
        if noise is None:
            # drawn like the official code: a generator on the run's device, seeded once
            gen = torch.Generator(device=self.device).manual_seed(seed)
            noise = torch.randn(spec.z_dim, lat_f, lat_h, lat_w, dtype=torch.float32,
                                device=self.device, generator=gen)
        latents = noise.to(self.device, torch.float32)[None]              # [1, 16, f, h, w]
        self._sync()
        timings["conditioning"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        prompt_tokens = dict(zip(("prompt", "negative_prompt"), self.tokenizer.count([prompt, negative_prompt]),
                                 strict=True))
        context = self.encode_text([prompt, negative_prompt]).to(self.dtype)   # [2, L, 4096]
        contexts = {"cond": context[:1], "uncond": context[1:]}
        self._sync()
        timings["text"] = time.perf_counter() - t0

        t_device = sampler.schedule.timesteps.to(self.device)
        pt, ph, pw = spec.patch_size
        batched = self.batch_cfg(lat_f // pt * (lat_h // ph) * (lat_w // pw))
        both_y = None if cond_y is None or not batched else cond_y.repeat(2, 1, 1, 1, 1)   # [2, 20, f, h, w]
        step_seconds, experts_used = [], []
        t_loop = time.perf_counter()
        for i, t in enumerate(timesteps):
            if should_cancel is not None and should_cancel():
                raise GenerationCancelled(f"cancelled before step {i + 1}/{steps}")
            t_step = time.perf_counter()
            name = self.expert_for(t)
            dit = self._activate(name)
            g = guide_scale[1] if name == HIGH_NOISE else guide_scale[0]
            if batched:
                # rows (cond, uncond), in the order of `context`
                hook = self._bind_hook(BlockCall(i, t, name, ("cond", "uncond")))
                cond, uncond = dit(latents.repeat(2, 1, 1, 1, 1), t_device[i:i + 1].expand(2), context,
                                   y=both_y, block_stack_hook=hook).chunk(2)   # 2 x [1, 16, f, h, w]
            else:
                preds = {}
                for branch, ctx in contexts.items():
                    hook = self._bind_hook(BlockCall(i, t, name, (branch,)))
                    preds[branch] = dit(latents, t_device[i:i + 1], ctx, y=cond_y, block_stack_hook=hook)
                cond, uncond = preds["cond"], preds["uncond"]
            velocity = uncond + g * (cond - uncond)
            latents = sampler.step(velocity, latents)
            experts_used.append(name)
            if callback is not None:
                self._sync()   # progress reports completed work: one sync per step, after it is queued
                step_seconds.append(time.perf_counter() - t_step)
                callback(StepInfo(i, steps, int(t), name, step_seconds[-1]))
        self._sync()
        timings["denoise"] = time.perf_counter() - t_loop
        if not step_seconds:
            step_seconds = [timings["denoise"] / steps] * steps

        result = GenerationResult(
            latents=latents[0].float().cpu(), frames=None, seed=seed,
            settings=dict(task=spec.name, size=[w, h], frame_num=frame_num, steps=steps, shift=shift,
                          guide_scale=list(guide_scale), solver=solver, seed=seed,
                          negative_prompt=negative_prompt, cfg_batch=batched),
            timings=timings, step_seconds=step_seconds, experts_per_step=experts_used, prompt_tokens=prompt_tokens)
        if decode:
            t0 = time.perf_counter()
            result.frames = self.decode(result.latents)
            timings["decode"] = time.perf_counter() - t0
        return result

    def _bind_hook(self, call: BlockCall):
        if self.block_stack_hook is None:
            return None
        hook = self.block_stack_hook
        return lambda tokens, run_blocks: hook(call, tokens, run_blocks)

    @torch.no_grad()
    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """[16, f, h, w] latents -> [3, F, H, W] float in [-1, 1] (VAE in float32)."""
        return self.vae.decode(latents.to(self.device, torch.float32)[None])[0]

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """[16, f, h, w] latents -> uint8 frames [F, H, W, 3]."""
        return video_to_frames(self.decode_video(latents))

