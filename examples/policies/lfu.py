"""Least-frequently-used eviction with a tenant's system prompt pinned (``kv_cache.eviction``).

When the KV pool is short, the prefix cache asks which of its evictable blocks to drop.
The built-in (prioritised LRU) drops the least recently used; under a skewed popularity
(a few templates reused often, many once), recency evicts a popular template that was
merely not used in the last second. LFU evicts the blocks reused least (``hits``), least
recently used among equals.

Pinning: the first ``pin_blocks`` blocks cached by requests of tenant ``pin_tenant`` (its
system prompt) are evicted only when nothing else is left -- the pool must still serve
every request, so a pin is a preference, never a leak.

    kv_cache:
      enable_block_reuse: true
      eviction: {class: lfu.py:LfuPinned, args: {pin_tenant: system, pin_blocks: 64}}
"""


class LfuPinned:
    name = "lfu_pinned"

    def __init__(self, pin_tenant: str | None = None, pin_blocks: int = 0):
        self.pin_tenant = pin_tenant
        self.pin_blocks = pin_blocks

    def evict(self, candidates, n: int, now: float):
        """`candidates`: read-only views of every evictable block (key, index, tenant,
        priority, last_used_s, hits), oldest release first; returns n distinct indices."""
        def pinned(c) -> bool:
            return self.pin_tenant is not None and c.tenant == self.pin_tenant and c.index < self.pin_blocks

        order = sorted(range(len(candidates)),
                       key=lambda i: (pinned(candidates[i]), candidates[i].hits, candidates[i].last_used_s))
        return order[:n]
