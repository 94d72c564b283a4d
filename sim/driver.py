"""The simulated clock: a SimPy environment with one engine process per replica. Virtual
time advances by what the executor says an iteration (or a closed-form decode stretch)
takes; an idle replica sleeps until the next arrival.

Arrivals are delivered to the replicas (through the router, in arrival order) by whichever
replica process looks first at a given time, so the outcome never depends on SimPy's
ordering of simultaneous events: same config and seed, same bytes.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Callable, Sequence

import numpy as np

from servesim.policies.routing import Router

from .cluster import Dispatch, ReplicaHandle
from .engine import INF, Engine
from .records import RequestSource
from .types import Request


class Arrivals:
    def __init__(self, requests: Sequence[Request], engines: Sequence[Engine], router: Router):
        self.requests = requests
        if isinstance(requests, RequestSource):  # made as they arrive (a streamed run)
            self.times = requests.arrival_times
        else:
            self.times = np.fromiter((r.arrival_s for r in requests), dtype=np.float64,
                                     count=len(requests))
        if len(self.times) > 1 and np.any(np.diff(self.times) < 0):
            raise ValueError("requests must be sorted by arrival time")
        # read one at a time as Python floats (the same doubles): indexing a NumPy array for
        # each arrival was most of delivering it
        self.times = self.times.tolist()
        self.engines = engines
        # routers see replicas through read-only views (policies/routing.py ReplicaView)
        self.dispatch = Dispatch([ReplicaHandle(e, i) for i, e in enumerate(engines)], engines, router)
        self.ptr = 0

    def next_time(self) -> float:
        return self.times[self.ptr] if self.ptr < len(self.times) else INF

    def exhausted(self) -> bool:
        return self.ptr >= len(self.times)

    def deliver(self, now: float) -> bool:
        """Route every request that has arrived by `now`; True if any was delivered."""
        ptr = self.ptr
        n = len(self.times)
        if ptr >= n or self.times[ptr] > now:
            return False
        choose = self.dispatch.choose
        while ptr < n and self.times[ptr] <= now:
            req = self.requests[ptr]
            choose(req).enqueue(req)
            ptr += 1
        self.ptr = ptr
        return True


@contextmanager
def collector_paused():
    """Python's cyclic garbage collector off for the length of a run, as it was after. A
    run allocates hundreds of thousands of objects that live to its end (requests,
    records) and makes almost no cyclic garbage (a few hundred objects in the whole Azure
    trace): the collector's passes over what is live were ~10% of such a run's CPU."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def run_simulation(requests: Sequence[Request], engines: Sequence[Engine], router: Router,
                   progress: Callable[[float, int], None] | None = None,
                   progress_every: int = 4096, through_simpy: bool = False) -> float:
    """Run to completion; returns the virtual time at which the last replica went idle.

    ``progress(now, finished)`` is called every ``progress_every`` steps of a replica:
    the virtual time and the number of requests finished (or rejected) by all replicas.

    Several replicas run as SimPy processes. One replica has no other process to
    interleave with, so its loop is driven directly: each delay it asks for advances the
    clock as a SimPy timeout would (``now + delay``, the same float), without an event a
    step; same bytes either way (`through_simpy`: a single replica as a SimPy process too;
    tests/test_driver_fast_path.py compares the two)."""
    arrivals = Arrivals(requests, engines, router)
    if len(engines) == 1 and not through_simpy:
        clock = [0.0]
        for delay in _replica_loop(0, engines[0], engines, arrivals, lambda: clock[0], progress, progress_every):
            clock[0] = clock[0] + delay
        engines[0].finish()
        return clock[0]
    import simpy  # (only here: a single replica's run never imports it)

    env = simpy.Environment()

    def engine_process(i: int, engine: Engine):
        for delay in _replica_loop(i, engine, engines, arrivals, lambda: env.now, progress, progress_every):
            yield env.timeout(delay)

    procs = [env.process(engine_process(i, e)) for i, e in enumerate(engines)]
    env.run(until=simpy.AllOf(env, procs))
    for e in engines:
        e.finish()
    return env.now


def _replica_loop(i: int, engine: Engine, engines: Sequence[Engine], arrivals: Arrivals,
                  clock: Callable[[], float], progress, progress_every: int):
    """One replica's life: yields each delay until its next look at the world (`clock()`
    is the time then), and returns when it is idle for good."""
    steps = 0
    while True:
        now = clock()
        arrivals.deliver(now)
        if not engine.has_work():
            if arrivals.exhausted():
                return
            # idle: sleep until the next arrival (which may be routed elsewhere; then
            # this replica simply sleeps again)
            yield arrivals.next_time() - now
            continue
        # Steps that end before the next arrival cannot interact with anything else
        # (replicas only meet through the router, at arrivals), so they run back to
        # back without a SimPy event each; time is handed to SimPy once they are done.
        horizon = arrivals.next_time()
        t = now
        while True:
            end = engine.step(t, horizon)
            steps += 1
            if progress is not None and steps % progress_every == 0:
                progress(end, sum(e.num_done() for e in engines))
            if end >= horizon or end == t or not engine.has_work():
                break
            t = end
        if end > now:
            yield end - now
        elif engine.has_work() and not engine.context and not engine.n_dec:
            raise RuntimeError(f"replica {i}: waiting requests can never be admitted")
