"""The executor's reused host staging buffers (gpu_backend/staging.py)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from servesim.gpu_backend.staging import HostStaging


class _Event:
    """Stands in for a CUDA event: ``done`` says whether its copies finished."""

    def __init__(self, done: bool):
        self.done = done
        self.synced = 0

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.synced += 1
        self.done = True


def test_ring_cycles_through_its_slots():
    s = HostStaging(torch.device("cpu"), depth=3)
    got = [s.next() for _ in range(7)]
    assert got[0] is got[3] is got[6]
    assert len({id(x) for x in got[:3]}) == 3


def test_depth_below_two_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        HostStaging(torch.device("cpu"), depth=1)


def test_a_slot_is_reused_only_after_its_copies_finished():
    s = HostStaging(torch.device("cpu"), depth=2)
    a = s.next()
    a.event = _Event(done=False)
    s.next()
    assert s.next() is a
    assert a.event is None and s.waits == 1
    b = s.next()
    b.event = ev = _Event(done=True)  # finished: no wait
    s.next()
    s.next()
    assert ev.synced == 0 and s.waits == 1


def test_buffers_are_reused_and_grow_by_doubling():
    slot = HostStaging(torch.device("cpu")).next()
    t, v = slot.take(torch.int64, 300)
    assert t.shape == (300,) and v.dtype == np.int64 and slot.capacity(torch.int64) == 300
    ptr = t.data_ptr()
    t2, _ = slot.take(torch.int64, 10)
    assert t2.data_ptr() == ptr  # the same memory, no allocation
    t3, _ = slot.take(torch.int64, 301)
    assert slot.capacity(torch.int64) == 600 and t3.shape == (301,)
    assert slot.capacity(torch.int32) == 0
    with pytest.raises(ValueError):
        slot.take(torch.int32, -1)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 2000)), min_size=1, max_size=12))
def test_slots_in_flight_never_share_memory(sizes):
    """Invariant: the buffers of the ``depth`` most recent steps are disjoint, so what one
    step wrote survives until its slot comes round again."""
    depth = 3
    s = HostStaging(torch.device("cpu"), depth=depth)
    steps = []  # per step: (tensor, expected content) of its buffers
    for k, (n64, n32) in enumerate(sizes):
        slot = s.next()
        mine = []
        for dt, n in ((torch.int64, n64), (torch.int32, n32)):
            t, v = slot.take(dt, n)
            v[:] = np.arange(n) + 1000 * k
            mine.append((t, np.arange(n) + 1000 * k))
        steps = (steps + [mine])[-depth:]
        for step in steps:
            for t, want in step:
                np.testing.assert_array_equal(t.numpy(), want)
