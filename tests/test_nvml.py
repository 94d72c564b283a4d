"""NVML energy reading: tick alignment and the idle-tail correction (a fake counter)."""

import time

import pytest

from servesim.gpu_backend import nvml as nv


class FakeCounter(nv.Nvml):
    """A counter updated every `period` seconds, drawing `busy_w` while `busy` else `idle_w`."""

    def __init__(self, period=0.02, idle_w=100.0, busy_w=500.0):
        self.period, self.idle_w, self.busy_w = period, idle_w, busy_w
        self.t0 = time.perf_counter()
        self.busy_until = -1.0
        self.busy_from = -1.0

    def _true(self, t):
        e = self.idle_w * (t - self.t0)
        a, b = max(self.busy_from, self.t0), min(self.busy_until, t)
        return e + (self.busy_w - self.idle_w) * max(b - a, 0.0)

    def energy_j(self):
        t = time.perf_counter()
        last = self.t0 + ((t - self.t0) // self.period) * self.period  # last update
        return self._true(last)


def test_run_energy_is_exact_up_to_the_counter_period():
    c = FakeCounter()
    nv._IDLE_W.pop(99, None)

    def work():
        c.busy_from = time.perf_counter()
        time.sleep(0.15)
        c.busy_until = time.perf_counter()
        return "done"

    out, e = nv.run_energy(c, 99, work)
    busy = c.busy_until - c.busy_from
    assert out == "done"
    # idle measured over 1 s within one period's error; the run's energy within a period's worth
    assert nv._IDLE_W[99] == pytest.approx(100.0, rel=0.05)
    assert e == pytest.approx(500.0 * busy, abs=500.0 * c.period * 1.5)


def test_open_without_nvml_returns_none(monkeypatch):
    import ctypes

    def no_lib(name):
        raise OSError(name)

    monkeypatch.setattr(ctypes, "CDLL", no_lib)
    assert nv.Nvml.open(0) is None


def test_temperature_reads_nvml_and_is_none_when_unreported():
    import ctypes

    class Lib:
        def __init__(self, rc):
            self.rc = rc

        def nvmlDeviceGetTemperature(self, handle, sensor, out):
            assert sensor.value == 0  # NVML_TEMPERATURE_GPU: the die
            ctypes.cast(out, ctypes.POINTER(ctypes.c_uint)).contents.value = 67
            return self.rc

    assert nv.Nvml(Lib(0), ctypes.c_void_p()).temperature_c() == 67.0
    assert nv.Nvml(Lib(3), ctypes.c_void_p()).temperature_c() is None  # NVML_ERROR_NOT_SUPPORTED
    assert nv.Nvml(object(), ctypes.c_void_p()).temperature_c() is None  # an old driver without it
