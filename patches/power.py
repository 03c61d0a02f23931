"""What a GPU drew while some work ran: energy, mean power, SM clock and how often the power cap held it.

A long forward on an H100/H200 does not run at the clock a short benchmark sees: tensor-core work
draws the card to its power limit (700 W) and the driver lowers the SM clock until it fits, so a
sustained GEMM or attention kernel runs 10-20% under its burst rate. Timings are then read together
with energy: at the cap, seconds ~ joules / watts, and only less energy per forward makes it faster.

`PowerMeter` reads NVML (nvidia-ml-py) around a piece of work: the card's energy counter before and
after, and the SM clock and clock-event reasons sampled every few milliseconds on a thread. Where NVML,
a driver or a CUDA device is missing the reading is None: the bench prints dashes, nothing fails.
No Prefect here: benchmark scripts on machines without it use this module too.
"""
from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass

import torch

try:
    import pynvml
except ImportError:  # the project depends on nvidia-ml-py; a bare benchmark machine may lack it
    pynvml = None

SAMPLE_S = 0.01


@dataclass(frozen=True)
class PowerReading:
    joules: float        # energy the card used over the window
    seconds: float       # wall time of the window
    sm_mhz: float        # mean SM clock over the samples
    power_capped: float  # fraction of samples with the software power cap lowering the clock
    samples: int

    @property
    def watts(self) -> float:
        return self.joules / self.seconds if self.seconds > 0 else float("nan")


def _nvml_handle(device: torch.device):
    """The NVML handle of a torch CUDA device (matched by UUID: CUDA_VISIBLE_DEVICES renumbers)."""
    uuid = str(torch.cuda.get_device_properties(device).uuid)
    return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")


class PowerMeter:
    """Context manager: `with PowerMeter(device) as m: work(); sync()` then `m.reading` (None where
    unmeasurable). The caller synchronises the device before leaving the block."""

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else None
        self.reading: PowerReading | None = None
        self._handle = None
        self._stop = threading.Event()
        self._clocks: list[float] = []
        self._capped: list[bool] = []

    def __enter__(self) -> PowerMeter:
        device = self.device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        if pynvml is None or device.type != "cuda":
            return self
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError:
            return self
        try:
            self._handle = _nvml_handle(device)
            self._energy0 = pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)  # mJ
        except pynvml.NVMLError:
            self._handle = None
            pynvml.nvmlShutdown()
            return self
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        cap = pynvml.nvmlClocksEventReasonSwPowerCap
        while not self._stop.is_set():
            try:
                self._clocks.append(pynvml.nvmlDeviceGetClockInfo(self._handle, pynvml.NVML_CLOCK_SM))
                self._capped.append(bool(pynvml.nvmlDeviceGetCurrentClocksEventReasons(self._handle) & cap))
            except pynvml.NVMLError:
                return
            self._stop.wait(SAMPLE_S)

    def __exit__(self, *exc) -> None:
        if self._handle is None:
            return
        seconds = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        try:
            joules = (pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) - self._energy0) / 1e3
        except pynvml.NVMLError:
            return
        finally:
            pynvml.nvmlShutdown()
        n = len(self._clocks)
        self.reading = PowerReading(
            joules=joules, seconds=seconds, samples=n,
            sm_mhz=statistics.fmean(self._clocks) if n else float("nan"),
            power_capped=sum(self._capped) / n if n else float("nan"))
