"""Reusable host buffers for the executor's per-step host<->device copies.

Every iteration copies its packed inputs to the device (one int64 and one int32 array)
and its sampled tokens back. Allocating a pinned buffer per copy (``tensor.pin_memory()``,
``torch.empty(..., pin_memory=True)``) goes through torch's caching host allocator every
time: measured at 0.07-0.17 ms of host time per 1B decode step on an H100 host
(benchmarks/results/host_probe.md), a third of the step's host part. `HostStaging` keeps a
ring of ``depth`` slots instead, each with its own buffers, allocated once (pinned on a
CUDA device) and grown by doubling when an iteration needs more.

Reuse is safe because a slot is written again only ``depth`` iterations later, and only
after the CUDA event recorded behind its last copies has completed (`Slot.event`): a
non-blocking host->device copy reads its host buffer when the GPU reaches it, so the
buffer must not change before then. The executor records that event after the
iteration's device->host copy of the sampled tokens, which is queued after everything the
iteration does, and reads those tokens (``Slot.out``) before the slot comes round again
(the overlap scheduler keeps one iteration in flight; ``depth`` is at least 2).

On a CPU device the buffers are ordinary memory and ``to(device)`` returns the buffer
itself: the step's tensors alias the slot, which is fine because a CPU step computes
synchronously and nothing keeps them past the step.
"""

from __future__ import annotations

import numpy as np
import torch


class Slot:
    """One step's host buffers: ``take(dtype, n)`` gives an ``n``-element host tensor and
    its numpy view (write the view, copy the tensor), valid until the slot's next use."""

    __slots__ = ("_bufs", "_pin", "event")

    def __init__(self, pin: bool):
        self._bufs: dict[torch.dtype, torch.Tensor] = {}
        self._pin = pin
        self.event = None  # CUDA event behind the slot's last copies (None: nothing in flight)

    def take(self, dtype: torch.dtype, n: int) -> tuple[torch.Tensor, np.ndarray]:
        if n < 0:
            raise ValueError(f"a staging buffer of {n} elements")
        buf = self._bufs.get(dtype)
        if buf is None or buf.numel() < n:
            size = max(n, 2 * (0 if buf is None else buf.numel()), 256)
            buf = self._bufs[dtype] = torch.empty(size, dtype=dtype, pin_memory=self._pin)
        t = buf[:n]
        return t, t.numpy()

    def capacity(self, dtype: torch.dtype) -> int:
        buf = self._bufs.get(dtype)
        return 0 if buf is None else buf.numel()


class HostStaging:
    """A ring of ``depth`` `Slot`s; `next()` gives the next one once its copies are done."""

    def __init__(self, device: torch.device, depth: int = 3):
        if depth < 2:
            raise ValueError(f"staging depth {depth}: needs at least 2 (one iteration may be in flight)")
        self.device = device
        pin = device.type == "cuda"
        self.slots = [Slot(pin) for _ in range(depth)]
        self._i = -1
        self.waits = 0  # times next() found its slot's copies still running

    def next(self) -> Slot:
        self._i = (self._i + 1) % len(self.slots)
        s = self.slots[self._i]
        ev = s.event
        if ev is not None:
            if not ev.query():
                self.waits += 1
                ev.synchronize()
            s.event = None
        return s

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        """The device copy of a slot's tensor (non-blocking from pinned memory on CUDA;
        the tensor itself on a CPU)."""
        return host.to(self.device, non_blocking=True)
