"""Routing policies: which replica gets an arriving request.

A router sees each replica through a read-only :class:`ReplicaView` (sim/cluster.py
implements it over an engine) and returns an index into the sequence it was given. The
driver hands it only the replicas that could ever hold the request (when some can and
some cannot), so no router can send a request where it will be rejected while another
replica would serve it; ``ReplicaView.index`` names the replica itself.

Built-ins: ``round_robin``, ``least_loaded`` (fewest requests), ``least_outstanding_tokens``
(least work left: prompt tokens not yet prefilled plus output tokens not yet generated),
and ``prefix_aware`` (the longest cached prefix of the request, among the replicas whose
outstanding tokens are within a load bound of the least loaded one). User routers are
loaded through ``cluster.router: module:Class`` against the same Protocol.
"""

from __future__ import annotations

from typing import Protocol, Sequence


class ReplicaView(Protocol):
    """Read-only: what a router may see of one replica."""

    index: int

    def load(self) -> int: ...  # requests waiting or running

    def outstanding_tokens(self) -> int: ...  # prompt tokens not yet prefilled + output tokens not yet generated

    def prefix_match_tokens(self, request) -> int: ...  # tokens of request's prompt already cached there

    def can_ever_fit(self, request) -> bool: ...  # its KV pool/limits could ever hold this request


class Router(Protocol):
    name: str

    def route(self, request, replicas: Sequence[ReplicaView]) -> int: ...


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def route(self, request, replicas: Sequence[ReplicaView]) -> int:
        r = self._next % len(replicas)
        self._next += 1
        return r


class LeastLoaded:
    """Fewest requests waiting or running; ties to the first."""

    name = "least_loaded"

    def route(self, request, replicas: Sequence[ReplicaView]) -> int:
        loads = [r.load() for r in replicas]
        return loads.index(min(loads))


class LeastOutstandingTokens:
    """Least work left (outstanding tokens); ties to fewer requests, then the first."""

    name = "least_outstanding_tokens"

    def route(self, request, replicas: Sequence[ReplicaView]) -> int:
        best = min(range(len(replicas)), key=lambda i: (replicas[i].outstanding_tokens(), replicas[i].load(), i))
        return best


class PrefixAware:
    """Send a request where the longest prefix of its prompt is cached, with a load bound.

    Let ``m`` be the least outstanding tokens of any replica. The eligible replicas are those
    whose outstanding tokens are at most ``m * load_factor + slack_tokens``; among them the
    one with the most prompt tokens already cached wins (ties: fewer outstanding tokens,
    then the first). When no eligible replica has any of the prompt cached, it is routed as
    ``least_outstanding_tokens`` would. ``load_factor: 1, slack_tokens: 0`` is
    least-outstanding-tokens routing with prefix hits as the tie-break; a large bound
    follows the cache regardless of load (and may flood one replica with a popular prefix).
    """

    name = "prefix_aware"

    def __init__(self, load_factor: float = 1.5, slack_tokens: int = 8192) -> None:
        if load_factor < 1:
            raise ValueError(f"load_factor must be at least 1, got {load_factor}")
        if slack_tokens < 0:
            raise ValueError(f"slack_tokens must be non-negative, got {slack_tokens}")
        self.load_factor = float(load_factor)
        self.slack_tokens = int(slack_tokens)

    def route(self, request, replicas: Sequence[ReplicaView]) -> int:
        out = [r.outstanding_tokens() for r in replicas]
        bound = min(out) * self.load_factor + self.slack_tokens
        best, key = 0, None
        for i, r in enumerate(replicas):
            if out[i] > bound:
                continue
            k = (r.prefix_match_tokens(request), -out[i], -i)
            if key is None or k > key:
                best, key = i, k
        if key[0] == 0:  # nothing cached anywhere eligible: the least work left
            return min(range(len(replicas)), key=lambda i: (out[i], replicas[i].load(), i))
        return best


ROUTERS = {p.name: p for p in (RoundRobin, LeastLoaded, LeastOutstandingTokens, PrefixAware)}


def make_router(name: str, **options) -> Router:
    """A built-in router; `options` are the constructor's (prefix_aware's load bound)."""
    cls = ROUTERS[name]
    return cls(**options) if options and cls is PrefixAware else cls()
