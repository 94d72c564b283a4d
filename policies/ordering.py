"""Waiting-order policies: which waiting request the engine tries to admit next.

The engine keeps preempted requests first (they resume before anything new); among the
requests that have arrived, the policy sees read-only views and returns the index of the
next one to try. `fcfs` (the default) picks index 0, the engine's behaviour before this
family existed, so every output stays byte-identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence


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
        """Index into `waiting` (non-empty, in arrival order) of the next request to try."""
        ...


class Fcfs:
    name = "fcfs"

    def pick(self, waiting: Sequence[WaitingView]) -> int:
        return 0


class Priority:
    """Highest `priority` first; ties in arrival order."""

    name = "priority"

    def pick(self, waiting: Sequence[WaitingView]) -> int:
        return max(range(len(waiting)), key=lambda i: (waiting[i].priority, -i))


class ShortestPromptFirst:
    """Shortest prompt first; ties in arrival order."""

    name = "shortest_prompt_first"

    def pick(self, waiting: Sequence[WaitingView]) -> int:
        return min(range(len(waiting)), key=lambda i: (waiting[i].prompt_len, i))


ORDERS: dict[str, type] = {p.name: p for p in (Fcfs, Priority, ShortestPromptFirst)}


def make_order(name: str) -> WaitingOrder:
    return ORDERS[name]()
