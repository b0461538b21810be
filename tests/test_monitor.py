"""NvmlMonitor against a fake pynvml with known values, and the real no-NVML path of this machine."""

import logging
import sys
import time
import types

import pytest

from splitlab.system import monitor as monitor_mod
from splitlab.system.env import nvml_available
from splitlab.measure.metrics import Run
from splitlab.system.monitor import NvmlMonitor


class FakeNVMLError(Exception):
    pass


def fake_pynvml(fail_init=False, no_power=False):
    m = types.ModuleType("pynvml")
    m.NVML_CLOCK_SM, m.NVML_CLOCK_MEM = 1, 2
    m.calls = {"init": 0, "shutdown": 0, "util": 0}

    def init():
        m.calls["init"] += 1
        if fail_init:
            raise FakeNVMLError("NVML Shared Library Not Found")

    def util(h):
        m.calls["util"] += 1
        return types.SimpleNamespace(gpu=73, memory=41)

    def power(h):
        if no_power:
            raise FakeNVMLError("Not Supported")
        return 312500  # milliwatts

    m.nvmlInit = init
    m.nvmlShutdown = lambda: m.calls.__setitem__("shutdown", m.calls["shutdown"] + 1)
    m.nvmlDeviceGetHandleByIndex = lambda i: ("gpu", i)
    m.nvmlDeviceGetUtilizationRates = util
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=5 * 2**30, total=141 * 2**30)
    m.nvmlDeviceGetPowerUsage = power
    m.nvmlDeviceGetClockInfo = lambda h, kind: 1980 if kind == 1 else 2619
    return m


def make_run():
    return Run(mode="serial", model="tiny", workload="w", config={}, env={}, traces=[])


def test_samples_known_values_from_a_fake_nvml(monkeypatch):
    fake = fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    t0 = time.perf_counter()
    with NvmlMonitor(interval_s=0.01, device_index=0, t0=t0) as mon:
        time.sleep(0.12)
    assert mon.available is True and mon.reason is None
    samples = mon.samples
    assert 4 <= len(samples) <= 30  # ~12 intervals + one at start and one at stop
    for s in samples:
        assert s["sm_util_pct"] == 73 and s["mem_util_pct"] == 41
        assert s["mem_used_bytes"] == 5 * 2**30
        assert s["power_w"] == pytest.approx(312.5)
        assert s["sm_clock_mhz"] == 1980 and s["mem_clock_mhz"] == 2619
    times = [s["t_s"] for s in samples]
    assert times == sorted(times) and 0 <= times[0] < 0.05 and times[-1] >= 0.11
    gaps = [b - a for a, b in zip(times[1:-2], times[2:-1])]
    assert 0.008 <= sorted(gaps)[len(gaps) // 2] <= 0.03  # median spacing ~ the 10 ms interval (loaded CI)
    shifted = mon.samples_relative_to(t0 - 1.0)
    assert [s["t_s"] for s in shifted] == pytest.approx([t + 1.0 for t in times])
    assert fake.calls["init"] == 1 and fake.calls["shutdown"] == 1
    n = fake.calls["util"]
    time.sleep(0.05)
    assert fake.calls["util"] == n  # the thread has stopped
    run = mon.attach(make_run())
    assert run.monitor == samples
    run2 = mon.attach(make_run(), t0=t0 - 1.0)
    assert run2.monitor[0]["t_s"] == pytest.approx(times[0] + 1.0)


def test_unsupported_field_is_none(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(no_power=True))
    mon = NvmlMonitor(interval_s=0.01).start()
    mon.stop()
    assert len(mon.samples) >= 2
    assert all(s["power_w"] is None and s["sm_util_pct"] == 73 for s in mon.samples)


def test_failed_init_records_nothing_and_says_so_once(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(fail_init=True))
    monkeypatch.setattr(monitor_mod, "_said_unavailable", monitor_mod.threading.Event())
    caplog.set_level(logging.INFO, logger="splitlab.system.monitor")
    for _ in range(3):
        with NvmlMonitor(interval_s=0.01) as mon:
            time.sleep(0.02)
        assert mon.available is False and mon.samples == []
        assert "NVML could not start" in mon.reason
    said = [r for r in caplog.records if r.name == "splitlab.system.monitor"]
    assert len(said) == 1 and "no GPU monitoring" in said[0].getMessage()
    assert mon.attach(make_run()).monitor == []


def test_missing_package_records_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    mon = NvmlMonitor().start()
    mon.stop()
    assert mon.available is False and mon.samples == [] and "nvidia-ml-py" in mon.reason


@pytest.mark.skipif(nvml_available(), reason="this machine has NVML; the no-NVML path is for CPU machines")
def test_real_no_nvml_path_on_this_machine(recwarn):
    with NvmlMonitor(interval_s=0.01) as mon:
        time.sleep(0.03)
    assert mon.available is False and mon.samples == []
    assert mon.reason
    assert len(recwarn) == 0  # no warnings, no exception
