"""`GenerationRequest`: one video to generate, validated before any GPU work.

It is the parameter of the `generate-video` flow, so its JSON schema is what the Prefect UI
renders: Literal fields become dropdowns and `Field(ge=, le=)` number ranges. Everything a
run cannot satisfy fails at construction with the field, the value and what is allowed:
an empty prompt, an unknown task, a size the task does not offer, a duration outside the
range for this hardware, an I2V request without an image, an image or checkpoint outside
the configured roots, an image that is not a readable PNG, JPEG, WEBP or BMP of sane size,
a checkpoint folder the loader would refuse (flows/inputs.py). Prefect validates a flow's
parameters before its body runs, so from the CLI, from Python and from a deployment run
alike this happens before any GPU slot is taken.

Defaults that depend on the task (size, steps, shift, frame count) are filled in, so the
validated request is the complete record of what was asked for.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from flows.inputs import InputError, check_image, confine, validate_checkpoint
from tasks.allocate import Allocation, job_world_sizes
from tasks.gpus import GpuProfile, read_gpu_profile
from tasks.runs import RunDescription
from tasks.settings import Strategy, Tier, get_settings
from wan_engine.configs import DISTILLED, MODEL_SPECS, TINY_PRESETS, ModelSpec
from wan_engine.lora import MAX_STRENGTH, LoraChoice, LoraError, scan_lora
from wan_engine.sizes import Size

TaskName = Literal[tuple(MODEL_SPECS)]  # type: ignore[valid-type]
SizeName = Literal[tuple(dict.fromkeys(s for spec in MODEL_SPECS.values() for s in spec.size_names()))]  # type: ignore[valid-type]
Solver = Literal["unipc", "dpm++", "euler", "lightning"]
StepCache = Literal["teacache", "magcache"]

DEFAULT_DURATION_RANGE = (2.0, 10.0)
TINY_MAX_SECONDS = 10.0  # test models: as short as 5 frames (4 / fps seconds), so CPU runs take seconds
HIGH_VRAM_RANGES = {"720p": (5.0, 21.0), "480p": (5.0, 33.0)}  # A14B on GPUs with >= 80 GB
HIGH_VRAM_TASKS = ("t2v-A14B", "i2v-A14B")
# TI2V-5B at 1280*704 (24 fps): 10 s is 241 frames, a forward of about 6 GB beside the 10 GB DiT and the 2.8 GB
# VAE with umT5 encoding on the CPU, within a 24 GB card; on >= 80 GB cards 20 s (481 frames, about 11 GB).
TI2V_DURATION_RANGES = {"high_vram": (2.0, 20.0), "default": (2.0, 10.0)}


def release_folder(task: str) -> str:
    """The folder name of a task's official release, e.g. t2v-A14B -> Wan2.2-T2V-A14B."""
    kind, size = task.split("-", 1)
    return f"Wan2.2-{kind.upper()}-{size}"


def duration_range(spec: ModelSpec, size: Size, profile: GpuProfile) -> tuple[float, float]:
    """Seconds of video a task may generate at `size` on this hardware (DESIGN.md "Durations")."""
    if spec.name in TINY_PRESETS:
        return 4 / spec.fps, TINY_MAX_SECONDS
    if spec.name in HIGH_VRAM_TASKS and profile.high_vram:
        return HIGH_VRAM_RANGES["720p" if min(size) >= 720 else "480p"]
    if spec.name == "ti2v-5B":
        return TI2V_DURATION_RANGES["high_vram" if profile.high_vram else "default"]
    return DEFAULT_DURATION_RANGE


def _default_task(profile: GpuProfile) -> str:
    settings = get_settings()
    if settings.default_task:
        if settings.default_task not in MODEL_SPECS:  # settings import no engine code: checked here, where tasks are
            raise ValueError(f"task: unset, and WAN_DEFAULT_TASK={settings.default_task!r} is not a task; "
                             f"allowed: {', '.join(MODEL_SPECS)}")
        return settings.default_task
    root = settings.checkpoint_root
    if profile.gpus and not profile.simulated and root and (root / release_folder("t2v-A14B")).is_dir():
        return "t2v-A14B"
    return "tiny"


class LoraRequest(BaseModel):
    """One LoRA of a request: a file by name in WAN_LORA_DIR or by path inside WAN_INPUT_ROOTS."""

    model_config = ConfigDict(extra="forbid")

    file: str = Field(min_length=1, description="A .safetensors file name in WAN_LORA_DIR, or a path inside "
                                                "WAN_INPUT_ROOTS.")
    strength: float = Field(1.0, ge=0, le=MAX_STRENGTH, description="How much of the LoRA (0-2).")
    expert: Literal["both", "high", "low"] = Field("both", description="The A14B expert(s) it applies to.")


def resolve_lora(file: str, lora_dir: Path | None, roots: list[Path]) -> Path:
    """A LoRA's file: a bare name in WAN_LORA_DIR (".safetensors" may be left out), else a path confined to the
    input roots (and WAN_LORA_DIR)."""
    if lora_dir is not None and Path(file).name == file:
        named = Path(lora_dir) / (file if file.endswith(".safetensors") else f"{file}.safetensors")
        if named.is_file():
            return confine(named, [Path(lora_dir)], "WAN_LORA_DIR")
    return confine(file, [*roots, *([Path(lora_dir)] if lora_dir else [])], "WAN_INPUT_ROOTS or WAN_LORA_DIR")


class GenerationRequest(BaseModel):
    """What to generate, how, and on which GPUs."""

    model_config = ConfigDict(extra="forbid")

    task: TaskName | None = Field(None, description="Model and task; unset: WAN_DEFAULT_TASK, else tiny without a GPU.")
    prompt: str = Field(
        "a red fox trotting through fresh snow, cinematic lighting", min_length=1, description="What the video shows."
    )
    negative_prompt: str = Field("", description="Empty: the official default negative prompt.")
    image: str | None = Field(None, description="First frame: needed by I2V tasks, optional for TI2V (text+image "
                                                "mode); a PNG, JPEG, WEBP or BMP file inside WAN_INPUT_ROOTS.")
    size: SizeName | None = Field(None, description="W*H; unset: the task's first size.")
    duration_s: float | None = Field(None, gt=0, le=60, description="Video length; frames are 4k+1 at the task fps.")
    frame_count: int | None = Field(None, ge=5, le=1001, description="Exact frame count (4k+1), instead of duration_s.")
    steps: int | None = Field(None, ge=1, le=200, description="Sampling steps; unset: the task's default.")
    shift: float | None = Field(None, gt=0, le=50, description="Noise schedule shift; unset: the task's default.")
    guide_scale: float | None = Field(
        None, ge=0, le=30, description="Classifier-free guidance; unset: the per-expert default."
    )
    solver: Solver = "unipc"
    seed: int | None = Field(None, ge=0, lt=2**63, description="Unset: a random seed, recorded with the video.")
    distilled: bool = Field(False, description="4-step distilled sampling (Wan2.2-Lightning: 4 steps, shift 5, "
                                               "guide scale 1, their Euler schedule); use it with a 4-step LoRA.")
    loras: list[LoraRequest] = Field(default_factory=list, description="LoRA adapters, stacked in order.")
    tier: Tier | None = Field(None, description="Performance tier: quality (as official), balanced (+ compile, "
                                                "bf16 VAE decode), speed (+ step caching).")
    teacache_threshold: float = Field(0.25, ge=0.05, le=0.5, description="TeaCache threshold for the speed tier.")
    step_cache: StepCache = Field("teacache", description="The speed tier's step skipping: teacache (with "
                                                          "teacache_threshold) or magcache (published schedule).")
    strategy: Strategy | None = Field(
        None, description="How runs share the GPUs; unset: WAN_DEFAULT_STRATEGY."
    )
    gpus_per_job: int | None = Field(None, ge=1, le=64, description="GPUs per run for the concurrent strategy (1).")
    gpu_ids: list[int] | None = Field(None, description="Only these GPUs (NVML indices); unset: all of them.")
    checkpoint: str | None = Field(
        None, description="Official checkpoint folder inside WAN_CHECKPOINT_ROOT or WAN_INPUT_ROOTS; unset: "
                          "<WAN_CHECKPOINT_ROOT>/Wan2.2-<TASK>, or the preset."
    )

    @classmethod
    def for_hardware(cls, profile: GpuProfile, **fields: Any) -> GenerationRequest:
        """Validate against a given GPU profile instead of the one detected on this host."""
        return cls.model_validate(fields, context={"gpu_profile": profile})

    @field_validator("prompt")
    @classmethod
    def _says_something(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("is only whitespace; say what the video shows")
        return value

    @property
    def spec(self) -> ModelSpec:
        return MODEL_SPECS[self.task]

    @property
    def video_size(self) -> Size:
        """`size` as a Size (the field stays `W*H` text: the UI's dropdown shows it)."""
        return Size.parse(self.size)

    def describe_run(self, seed: int, allocation: Allocation) -> RunDescription:
        """The run this validated request becomes with its seed drawn and its GPUs taken: what every task of
        the GPU phase is handed."""
        return RunDescription(
            request=self.model_dump(mode="json"), task=self.task, checkpoint=self.checkpoint, prompt=self.prompt,
            negative_prompt=self.negative_prompt, image=self.image, size=self.video_size,
            frame_count=self.frame_count, fps=self.spec.fps, steps=self.steps, shift=self.shift,
            guide_scale=self.guide_scale, solver=self.solver, seed=seed, tier=self.tier,
            teacache_threshold=self.teacache_threshold, step_cache=self.step_cache, allocation=allocation,
            loras=self.lora_choices(), distilled=self.distilled)

    @model_validator(mode="after")
    def _complete_and_check(self, info: ValidationInfo) -> GenerationRequest:
        profile = (info.context or {}).get("gpu_profile") or read_gpu_profile(get_settings().gpu_inventory)
        settings = get_settings()
        if self.task is None:
            self.task = _default_task(profile)
        self.tier = self.tier or settings.default_tier
        self.strategy = self.strategy or settings.default_strategy
        spec = self.spec
        self._check_size(spec)
        self._resolve_frames(spec, profile)
        self._apply_distilled()
        self.steps = self.steps or spec.steps
        self.shift = self.shift or spec.shift
        self._check_image(spec, settings.input_roots)
        self._check_loras(spec, settings.lora_dir, settings.input_roots)
        self._resolve_checkpoint(settings.checkpoint_root, settings.checkpoint_roots)
        self._check_gpus(profile)  # after the checkpoint: its heads decide how many GPUs one job can use
        return self

    def _check_size(self, spec: ModelSpec) -> None:
        allowed = spec.size_names()
        if self.size is None:
            self.size = allowed[0]
        elif self.size not in allowed:
            raise ValueError(f"size: {self.size!r} is not offered by task {spec.name!r}; allowed: {', '.join(allowed)}")

    def _resolve_frames(self, spec: ModelSpec, profile: GpuProfile) -> None:
        if self.frame_count is not None and self.frame_count % 4 != 1:
            lower = self.frame_count - (self.frame_count - 1) % 4
            raise ValueError(f"frame_count: {self.frame_count} is not 4k+1; nearest allowed: {lower} or {lower + 4}")
        if self.duration_s is not None:
            frames = 4 * max(1, math.floor(self.duration_s * spec.fps / 4 + 0.5)) + 1
            if self.frame_count is not None and self.frame_count != frames:
                raise ValueError(f"duration_s={self.duration_s} ({frames} frames at {spec.fps} fps) and "
                                 f"frame_count={self.frame_count} disagree: give one of them")
            field, value, seconds = "duration_s", self.duration_s, self.duration_s
        else:
            frames = self.frame_count or spec.frame_num
            field, value, seconds = "frame_count", frames, (frames - 1) / spec.fps
        low, high = duration_range(spec, self.video_size, profile)
        if not low - 1e-9 <= seconds <= high + 1e-9:
            hardware = "GPUs with >= 80 GB" if profile.high_vram else "this hardware (no GPU with >= 80 GB)"
            raise ValueError(
                f"{field}: {value} ({seconds:g} s) is outside {low:g}-{high:g} s, the range for "
                f"{spec.name} at {self.size} on {hardware}"
            )
        self.frame_count = frames
        if self.duration_s is None:
            self.duration_s = (frames - 1) / spec.fps

    def _apply_distilled(self) -> None:
        """Distilled mode fills the Lightning settings in; a value given that contradicts them is refused."""
        if not self.distilled:
            return
        wanted = DISTILLED.sampling()
        given = dict(steps=self.steps, shift=self.shift, guide_scale=self.guide_scale)
        clash = [f"{k}={v}" for k, v in given.items() if v is not None and v != wanted[k]]
        if self.solver not in ("unipc", "lightning"):   # unipc: the field's default
            clash.append(f"solver={self.solver!r}")
        if clash:
            raise ValueError(f"distilled: the distilled mode runs {wanted['steps']} steps, shift {wanted['shift']:g}, "
                             f"guide scale {wanted['guide_scale']:g} and solver lightning; leave {', '.join(clash)} "
                             f"unset or turn distilled off")
        self.steps, self.shift, self.guide_scale = wanted["steps"], wanted["shift"], wanted["guide_scale"]
        self.solver = wanted["solver"]

    def _check_loras(self, spec: ModelSpec, lora_dir: Path | None, roots: list[Path]) -> None:
        for i, lora in enumerate(self.loras):
            if lora.expert != "both" and not spec.is_moe:
                raise ValueError(f"loras[{i}].expert: {spec.name} has one DiT; use 'both'")
            try:
                path = resolve_lora(lora.file, lora_dir, roots)
                scan_lora(path)
            except (InputError, LoraError) as exc:
                raise ValueError(f"loras[{i}].file: {exc}") from None
            lora.file = str(path)  # the file checked is the file read

    def lora_choices(self) -> tuple[LoraChoice, ...]:
        return tuple(LoraChoice(lora.file, lora.strength, lora.expert) for lora in self.loras)

    def _check_image(self, spec: ModelSpec, roots: list[Path]) -> None:
        takes_image = spec.task in ("i2v", "ti2v")
        if spec.task == "i2v" and self.image is None:
            raise ValueError(
                f"image: task {spec.name!r} turns an image into a video; give image=<path of the first frame>"
            )
        if self.image is not None and not takes_image:
            raise ValueError(f"image: task {spec.name!r} takes no image; image tasks: "
                             f"{', '.join(n for n, s in MODEL_SPECS.items() if s.task in ('i2v', 'ti2v'))}")
        if self.image is not None:
            try:
                path = confine(self.image, roots, "WAN_INPUT_ROOTS")
                check_image(path, self.image)
            except InputError as exc:
                raise ValueError(f"image: {exc}") from None
            self.image = str(path)  # the file checked is the file read, whatever the working directory

    def _check_gpus(self, profile: GpuProfile) -> None:
        known = [g.index for g in profile.gpus]
        if self.gpu_ids is not None:
            if not self.gpu_ids:
                raise ValueError("gpu_ids: an empty list selects no GPU; leave it unset to use all GPUs")
            unknown = sorted(set(self.gpu_ids) - set(known))
            if unknown:
                raise ValueError(f"gpu_ids: {unknown} not on this host; detected GPUs: {known or 'none'}")
            self.gpu_ids = sorted(set(self.gpu_ids))
        selected = len(self.gpu_ids or known)
        if self.gpus_per_job is not None and known and self.gpus_per_job > selected:
            raise ValueError(f"gpus_per_job: {self.gpus_per_job} is more than the {selected} selected GPU(s)")
        # A run never holds a GPU it does not compute on: refused now rather than after waiting for the GPUs.
        needed = selected if self.strategy == "max_speed" else (self.gpus_per_job or 1)
        usable = self.job_world_sizes(profile)
        if known and self.strategy != "auto" and needed not in usable:
            field = "gpu_ids" if self.strategy == "max_speed" else "gpus_per_job"
            raise ValueError(f"{field}: {self.strategy} would hold {needed} GPUs, but one {self.spec.name} job "
                             f"computes on {', '.join(map(str, usable))} GPU(s) here (Ulysses divides the model's "
                             f"attention heads, CFG takes two halves); choose one of those counts")

    def job_world_sizes(self, profile: GpuProfile) -> list[int]:
        """The GPU counts one job of this request can compute on, up to the GPUs it may use: what `auto` takes the
        largest free of, and what max_speed and concurrent must ask for."""
        return job_world_sizes(self.spec, self.checkpoint, self.guide_scale, len(profile.select(self.gpu_ids).gpus))

    def _resolve_checkpoint(self, root: Path | None, roots: list[Path]) -> None:
        if self.task in TINY_PRESETS:
            if self.checkpoint not in (None, self.task):
                raise ValueError(f"checkpoint: {self.checkpoint!r} does not fit task {self.task!r}, "
                                 f"which is a preset; leave checkpoint unset")
            self.checkpoint = self.task
            return
        if self.checkpoint is None:
            if root is None:
                raise ValueError(f"checkpoint: unset and WAN_CHECKPOINT_ROOT is unset; give the folder of "
                                 f"{release_folder(self.task)} or set WAN_CHECKPOINT_ROOT")
            self.checkpoint = str(root / release_folder(self.task))
        try:
            folder = confine(self.checkpoint, roots, "WAN_CHECKPOINT_ROOT or WAN_INPUT_ROOTS")
        except InputError as exc:
            raise ValueError(f"checkpoint: {exc}") from None
        if not folder.is_dir():
            raise ValueError(f"checkpoint: folder {self.checkpoint!r} does not exist; give an official "
                             f"{release_folder(self.task)} folder (or use a preset task: {', '.join(TINY_PRESETS)})")
        try:
            found = validate_checkpoint(folder)
        except (OSError, ValueError) as exc:  # CheckpointError, a broken config.json, an unreadable file
            raise ValueError(f"checkpoint: {exc}") from None
        if found.name != self.task:
            raise ValueError(f"checkpoint: {self.checkpoint!r} holds a {found.name} model (its config.json), "
                             f"not {self.task}; give a {release_folder(self.task)} folder or task={found.name!r}")
        self.checkpoint = str(folder)


def describe_error(error: dict) -> tuple[str, str]:
    """(field, message) of one pydantic error of a request; the request's own checks name their field first."""
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = f"not a request field; the fields: {', '.join(GenerationRequest.model_fields)}"
    if error["loc"]:   # a nested field with its path: loras.0.strength
        return ".".join(str(part) for part in error["loc"]), message
    field, _, rest = message.partition(": ")
    return (field, rest) if field in GenerationRequest.model_fields else ("", message)


def problems(exc: ValidationError) -> list[str]:
    """One `field: message` line per problem of a rejected request."""
    lines = []
    for error in exc.errors():
        field, message = describe_error(error)
        lines.append(f"{field}: {message}" if field else message)
    return lines
