"""KV eviction: which cached (unreferenced) prefix blocks give up their GPU memory when an
allocation finds the free list short.

Applies with ``kv_cache.enable_block_reuse``. When the pool is short of `n` blocks, the
cache asks the policy once, showing a read-only view of every evictable block
(:class:`CachedBlockView`, in the order they became unreferenced, oldest first), and
evicts the blocks whose indices it returns (exactly ``n`` distinct ones; ``n`` is never more
than the candidates). An evicted block is dropped, or copied to the host tier
(``kv_cache.host_cache_size_gb``) when its priority is at least
``secondary_offload_min_priority``. Referenced blocks are never candidates.

Retention (``kv_cache.retention``) sets each block's `priority`; the default policy,
`prioritized_lru` (TensorRT-LLM's), evicts the lowest priority first, least recently used
among equals. Its :meth:`PrioritizedLru.evict` is the reference; the prefix cache computes
the same choice incrementally with heaps for this one class (a test holds the two equal),
so the default costs no view per block. Any other policy sees every evictable block each
time the pool is short: cheap up to some 10^4 cached blocks.

Worked example (``kv_cache.eviction: my_policies:LeastFrequentlyUsed``)::

    class LeastFrequentlyUsed:
        name = "lfu"

        def evict(self, candidates, n, now):
            order = sorted(range(len(candidates)), key=lambda i: (candidates[i].hits, candidates[i].last_used_s))
            return order[:n]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence


@dataclass(frozen=True, slots=True)
class CachedBlockView:
    """What an eviction policy sees of one evictable block (a copy)."""

    key: int  # its chain key (equal prefixes have equal keys)
    index: int  # its position in the prompt that cached it (0: the first block)
    tenant: str  # the tenant of the request that cached it
    priority: int  # retention priority 0..100 (default 35), after any expiry
    last_used_s: float  # when its last holder released it
    hits: int  # times a later request reused it


class EvictionPolicy(Protocol):
    name: str

    def evict(self, candidates: Sequence[CachedBlockView], n: int, now: float) -> Sequence[int]:
        """Indices into `candidates` of the `n` blocks to evict (distinct; 0 < n <= len)."""
        ...


class PrioritizedLru:
    """Lowest retention priority first, least recently released among equals."""

    name = "prioritized_lru"

    def evict(self, candidates: Sequence[CachedBlockView], n: int, now: float) -> Sequence[int]:
        return sorted(range(len(candidates)), key=lambda i: (candidates[i].priority, candidates[i].last_used_s))[:n]


EVICTION_POLICIES: dict[str, type] = {"prioritized_lru": PrioritizedLru}


def incremental(policy) -> bool:
    """Whether the prefix cache's own heaps compute this policy's choice (the default)."""
    return policy is None or type(policy) is PrioritizedLru
