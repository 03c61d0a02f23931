"""The `detect-gpus` task: what GPUs this host has, read through NVML (nvidia-ml-py).

No NVML library, no driver or no GPU is a valid answer (an empty profile with the reason),
never a crash: the tiny preset then runs on the CPU. A simulated inventory can stand in for
NVML (tests, dry runs of the GPU allocation on a laptop); its GPUs have no CUDA device.
"""
from __future__ import annotations

import os
from typing import Literal

import pynvml
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from tasks.settings import SimulatedGpu

HIGH_VRAM_BYTES = 80 * 10**9  # "80 GB" cards report 80-86e9 bytes (H100: 81559 MiB)


class GpuInfo(BaseModel):
    """One GPU as NVML reports it."""

    index: int  # NVML (PCI bus) index: what the GPU's concurrency tag is named after
    device: str  # "cuda:k" in this process (CUDA_VISIBLE_DEVICES renumbers), "cpu" when simulated
    name: str
    uuid: str | None = None
    total_bytes: int
    free_bytes: int
    compute_capability: tuple[int, int]
    nvlink_links: int = 0  # active NVLink links

    @property
    def high_vram(self) -> bool:
        return self.total_bytes >= HIGH_VRAM_BYTES

    @property
    def blackwell(self) -> bool:
        return self.compute_capability[0] >= 12


class GpuLink(BaseModel):
    """Peer-to-peer reachability between two GPUs (by NVML index)."""

    a: int
    b: int
    p2p: bool
    nvlink: bool


class GpuProfile(BaseModel):
    """Every GPU this process may use, and how they are connected."""

    source: Literal["nvml", "inventory", "none"]
    gpus: list[GpuInfo] = []
    links: list[GpuLink] = []
    driver_version: str | None = None
    reason: str | None = None  # why `gpus` is empty

    @property
    def count(self) -> int:
        return len(self.gpus)

    @property
    def simulated(self) -> bool:
        return self.source == "inventory"

    @property
    def high_vram(self) -> bool:
        """Every GPU has at least 80 GB (the long-video duration ranges apply)."""
        return bool(self.gpus) and all(g.high_vram for g in self.gpus)

    @property
    def blackwell(self) -> bool:
        return any(g.blackwell for g in self.gpus)

    def select(self, indices: list[int] | None) -> GpuProfile:
        """The same profile restricted to the GPUs with these NVML indices (all when None)."""
        if indices is None:
            return self
        keep = set(indices)
        return self.model_copy(update={
            "gpus": [g for g in self.gpus if g.index in keep],
            "links": [link for link in self.links if link.a in keep and link.b in keep],
        })

    def summary(self) -> str:
        if not self.gpus:
            return f"no GPU ({self.reason}); the CPU runs the tiny presets"
        cards = ", ".join(
            f"{g.index}: {g.name} {g.total_bytes / 1e9:.0f} GB ({g.free_bytes / 1e9:.0f} GB free, "
            f"SM {g.compute_capability[0]}.{g.compute_capability[1]})"
            for g in self.gpus
        )
        return f"{self.count} GPU(s) from {self.source}: {cards}"


def read_gpu_profile(inventory: list[SimulatedGpu] | None = None) -> GpuProfile:
    """This host's GPUs: the simulated `inventory` when given, else NVML."""
    if inventory is not None:
        return _simulated_profile(inventory)
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return GpuProfile(source="none", reason=f"NVML unavailable: {exc}")
    try:
        return _nvml_profile()
    except pynvml.NVMLError as exc:
        return GpuProfile(source="none", reason=f"NVML query failed: {exc}")
    finally:
        pynvml.nvmlShutdown()


def _simulated_profile(inventory: list[SimulatedGpu]) -> GpuProfile:
    gpus = [
        GpuInfo(index=i, device="cpu", name=g.name, total_bytes=int(g.total_gb * 1e9),
                free_bytes=int(g.total_gb * 1e9), compute_capability=g.compute_capability)
        for i, g in enumerate(inventory)
    ]
    reason = None if gpus else "the simulated inventory is empty"
    return GpuProfile(source="inventory", gpus=gpus, reason=reason)


def _visible_indices(count: int, uuids: list[str]) -> list[int] | None:
    """NVML indices that CUDA_VISIBLE_DEVICES exposes, in CUDA order (None: all of them)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return None
    indices: list[int] = []
    for entry in filter(None, (e.strip() for e in visible.split(","))):
        if entry.isdigit() and int(entry) < count:
            indices.append(int(entry))
        elif matches := [i for i, u in enumerate(uuids) if u.startswith(entry)]:
            indices.append(matches[0])
        else:
            break  # CUDA stops at the first invalid entry too
    return indices


def _nvml_profile() -> GpuProfile:
    count = pynvml.nvmlDeviceGetCount()
    handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    uuids = [pynvml.nvmlDeviceGetUUID(h) for h in handles]
    order = _visible_indices(count, uuids)
    order = list(range(count)) if order is None else order
    gpus = []
    for cuda_index, i in enumerate(order):
        memory = pynvml.nvmlDeviceGetMemoryInfo(handles[i])
        gpus.append(GpuInfo(
            index=i, device=f"cuda:{cuda_index}", name=pynvml.nvmlDeviceGetName(handles[i]), uuid=uuids[i],
            total_bytes=memory.total, free_bytes=memory.free,
            compute_capability=pynvml.nvmlDeviceGetCudaComputeCapability(handles[i]),
            nvlink_links=_active_nvlinks(handles[i]),
        ))
    links = [
        GpuLink(a=a, b=b, p2p=_p2p_ok(handles[a], handles[b], pynvml.NVML_P2P_CAPS_INDEX_READ),
                nvlink=_p2p_ok(handles[a], handles[b], pynvml.NVML_P2P_CAPS_INDEX_NVLINK))
        for n, a in enumerate(order) for b in order[n + 1:]
    ]
    reason = None if gpus else ("CUDA_VISIBLE_DEVICES hides every GPU" if count else "NVML sees no GPU")
    return GpuProfile(source="nvml", gpus=gpus, links=links, reason=reason,
                      driver_version=pynvml.nvmlSystemGetDriverVersion())


def _active_nvlinks(handle) -> int:
    active = 0
    for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
        try:
            active += pynvml.nvmlDeviceGetNvLinkState(handle, link) == pynvml.NVML_FEATURE_ENABLED
        except pynvml.NVMLError:
            continue  # no such link (or no NVLink at all)
    return active


def _p2p_ok(a, b, capability: int) -> bool:
    try:
        return pynvml.nvmlDeviceGetP2PStatus(a, b, capability) == pynvml.NVML_P2P_STATUS_OK
    except pynvml.NVMLError:
        return False


@task(name="detect-gpus", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE)
def detect_gpus(inventory: list[SimulatedGpu] | None = None) -> GpuProfile:
    """Read this host's GPUs (or the simulated inventory) for allocation and the run record."""
    profile = read_gpu_profile(inventory)
    logger = get_run_logger()
    logger.info("%s", profile.summary())
    if profile.blackwell:
        logger.info("Blackwell GPU(s) present (SM >= 12)")
    for link in profile.links:
        if not link.p2p:
            logger.info("GPUs %d and %d have no peer-to-peer path: NCCL will go through the host", link.a, link.b)
    return profile
