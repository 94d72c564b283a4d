"""Preemption victims: which running request a pausing capacity policy (max_utilization)
pauses when the next iteration's KV blocks run out.

The engine asks while the running requests need more blocks than the pool has, once per
pause; the policy sees a read-only view of every running request (:class:`RunningView`:
context requests in admission order, then generation requests) and returns the index of the
victim. The engine carries the pause out (recompute, or swap with
``scheduler.preemption: swap``). The default, `newest`, pauses the request admitted last
(TensorRT-LLM's and vLLM's choice), which is what the engine did before this family existed.

Worked example (``scheduler.preemption_victim: my_policies:MostBlocks``): free the most
blocks with one pause (the request holding the most KV)::

    class MostBlocks:
        name = "most_blocks"

        def victim(self, running):
            return max(range(len(running)), key=lambda i: (running[i].kv_blocks, running[i].admit_seq))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence


@dataclass(frozen=True, slots=True)
class RunningView:
    """What a victim policy sees of one running request (a copy)."""

    request_id: int
    arrival_s: float
    prompt_len: int
    output_len: int
    priority: int
    tenant: str
    phase: str  # "context" or "generation"
    generated: int  # tokens emitted so far
    kv_blocks: int  # KV blocks it holds (shared prefix blocks included)
    admit_seq: int  # admission order (larger: admitted later)
    preemptions: int  # times paused before


class PreemptionPolicy(Protocol):
    name: str

    def victim(self, running: Sequence[RunningView]) -> int:
        """Index into `running` (non-empty) of the request to pause."""
        ...


class Newest:
    """The request admitted last (it has done the least work to lose)."""

    name = "newest"

    def victim(self, running: Sequence[RunningView]) -> int:
        return max(range(len(running)), key=lambda i: running[i].admit_seq)


class LowestPriority:
    """The lowest `priority`; ties to the newest."""

    name = "lowest_priority"

    def victim(self, running: Sequence[RunningView]) -> int:
        return min(range(len(running)), key=lambda i: (running[i].priority, -running[i].admit_seq))


VICTIM_POLICIES: dict[str, type] = {p.name: p for p in (Newest, LowestPriority)}
