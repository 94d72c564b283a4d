"""The wall clock: the GPU backend's driver.

Same arrivals and router as the simulator's driver (`servesim.sim.driver.Arrivals`), but
time is the real time since the loop started (``t0``, after the model is built and the
CUDA graphs are captured). Each turn: ``now = wall - t0``; requests with
``arrival_s <= now`` are delivered; if no replica has work, wait for the next arrival
(an ``offline`` workload has every request at 0, so it is all delivered at once);
otherwise each replica with work runs one engine step at ``now``. The engine's executor
has no cost model, so a step is one real iteration. Its recorded ``duration_s`` is the
wall time of the whole step -- admission and scheduling, the executor's input packing,
the GPU's work and the bookkeeping after it -- so iterations tile the timeline the way the
simulator's do (its iteration price includes the scheduler's host overhead), and the
next step starts where the last one's record ends.

Time comes from the executor: the engine records each iteration's duration as the
executor says (`iteration_duration`: the wall time since the step began), and with the
overlap scheduler, whose tokens reach the host only after the next iteration was launched,
the ends the executor learns later (`finish`), so iterations of an overlapped run overlap
in time in ``iterations.parquet`` (the next one starts while the previous one runs), which
is what overlap means. The driver never touches the records.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

from servesim.policies.routing import Router
from servesim.sim.driver import Arrivals
from servesim.sim.engine import INF, Engine
from servesim.sim.types import Request


def run_wallclock(requests: Sequence[Request], engines: Sequence[Engine], router: Router,
                  progress: Callable[[float, int], None] | None = None, progress_every: int = 64,
                  sleep: Callable[[float], None] = time.sleep,
                  clock: Callable[[], float] = time.perf_counter) -> float:
    """Run every request to completion in real time; returns the wall seconds elapsed.

    ``progress(now, finished)`` is called every ``progress_every`` steps (``now`` in seconds
    since the start, comparable with arrival times; ``finished``: requests finished or
    rejected so far)."""
    arrivals = Arrivals(requests, engines, router)
    t0 = clock()

    def now_s() -> float:
        return clock() - t0

    for e in engines:
        e.executor.start_clock(now_s)
    steps = 0
    while True:
        now = now_s()
        arrivals.deliver(now)
        busy = [(i, e) for i, e in enumerate(engines) if e.has_work()]
        if not busy:
            for e in engines:
                e.finish()
            if arrivals.exhausted():
                break
            wait = arrivals.next_time() - now_s()
            if wait > 0:
                sleep(wait)
            continue
        for i, e in busy:
            t = now_s()
            n_rows = len(e.rows)
            e.step(t, INF)
            steps += 1
            if progress is not None and steps % progress_every == 0:
                progress(t, sum(len(x.done) for x in engines))
            if len(e.rows) == n_rows and e.has_work() and not e.context and not e.n_dec:
                # nothing ran and nothing is running: admission failed on an idle replica
                raise RuntimeError(f"replica {i}: waiting requests can never be admitted")
    for e in engines:
        e.finish()
    if progress is not None:
        progress(now_s(), sum(len(x.done) for x in engines))
    return now_s()
