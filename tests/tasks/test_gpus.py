"""detect-gpus: NVML answers (faked here), a simulated inventory, and no GPU at all."""
from __future__ import annotations

from types import SimpleNamespace

import pynvml
import pytest

from tasks.gpus import SimulatedGpu, detect_gpus, read_gpu_profile

GB = 10**9


@pytest.fixture
def two_nvml_gpus(monkeypatch):
    """NVML as it answers on a host with an 80 GB H100 and a 32 GB Blackwell card, P2P but no NVLink."""
    cards = [("NVIDIA H100 80GB HBM3", 85_520_809_984, (9, 0), "GPU-aaaa"),
             ("NVIDIA RTX PRO 6000", 34_190_917_632, (12, 0), "GPU-bbbb")]
    calls = {
        "nvmlInit": lambda: None,
        "nvmlShutdown": lambda: None,
        "nvmlDeviceGetCount": lambda: len(cards),
        "nvmlDeviceGetHandleByIndex": lambda i: i,
        "nvmlDeviceGetUUID": lambda h: cards[h][3],
        "nvmlDeviceGetName": lambda h: cards[h][0],
        "nvmlDeviceGetMemoryInfo": lambda h: SimpleNamespace(total=cards[h][1], free=cards[h][1] - GB),
        "nvmlDeviceGetCudaComputeCapability": lambda h: cards[h][2],
        "nvmlDeviceGetNvLinkState": _no_nvlink,
        "nvmlDeviceGetP2PStatus": _p2p_over_pcie,
        "nvmlSystemGetDriverVersion": lambda: "580.95",
    }
    for name, fake in calls.items():
        monkeypatch.setattr(pynvml, name, fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def _p2p_over_pcie(a, b, capability):
    read = capability == pynvml.NVML_P2P_CAPS_INDEX_READ
    return pynvml.NVML_P2P_STATUS_OK if read else pynvml.NVML_P2P_STATUS_NOT_SUPPORTED


def _no_nvlink(handle, link):
    raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)


def test_nvml_profile(two_nvml_gpus):
    profile = read_gpu_profile()
    assert profile.source == "nvml" and profile.count == 2 and profile.driver_version == "580.95"
    h100, blackwell = profile.gpus
    assert (h100.index, h100.device, h100.high_vram, h100.blackwell) == (0, "cuda:0", True, False)
    assert (blackwell.high_vram, blackwell.blackwell, blackwell.compute_capability) == (False, True, (12, 0))
    assert h100.free_bytes == h100.total_bytes - GB and h100.nvlink_links == 0
    assert not profile.high_vram and profile.blackwell  # not every card has 80 GB
    assert [(link.a, link.b, link.p2p, link.nvlink) for link in profile.links] == [(0, 1, True, False)]


def test_cuda_visible_devices_renumbers_devices_but_not_tags(two_nvml_gpus, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb")
    profile = read_gpu_profile()
    assert [(g.index, g.device) for g in profile.gpus] == [(1, "cuda:0")]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert read_gpu_profile().reason == "CUDA_VISIBLE_DEVICES hides every GPU"


def test_no_nvml_is_an_empty_profile_not_a_crash(monkeypatch):
    def missing():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", missing)
    profile = read_gpu_profile()
    assert profile.source == "none" and profile.gpus == [] and "NVML unavailable" in profile.reason
    assert "the CPU runs the tiny presets" in profile.summary()


def test_simulated_inventory():
    profile = read_gpu_profile([SimulatedGpu(total_gb=141), SimulatedGpu(total_gb=141)])
    assert profile.simulated and profile.count == 2 and profile.high_vram
    assert [g.device for g in profile.gpus] == ["cpu", "cpu"]
    assert [g.index for g in profile.select([1]).gpus] == [1]


def test_the_detect_gpus_body_reads_the_inventory_it_is_given(no_prefect_server):
    profile = detect_gpus.fn([SimulatedGpu(name="L40S", total_gb=48.0), SimulatedGpu()])
    assert profile.source == "inventory" and [g.name for g in profile.gpus] == ["L40S", "Simulated GPU"]
    assert [g.device for g in profile.gpus] == ["cpu", "cpu"]  # simulated GPUs have no CUDA device
