"""Routing policies: which replica gets an arriving request."""

from __future__ import annotations

from typing import Protocol, Sequence


class ReplicaLoad(Protocol):
    def load(self) -> int: ...


class Router(Protocol):
    name: str

    def route(self, request_id: int, replicas: Sequence[ReplicaLoad]) -> int: ...


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def route(self, request_id: int, replicas: Sequence[ReplicaLoad]) -> int:
        r = self._next % len(replicas)
        self._next += 1
        return r


class LeastLoaded:
    """Fewest requests waiting or running; ties to the lowest index."""

    name = "least_loaded"

    def route(self, request_id: int, replicas: Sequence[ReplicaLoad]) -> int:
        loads = [r.load() for r in replicas]
        return loads.index(min(loads))


ROUTERS = {p.name: p for p in (RoundRobin, LeastLoaded)}


def make_router(name: str) -> Router:
    return ROUTERS[name]()
