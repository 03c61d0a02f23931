"""wanflow settings: where checkpoints, inputs and outputs live, the request defaults and the GPU tags.

Read from `WAN_*` environment variables and a `.env` file in the working directory; Prefect's
own `PREFECT_*` settings are left to Prefect. Build them with `get_settings()` (cached, so
tests can clear it) rather than a module-level singleton.

This module imports no other project module, so that tasks/, flows/ and deployments/ all read
it without any package importing one above it; the types a setting needs (the GPU strategies,
the tiers, a simulated GPU) are defined here. That WAN_DEFAULT_TASK names a task is checked
where tasks are known (flows/request.py), the first time a request falls back to it.

The roots confine what a request may read (flows/inputs.py): input images, manifests and LoRA
files must lie inside one of `WAN_INPUT_ROOTS` (default: the working directory), checkpoint
folders inside `WAN_CHECKPOINT_ROOT` or one of the input roots, after symlinks and `..` are
resolved. Relative roots are taken from the working directory of the process that checks.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Strategy = Literal["auto", "max_speed", "concurrent"]  # how runs share the GPUs (tasks/gpu_queue.py)
Tier = Literal["quality", "balanced", "speed"]


class SimulatedGpu(BaseModel):
    """A GPU stated instead of detected (`WAN_GPU_INVENTORY`): allocation sees it, CUDA does not."""

    name: str = "Simulated GPU"
    total_gb: float = Field(24.0, gt=0)
    compute_capability: tuple[int, int] = (9, 0)


class Settings(BaseSettings):
    """Everything wanflow reads from its environment."""

    model_config = SettingsConfigDict(env_prefix="WAN_", env_file=".env", extra="ignore")

    checkpoint_root: Path | None = Field(
        None, description="Folder holding the official releases (Wan2.2-T2V-A14B/, Wan2.2-I2V-A14B/, ...); "
        "a request's checkpoint must lie inside it or inside one of the input roots."
    )
    input_roots: Annotated[list[Path], NoDecode] = Field(
        [Path(".")], min_length=1,
        description="Folders a request may read images, manifests and LoRA files from (and checkpoints, besides "
        f"WAN_CHECKPOINT_ROOT): a list separated by {os.pathsep!r} or a JSON list; default: the working directory.",
    )
    lora_dir: Path | None = Field(
        None, description="Folder of LoRA .safetensors files a request may name by file name alone (a LoRA may "
        "also be a path inside the input roots)."
    )
    lora_mode: Literal["merged", "unmerged"] = Field(
        "merged", description="How a resident engine applies a run's LoRAs: merged into the weights (fastest "
        "steps) or unmerged, beside the matmuls (fastest switch between runs with different LoRAs)."
    )
    outputs_dir: Path = Field(Path("outputs"), description="Published videos go to <outputs_dir>/<date>/.")
    cache_dir: Path = Field(
        Path.home() / ".cache" / "wanflow",
        description="Persistent caches: the tiny presets' checkpoints (wan_engine reads WAN_CACHE_DIR too), "
        "compiled kernels.",
    )
    default_task: str | None = Field(
        None, description="Task of a request that names none; unset: t2v-A14B on a GPU host that has it, else tiny."
    )
    default_tier: Tier = "quality"
    default_strategy: Strategy = "auto"
    gpu_tag_prefix: str = Field("gpu", pattern=r"^[a-z0-9][a-z0-9-]*$")
    node_name: str | None = Field(
        None,
        pattern=r"^[a-z0-9][a-z0-9-]*$",
        description="Set when several hosts share one Prefect server: tags become <prefix>-<node>-<i>.",
    )
    gpu_inventory: list[SimulatedGpu] | None = Field(
        None, description='JSON list of simulated GPUs, e.g. [{"total_gb": 24}, {"total_gb": 24}].'
    )
    gpu_poll_seconds: float = Field(2.0, gt=0, description="How often a run waiting for GPUs looks again.")
    gpu_lease_seconds: float = Field(
        60.0, ge=60, description="Lease on held GPU slots; a dead holder's slots free after this long."
    )
    resident_gpus: list[int] | None = Field(
        None, description="GPUs (NVML indices, a JSON list) on which `wanflow worker` keeps a resident engine "
        "process; unset: every detected GPU (none of a simulated inventory, whose GPUs then get CPU-backed "
        "engines only when listed here); [] for none.",
    )
    engine_tags: list[str] = Field(
        [], description="Set by `wanflow worker` for the runs it starts: the GPU tags served by a resident engine "
        "process (tasks/engine_channel.py). Runs on other GPUs compute in their own process.",
    )

    @field_validator("input_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part for part in text.split(os.pathsep) if part.strip()]
        return value

    @property
    def checkpoint_roots(self) -> list[Path]:
        """Where a request's checkpoint folder may lie: WAN_CHECKPOINT_ROOT, then the input roots."""
        return [*([self.checkpoint_root] if self.checkpoint_root else []), *self.input_roots]

    @property
    def gpu_tag_base(self) -> str:
        """GPU i of this host is guarded by the Prefect tag `<gpu_tag_base>-<i>`."""
        return f"{self.gpu_tag_prefix}-{self.node_name}" if self.node_name else self.gpu_tag_prefix


@lru_cache
def get_settings() -> Settings:
    return Settings()
