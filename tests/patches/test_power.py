"""patches.power: the energy, power and clock reading around a piece of GPU work."""
import pytest
import torch

from patches.power import PowerMeter, PowerReading


def test_no_reading_for_cpu_work():
    with PowerMeter("cpu") as meter:
        torch.ones(64, 64) @ torch.ones(64, 64)
    assert meter.reading is None


def test_watts_are_energy_over_time():
    reading = PowerReading(joules=1400.0, seconds=2.0, sm_mhz=1600.0, power_capped=0.5, samples=200)
    assert reading.watts == 700.0


@pytest.mark.gpu
def test_a_gpu_matmul_loop_draws_measurable_energy():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    with PowerMeter("cuda") as meter:
        for _ in range(200):   # about 0.3 s on an H100/H200
            a @ a
        torch.cuda.synchronize()
    r = meter.reading
    assert r is not None and r.samples > 5
    assert 50 < r.watts < 2000 and 300 < r.sm_mhz < 3500 and 0 <= r.power_capped <= 1
