"""GPU energy and power from NVML, read through ctypes (no extra dependency).

`nvmlDeviceGetTotalEnergyConsumption` is a counter of the millijoules the GPU has drawn
since the driver loaded: the difference of two readings is the exact energy between them,
with none of the smoothing of a sampled power reading (`nvmlDeviceGetPowerUsage` is a
one-second average on Hopper). Reading it costs a few microseconds, so a run reads it at
its start and end only.

`Nvml.open(index)` returns None where there is no NVML (a CPU machine, a container
without the driver's library) or the GPU does not report energy.
"""

from __future__ import annotations

import ctypes
import time


class Nvml:
    def __init__(self, lib: ctypes.CDLL, handle: ctypes.c_void_p):
        self._lib = lib
        self._handle = handle

    @classmethod
    def open(cls, index: int = 0) -> "Nvml | None":
        for name in ("libnvidia-ml.so.1", "libnvidia-ml.so"):
            try:
                lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        else:
            return None
        try:
            if lib.nvmlInit_v2() != 0:
                return None
            handle = ctypes.c_void_p()
            if lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(index), ctypes.byref(handle)) != 0:
                return None
            self = cls(lib, handle)
            self.energy_j()
            return self
        except (AttributeError, OSError, RuntimeError):
            return None

    def energy_j(self) -> float:
        """Energy the GPU has drawn since the driver loaded, in joules."""
        mj = ctypes.c_ulonglong()
        rc = self._lib.nvmlDeviceGetTotalEnergyConsumption(self._handle, ctypes.byref(mj))
        if rc != 0:
            raise RuntimeError(f"nvmlDeviceGetTotalEnergyConsumption failed (NVML error {rc})")
        return mj.value / 1000.0

    def temperature_c(self) -> float | None:
        """The GPU die's temperature (None if NVML does not report it)."""
        t = ctypes.c_uint()
        try:
            rc = self._lib.nvmlDeviceGetTemperature(self._handle, ctypes.c_int(0), ctypes.byref(t))
        except (AttributeError, OSError):
            return None
        return float(t.value) if rc == 0 else None

    def tick(self, timeout_s: float = 0.5) -> tuple[float, float]:
        """(time, energy) just after the counter's next update. The driver updates it
        every few tens of milliseconds, so a run shorter than a second reads a different
        energy depending on where its ends fall between updates; a measurement that starts
        and ends on updates is exact up to the idle tail after the run."""
        e0 = self.energy_j()
        end = time.perf_counter() + timeout_s
        while True:
            e = self.energy_j()
            t = time.perf_counter()
            if e != e0 or t > end:
                return t, e
            time.sleep(0.0005)

    def idle_power_w(self, seconds: float = 3.0) -> float:
        """Mean power over `seconds` of doing nothing (call with the GPU idle)."""
        t0, e0 = self.tick()
        time.sleep(seconds)
        t1, e1 = self.tick()
        return (e1 - e0) / (t1 - t0)


_IDLE_W: dict[int, float] = {}


def run_energy(nvml: "Nvml", index: int, run) -> tuple[object, float]:
    """(run(), joules the GPU drew while it ran): counter readings aligned on updates,
    less the idle power (measured once per process, 1 s) over the wait for the last one."""
    if index not in _IDLE_W:
        _IDLE_W[index] = nvml.idle_power_w(1.0)
    _, e0 = nvml.tick()
    out = run()
    t_end = time.perf_counter()
    t1, e1 = nvml.tick()
    return out, max(e1 - e0 - _IDLE_W[index] * (t1 - t_end), 0.0)


def heat_up(device, seconds: float) -> None:
    """Keep the GPU busy with bf16 matmuls for ``seconds``: a serving GPU runs hot, and its
    power at the same work rises with its temperature (leakage), so power is calibrated on
    a warm GPU rather than on one that idled while the model was being built."""
    import torch

    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn_like(a)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(8):
            a @ b
        torch.cuda.synchronize(device)
    del a, b


def device_index(device) -> int:
    """NVML index of a torch CUDA device (the CUDA index; equal unless
    CUDA_VISIBLE_DEVICES reorders them, which then maps through the PCI bus id)."""
    import os

    idx = device.index if getattr(device, "index", None) is not None else 0
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis:
        parts = [p.strip() for p in vis.split(",") if p.strip()]
        if idx < len(parts) and parts[idx].isdigit():
            return int(parts[idx])
    return idx
