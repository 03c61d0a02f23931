"""Model presets: what each Wan2.2 task is, which files it loads and its sampling defaults.

A `ModelSpec` is everything the engine and the flows need to know about a task without
touching weights: the checkpoint layout, the supported output sizes, the frame rate and
the official sampling defaults (ANCHORS.md 3.4-3.5). Network sizes are not here: they are
read from each checkpoint (config.json, tensor shapes) so the same code loads a real
release or the tiny preset.
"""
from __future__ import annotations

from dataclasses import dataclass

# The official default negative prompt (wan/configs/shared_config.py): used when the
# caller passes an empty negative prompt.
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，"
    "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"
VAE21_FILE = "Wan2.1_VAE.pth"
VAE22_FILE = "Wan2.2_VAE.pth"
ROOT_DIT = "."     # TI2V-5B keeps its one DiT at the folder's root
HIGH_NOISE_DIR = "high_noise_model"
LOW_NOISE_DIR = "low_noise_model"


@dataclass(frozen=True)
class ModelSpec:
    """One Wan2.2 task as released: layout, sizes and sampling defaults."""

    name: str
    task: str                       # "t2v" | "i2v" | "ti2v"
    experts: tuple[str, ...]        # DiT folders; two for the A14B MoE, "." for a root DiT
    vae_file: str
    sizes: tuple[tuple[int, int], ...]  # supported (W, H)
    fps: int
    steps: int
    shift: float
    guide_scale: tuple[float, float]    # (low-noise expert, high-noise expert)
    boundary: float | None              # high-noise expert while t >= boundary * 1000
    frame_num: int = 81
    vae_stride: tuple[int, int, int] = (4, 8, 8)
    patch_size: tuple[int, int, int] = (1, 2, 2)
    z_dim: int = 16

    @property
    def is_moe(self) -> bool:
        return len(self.experts) == 2

    def size_names(self) -> list[str]:
        return [f"{w}*{h}" for w, h in self.sizes]


@dataclass(frozen=True)
class DistilledSettings:
    """The sampling of the step-distilled Wan2.2-Lightning LoRAs, the same for T2V-A14B and I2V-A14B (their
    wan/configs/wan_{t2v,i2v}_A14B.py and generate.py, cited in docs/lora.md): 4 Euler steps on their schedule
    at shift 5 and guide scale 1 on both experts (no unconditional branch); the experts switch at the base
    model's boundary (0.875 T2V, 0.900 I2V), after 2 of the 4 steps for both."""

    steps: int = 4
    shift: float = 5.0
    guide_scale: float = 1.0
    solver: str = "lightning"

    def sampling(self) -> dict:
        """The keyword arguments of `plan` / `generate` for a distilled run."""
        return dict(steps=self.steps, shift=self.shift, guide_scale=self.guide_scale, solver=self.solver)


DISTILLED = DistilledSettings()

_A14B_SIZES = ((1280, 720), (720, 1280), (832, 480), (480, 832))

MODEL_SPECS: dict[str, ModelSpec] = {
    "t2v-A14B": ModelSpec(
        name="t2v-A14B", task="t2v", experts=(HIGH_NOISE_DIR, LOW_NOISE_DIR), vae_file=VAE21_FILE,
        sizes=_A14B_SIZES, fps=16, steps=40, shift=12.0, guide_scale=(3.0, 4.0), boundary=0.875,
    ),
    "i2v-A14B": ModelSpec(
        name="i2v-A14B", task="i2v", experts=(HIGH_NOISE_DIR, LOW_NOISE_DIR), vae_file=VAE21_FILE,
        sizes=_A14B_SIZES, fps=16, steps=40, shift=5.0, guide_scale=(3.5, 3.5), boundary=0.900,
    ),
    # Random-weight toy models in the same architecture (wan_engine/tiny.py writes them as
    # official-layout folders): for CPU demos and tests, any size that is a multiple of 16.
    # TI2V-5B: text or text+image to 720p at 24 fps, one DiT, the Wan 2.2 VAE (48 channels, 16x). The official
    # code allows these two sizes; with an image the size gives the area and the image the aspect ratio.
    "ti2v-5B": ModelSpec(
        name="ti2v-5B", task="ti2v", experts=(ROOT_DIT,), vae_file=VAE22_FILE, sizes=((1280, 704), (704, 1280)),
        fps=24, steps=50, shift=5.0, guide_scale=(5.0, 5.0), boundary=None, frame_num=121,
        vae_stride=(4, 16, 16), z_dim=48,
    ),
    "tiny": ModelSpec(
        name="tiny", task="t2v", experts=(HIGH_NOISE_DIR, LOW_NOISE_DIR), vae_file=VAE21_FILE,
        sizes=((64, 64), (96, 64), (64, 96), (128, 128)), fps=16, steps=10, shift=12.0,
        guide_scale=(3.0, 4.0), boundary=0.875,
    ),
    "tiny-i2v": ModelSpec(
        name="tiny-i2v", task="i2v", experts=(HIGH_NOISE_DIR, LOW_NOISE_DIR), vae_file=VAE21_FILE,
        sizes=((64, 64), (96, 64), (64, 96), (128, 128)), fps=16, steps=10, shift=5.0,
        guide_scale=(3.5, 3.5), boundary=0.900,
    ),
    "tiny-ti2v": ModelSpec(
        name="tiny-ti2v", task="ti2v", experts=(ROOT_DIT,), vae_file=VAE22_FILE,
        sizes=((64, 64), (96, 64), (64, 96), (128, 128)), fps=24, steps=10, shift=5.0, guide_scale=(5.0, 5.0),
        boundary=None, vae_stride=(4, 16, 16), z_dim=48,
    ),
}

TINY_PRESETS = ("tiny", "tiny-i2v", "tiny-ti2v")


def spec_for_model_type(model_type: str) -> ModelSpec:
    """The release spec for a DiT `model_type` as written in the checkpoint's config.json."""
    for spec in MODEL_SPECS.values():
        if spec.task == model_type and spec.name not in TINY_PRESETS:
            return spec
    known = sorted({s.task for s in MODEL_SPECS.values()})
    raise ValueError(f"unsupported model_type {model_type!r} in config.json; supported: {known}")
