"""Capacity (admission) policies, with TensorRT-LLM's semantics.

- GUARANTEED_NO_EVICT reserves KV blocks for the prompt plus the whole output at
  admission, so a running request never runs out of cache.
- MAX_UTILIZATION admits as long as the prompt's blocks are free; when generation
  runs out of blocks the engine pauses the newest request (recompute on resume).
- STATIC_BATCH forms a batch only while the engine is idle and lets nothing join until
  the batch's last request has finished; finished slots stay idle.

A policy decides; the engine carries out (the reservation, the pause). Policies see a
read-only view of the block manager's counts (:class:`PoolView`) and what the request
needs, never the executor, and change nothing.

Worked example (``scheduler.capacity: my_policies:HalfPool``): admit while the reserved
blocks stay under half the pool, reserving like GUARANTEED_NO_EVICT::

    class HalfPool:
        name = "half_pool"
        admit_while_busy = True
        pauses_on_shortage = False
        reserves = True

        def admits(self, kv, headroom, need):
            return kv.reserved + need.final_blocks + need.new_refs <= kv.total // 2
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from servesim.sim.kv_cache import BlockManager
from servesim.sim.types import Request


def final_kv_tokens(req: Request) -> int:
    """KV length when the request emits its last token (the last token is never written)."""
    return req.prompt_len + req.output_len - 1


@dataclass(frozen=True, slots=True)
class AdmitNeed:
    """What admitting one request takes from the KV pool, prefix-cache hits accounted."""

    ctx_blocks: int  # private blocks its context needs now
    final_blocks: int  # private blocks it holds when it emits its last token
    new_refs: int  # cached blocks it starts referencing (they stop being evictable)


class PoolView:
    """What a capacity policy sees of the KV pool: its counts, read-only (in blocks)."""

    __slots__ = ("_kv",)

    def __init__(self, kv: BlockManager):
        self._kv = kv

    @property
    def total(self) -> int:
        """Blocks in the pool."""
        return self._kv.total

    @property
    def used(self) -> int:
        """Blocks held by live requests (a shared prefix block counted once)."""
        return self._kv.used

    @property
    def cached(self) -> int:
        """Unreferenced blocks the prefix cache keeps (evictable)."""
        return self._kv.cached

    @property
    def reserved(self) -> int:
        """Blocks promised to admitted requests (policies with ``reserves``)."""
        return self._kv.reserved

    @property
    def free(self) -> int:
        """Blocks neither used nor cached."""
        return self._kv.free

    @property
    def available(self) -> int:
        """Blocks an allocation can get now (free plus evictable)."""
        return self._kv.available


class CapacityPolicy(Protocol):
    name: str
    admit_while_busy: bool  # False: only admit into an idle engine (static batching)
    pauses_on_shortage: bool  # True: the engine pauses the newest request when blocks run out

    # the engine reserves an admitted request's final blocks (and counts the cached blocks
    # it starts referencing) in kv.reserved (GUARANTEED_NO_EVICT-style accounting)
    reserves: bool

    def admits(self, kv: PoolView, headroom: int, need: AdmitNeed) -> bool:
        """Whether a request needing `need` can be admitted now. Reads the pool's counts,
        changes nothing.

        `headroom` is the number of blocks the running requests will take in the next
        iteration (a policy that does not reserve ahead must leave them free)."""
        ...


class GuaranteedNoEvict:
    name = "guaranteed_no_evict"
    admit_while_busy = True
    pauses_on_shortage = False

    reserves = True

    def admits(self, kv: BlockManager, headroom: int, need: AdmitNeed) -> bool:
        return kv.reserved + need.final_blocks + need.new_refs <= kv.total


class MaxUtilization:
    name = "max_utilization"
    admit_while_busy = True
    pauses_on_shortage = True

    reserves = False

    def admits(self, kv: BlockManager, headroom: int, need: AdmitNeed) -> bool:
        # The prompt's blocks must be available now (free or evictable), beyond what the
        # running requests take in the next iteration; generation grows into the rest.
        return need.ctx_blocks + need.new_refs + headroom <= kv.available


class StaticBatch(GuaranteedNoEvict):
    name = "static_batch"
    admit_while_busy = False
    pauses_on_shortage = False


CAPACITY_POLICIES: dict[str, type] = {
    p.name: p for p in (GuaranteedNoEvict, MaxUtilization, StaticBatch)
}


def make_capacity_policy(name: str) -> CapacityPolicy:
    return CAPACITY_POLICIES[name]()
