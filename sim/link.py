"""A KV-transfer link between replicas: fixed latency, then processor sharing.

A transfer of `size` bytes started at time s waits `latency_s` (setup and propagation; no
bandwidth used), then shares the link's bandwidth equally with every other transfer moving
at the same time (processor sharing, as concurrent flows over one link do): with n
transfers moving, each advances at bandwidth / n. One transfer alone takes
latency + size / bandwidth; k equal transfers started together all finish at
latency + k * size / bandwidth.

It is a SimPy process woken (interrupted) whenever a transfer joins; `on_done(transfer)`
runs at a transfer's completion time. `lower_bound(dest)` is the earliest time any transfer
now in flight to `dest` can complete: transfers that join later only slow the others
down, so a driver may advance `dest` up to it without missing an arrival.
"""

from __future__ import annotations

from typing import Callable

import simpy

INF = float("inf")


class Transfer:
    __slots__ = ("size", "dest", "payload", "start_s", "join_s", "remaining", "end_s")

    def __init__(self, size: float, dest: int, payload, start_s: float, join_s: float):
        self.size = float(size)
        self.dest = dest
        self.payload = payload
        self.start_s = start_s
        self.join_s = join_s  # when its bytes start moving (start + latency)
        self.remaining = float(size)
        self.end_s = INF


class PSLink:
    def __init__(self, env: simpy.Environment, bandwidth_bytes_s: float, latency_s: float,
                 on_done: Callable[[Transfer], None]):
        if bandwidth_bytes_s <= 0:
            raise ValueError("link bandwidth must be positive")
        self.env = env
        self.bw = float(bandwidth_bytes_s)
        self.latency = float(latency_s)
        self.on_done = on_done
        self.waiting: list[Transfer] = []  # in their latency, by join time (FIFO: same latency)
        self.moving: list[Transfer] = []  # sharing the bandwidth, in join order
        self._last = 0.0  # time `remaining` of the moving transfers was last brought up to date
        self.completed = 0
        self.bytes_moved = 0.0
        self.max_concurrent = 0
        self._proc = env.process(self._run())
        self._sleeping = False

    # ------------------------------------------------------------------ public
    def start(self, size: float, dest: int, payload) -> Transfer:
        now = self.env.now
        t = Transfer(size, dest, payload, now, now + self.latency)
        self.waiting.append(t)
        if self._sleeping:
            self._proc.interrupt()
        return t

    def in_flight(self) -> int:
        return len(self.waiting) + len(self.moving)

    def lower_bound(self, dest: int) -> float:
        """Earliest completion of any transfer in flight to `dest` (INF: none)."""
        now = self.env.now
        best = INF
        n = len(self.moving)
        for t in self.moving:
            if t.dest == dest:
                left = t.remaining - (now - self._last) * self.bw / n
                best = min(best, now + max(left, 0.0) / self.bw)
        for t in self.waiting:
            if t.dest == dest:
                best = min(best, t.join_s + t.size / self.bw)
        return best

    # ------------------------------------------------------------------ the process
    def _advance(self, now: float) -> None:
        n = len(self.moving)
        if n:
            d = (now - self._last) * self.bw / n
            for t in self.moving:
                t.remaining -= d
        self._last = now

    def _run(self):
        env = self.env
        while True:
            now = env.now
            self._advance(now)
            # joins due now (their latency is over)
            while self.waiting and self.waiting[0].join_s <= now:
                self.moving.append(self.waiting.pop(0))
            self.max_concurrent = max(self.max_concurrent, len(self.moving))
            # completions due now: a transfer is done when under a byte-scale epsilon
            n = len(self.moving)
            done = [t for t in self.moving
                    if t.remaining <= 1e-9 * max(t.size, 1.0) or now + t.remaining * n / self.bw <= now]
            if done:
                self.moving = [t for t in self.moving if t not in done]
                for t in done:
                    t.end_s = now
                    self.completed += 1
                    self.bytes_moved += t.size
                    self.on_done(t)
                continue
            nxt = INF
            if self.moving:
                n = len(self.moving)
                nxt = now + min(t.remaining for t in self.moving) * n / self.bw
            if self.waiting:
                nxt = min(nxt, self.waiting[0].join_s)
            self._sleeping = True
            try:
                if nxt == INF:
                    yield env.event()  # until a transfer starts
                else:
                    yield env.timeout(max(nxt - now, 0.0))
            except simpy.Interrupt:
                pass
            self._sleeping = False
