"""KV retention priorities (TensorRT-LLM's KvCacheRetentionConfig).

A retention spec gives token ranges a priority 0..100 (higher is kept longer) and an
optional duration after which the priority falls back to the default (35); blocks outside
every range get `decode_priority` if they hold generated tokens, else the default. A
block's priority is the highest of the ranges it overlaps.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PRIORITY = 35


@dataclass(frozen=True)
class TokenRange:
    start: int
    end: int | None  # None: to the end of the sequence
    priority: int
    duration_s: float | None = None


@dataclass(frozen=True)
class RetentionSpec:
    token_ranges: tuple[TokenRange, ...] = ()
    decode_priority: int = DEFAULT_PRIORITY

    def block_priority(self, block: int, tokens_per_block: int, prompt_len: int) -> tuple[int, float | None]:
        """(priority, duration_s or None) of block number `block`."""
        lo = block * tokens_per_block
        hi = lo + tokens_per_block
        best: tuple[int, float | None] | None = None
        for r in self.token_ranges:
            end = r.end if r.end is not None else 1 << 62
            if r.start < hi and lo < end and (best is None or r.priority > best[0]):
                best = (r.priority, r.duration_s)
        if best is not None:
            return best
        if lo >= prompt_len:
            return self.decode_priority, None
        return DEFAULT_PRIORITY, None


class RetentionPolicy:
    """Chooses each request's retention spec: a default, overridden per tenant."""

    def __init__(self, default: RetentionSpec | None = None,
                 tenants: dict[str, RetentionSpec] | None = None):
        self.default = default
        self.tenants = tenants or {}

    def for_request(self, tenant: str) -> RetentionSpec | None:
        return self.tenants.get(tenant, self.default)
