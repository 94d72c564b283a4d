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

With an overlap-scheduling executor (``executor.overlap``), an iteration's GPU work is
still running when its step returns; the executor records when each iteration's sampled
tokens reached the host (``executor.completed_s``), and the driver rewrites each recorded
iteration's ``duration_s`` so that ``start_s + duration_s`` is that time -- the emission
time of the iteration's tokens, as in the non-overlapped case. Iterations of an overlapped
run therefore overlap in time in ``iterations.parquet`` (the next one starts while the
previous one runs), which is what overlap means.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

from servesim.policies.routing import Router
from servesim.sim.driver import Arrivals
from servesim.sim.engine import INF, ROW_FIELDS, Engine
from servesim.sim.types import Request

_START = ROW_FIELDS.index("start_s")
_DURATION = ROW_FIELDS.index("duration_s")
_ITERATION = ROW_FIELDS.index("iteration")


def run_wallclock(requests: Sequence[Request], engines: Sequence[Engine], router: Router,
                  progress: Callable[[float], None] | None = None, progress_every: int = 64,
                  sleep: Callable[[float], None] = time.sleep,
                  clock: Callable[[], float] = time.perf_counter) -> float:
    """Run every request to completion in real time; returns the wall seconds elapsed.

    ``progress(now)`` is called every ``progress_every`` steps (``now`` in seconds since
    the start, comparable with arrival times)."""
    arrivals = Arrivals(requests, engines, router)
    t0 = clock()

    def now_s() -> float:
        return clock() - t0

    executors = [e.executor for e in engines]
    for ex in executors:
        if hasattr(ex, "clock"):
            ex.clock = now_s
    steps = 0
    while True:
        now = now_s()
        arrivals.deliver(now)
        busy = [(i, e) for i, e in enumerate(engines) if e.has_work()]
        if not busy:
            _flush(executors)
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
            if len(e.rows) == n_rows + 1 and not getattr(e.executor, "overlap", False):
                row = e.rows[-1]  # the step's one iteration: it lasted until the step returned
                e.rows[-1] = row[:_DURATION] + (now_s() - row[_START],) + row[_DURATION + 1:]
            steps += 1
            if progress is not None and steps % progress_every == 0:
                progress(t)
            if len(e.rows) == n_rows and e.has_work() and not e.context and not e.n_dec:
                # nothing ran and nothing is running: admission failed on an idle replica
                raise RuntimeError(f"replica {i}: waiting requests can never be admitted")
    _flush(executors)
    for e in engines:
        if getattr(e.executor, "overlap", False):
            _overlap_durations(e, e.executor.completed_s)
    if progress is not None:
        progress(now_s())
    return now_s()


def _flush(executors) -> None:
    for ex in executors:
        f = getattr(ex, "flush", None)
        if f is not None:
            f()


def _overlap_durations(engine: Engine, completed_s: dict[int, float]) -> None:
    """Set each iteration's duration so that it ends when its tokens reached the host."""
    rows = engine.rows
    for k, row in enumerate(rows):
        done = completed_s.get(row[_ITERATION])
        if done is None:
            continue
        r = list(row)
        r[_DURATION] = max(done - row[_START], 0.0)
        rows[k] = tuple(r)
