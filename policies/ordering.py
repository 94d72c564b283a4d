"""Waiting-order policies: which waiting request the engine tries to admit next.

The engine keeps preempted requests first (they resume before anything new); among the
requests that have arrived, the policy sees read-only views (:class:`WaitingView`, in
arrival order) and returns the index of the next one to try. `fcfs` (the default) picks
index 0, the engine's behaviour before this family existed, so every output stays
byte-identical; the engine builds a view only when the policy reads it (`fcfs` reads none).

A request is *overtaken* when a request that arrived after it is picked before it. Any order
but FCFS overtakes; overtaken without bound, a request starves for as long as the load lasts
(README, "Scheduling order: nothing starves"). The built-in reorderings therefore carry an
aging bound, ``max_overtakes``: a request overtaken that many times goes next (the oldest
such first). ``sim check-policy`` holds every order policy to a bound on overtakes (16 by default:
a policy's own bound, 8 for the built-ins, leaves room for the overtakes chunked context
makes when a short prompt's chunk fits a budget a long one's does not).

Worked example (``scheduler.order: {class: my_policies:ShortestJobFirst, args:
{max_overtakes: 8}}``), shortest prompt + output first with the bound::

    class ShortestJobFirst:
        name = "sjf"

        def __init__(self, max_overtakes=8):
            self.max_overtakes = max_overtakes
            self.overtaken = {}  # request_id -> times a later arrival was picked before it

        def pick(self, waiting):
            aged = [i for i, w in enumerate(waiting) if self.overtaken.get(w.request_id, 0) >= self.max_overtakes]
            i = aged[0] if aged else min(range(len(waiting)),
                                         key=lambda i: (waiting[i].prompt_len + waiting[i].output_len, i))
            for w in waiting[:i]:  # the earlier arrivals it passes
                self.overtaken[w.request_id] = self.overtaken.get(w.request_id, 0) + 1
            # keep the counts of those still waiting (the one picked too: if the pool is
            # short it is not admitted, and is asked for again)
            self.overtaken = {w.request_id: self.overtaken[w.request_id] for w in waiting
                              if w.request_id in self.overtaken}
            return i
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence


@dataclass(frozen=True, slots=True)
class WaitingView:
    """What an order policy sees of one waiting request (a copy; changing it changes nothing)."""

    request_id: int
    arrival_s: float
    prompt_len: int
    output_len: int
    priority: int
    tenant: str
    preemptions: int


class WaitingOrder(Protocol):
    name: str

    def pick(self, waiting: Sequence[WaitingView]) -> int:
        """Index into `waiting` (at least two requests, in arrival order) of the next request
        to try. The engine may ask again before admitting it (the pool was short)."""
        ...


class Fcfs:
    """First come, first served: never overtakes."""

    name = "fcfs"

    def pick(self, waiting: Sequence[WaitingView]) -> int:
        return 0


class AgedOrder:
    """Picks by `key` (smallest first, ties in arrival order) unless a request has been
    overtaken `max_overtakes` times: then the oldest such request goes next."""

    name = "aged"

    def __init__(self, key: Callable[[WaitingView], object], max_overtakes: int = 8):
        if max_overtakes < 0:
            raise ValueError(f"max_overtakes must be >= 0, got {max_overtakes}")
        self.key = key
        self.max_overtakes = max_overtakes
        self.overtaken: dict[int, int] = {}

    def pick(self, waiting: Sequence[WaitingView]) -> int:
        over = self.overtaken
        bound = self.max_overtakes
        n = len(waiting)
        views = [waiting[j] for j in range(n)]
        i = next((j for j, w in enumerate(views) if over.get(w.request_id, 0) >= bound), None)
        if i is None:
            key = self.key
            i = min(range(n), key=lambda j: (key(views[j]), j))
        for w in views[:i]:
            over[w.request_id] = over.get(w.request_id, 0) + 1
        # forget the requests no longer waiting; the one picked keeps its count until it is
        # admitted (the pool may be short: it is asked for again, and must stay aged)
        self.overtaken = {w.request_id: over[w.request_id] for w in views if w.request_id in over}
        return i


class Priority(AgedOrder):
    """Highest `priority` first; ties in arrival order; aging bound `max_overtakes`."""

    name = "priority"

    def __init__(self, max_overtakes: int = 8):
        super().__init__(lambda w: -w.priority, max_overtakes)


class ShortestPromptFirst(AgedOrder):
    """Shortest prompt first; ties in arrival order; aging bound `max_overtakes`."""

    name = "shortest_prompt_first"

    def __init__(self, max_overtakes: int = 8):
        super().__init__(lambda w: w.prompt_len, max_overtakes)


ORDERS: dict[str, type] = {p.name: p for p in (Fcfs, Priority, ShortestPromptFirst)}


def make_order(name: str) -> WaitingOrder:
    return ORDERS[name]()
