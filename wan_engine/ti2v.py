"""What TI2V-5B's text+image mode does to its input image and to the timesteps of the first latent frame.

With an image, the video's first latent frame is the VAE latent of that image and stays it: the loop puts it
back after every step, and the DiT sees that frame at t = 0 while the others are at the step's t (one
timestep row per latent frame, `frame_timesteps`). The image is fitted to the requested area as the official
code does (`fit_image`): the output size nearest the image's aspect ratio in multiples of 32 pixels, a
Lanczos resize that covers it, and a centre crop.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

SIZE_MULTIPLE = 32   # VAE stride 16 times the DiT's 2x2 patch


def best_output_size(width: int, height: int, multiple_w: int, multiple_h: int, area: int) -> tuple[int, int]:
    """The (W, H) in multiples of (multiple_w, multiple_h), within `area` pixels, whose aspect ratio is nearest
    width/height: of rounding the width first and rounding the height first, the closer one (the height
    first when they tie), as the official code chooses."""
    ratio = width / height
    exact_w = (area * ratio) ** 0.5
    exact_h = area / exact_w
    w1 = int(exact_w // multiple_w * multiple_w)
    h1 = int(area / w1 // multiple_h * multiple_h)
    h2 = int(exact_h // multiple_h * multiple_h)
    w2 = int(area / h2 // multiple_w * multiple_w)

    def off(w: int, h: int) -> float:
        return max(ratio / (w / h), (w / h) / ratio)

    return (w1, h1) if off(w1, h1) < off(w2, h2) else (w2, h2)


def fit_image(image: Image.Image, area: int) -> torch.Tensor:
    """`image` resized and centre-cropped to the best output size for `area`: float32 [1, 3, H, W] in [-1, 1]."""
    image = image.convert("RGB")
    out_w, out_h = best_output_size(image.width, image.height, SIZE_MULTIPLE, SIZE_MULTIPLE, area)
    scale = max(out_w / image.width, out_h / image.height)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
    left, top = (image.width - out_w) // 2, (image.height - out_h) // 2
    image = image.crop((left, top, left + out_w, top + out_h))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)   # [3, H, W] uint8
    return pixels.float().div(255).sub(0.5).div(0.5)[None]


def frame_timesteps(timesteps: torch.Tensor, frames: int) -> torch.Tensor:
    """The DiT's timesteps of every step with the image's latent frame at 0: [steps] -> [steps, frames]."""
    rows = timesteps[:, None].repeat(1, frames)
    rows[:, 0] = 0
    return rows


def keep_first_frame(latents: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """latents [B, C, f, h, w] with latent frame 0 set to `first` [B, C, 1, h, w] (a new tensor)."""
    return torch.cat([first.to(latents.dtype), latents[:, :, 1:]], dim=2)
