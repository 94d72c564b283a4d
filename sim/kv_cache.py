"""Paged KV block manager.

Blocks are counted exactly at every iteration but their *ids* are handed out lazily:
`used` is the number of blocks logically held by live requests (the engine updates it
in closed form over decode stretches), while `sync(request, kv_len)` materialises ids for
a request when someone needs them (the GPU executor every iteration, the invariant checks,
a release). Because `used` counts every logical block, the free list never runs dry
(`len(free_ids) >= total - used` always holds).
"""

from __future__ import annotations

from .types import Request


def blocks_for(tokens: int, tokens_per_block: int) -> int:
    """Number of blocks that hold `tokens` tokens."""
    return -(-tokens // tokens_per_block)


class BlockManager:
    def __init__(self, total_blocks: int, tokens_per_block: int):
        if total_blocks <= 0:
            raise ValueError("the KV pool needs at least one block")
        if tokens_per_block <= 0:
            raise ValueError("tokens_per_block must be positive")
        self.total = total_blocks
        self.tpb = tokens_per_block
        # Pop from the end: ids come out as 0, 1, 2, ... on a fresh pool (deterministic).
        self.free_ids: list[int] = list(range(total_blocks - 1, -1, -1))
        self.used = 0  # logical blocks held by live requests
        self.reserved = 0  # blocks promised by the capacity policy (GUARANTEED_NO_EVICT)
        self.host_used = 0  # host (offload) tier, S2

    # ---- accounting ------------------------------------------------------------
    @property
    def free(self) -> int:
        return self.total - self.used

    def grow(self, n: int) -> None:
        self.used += n
        if self.used > self.total:
            raise RuntimeError(f"KV pool over-committed: {self.used} > {self.total} blocks")

    def reserve(self, req: Request, n: int) -> None:
        req.reserved_blocks = n
        self.reserved += n

    def release(self, req: Request, logical_blocks: int) -> None:
        """Return all of a request's blocks (logical count and materialised ids)."""
        self.used -= logical_blocks
        self.reserved -= req.reserved_blocks
        req.reserved_blocks = 0
        if req.blocks:
            self.free_ids.extend(reversed(req.blocks))
            req.blocks = []

    # ---- ids ----------------------------------------------------------------------
    def sync(self, req: Request, kv_len: int) -> list[int]:
        """Materialise block ids so that `req` owns enough blocks for `kv_len` tokens."""
        need = blocks_for(kv_len, self.tpb)
        blocks = req.blocks
        while len(blocks) < need:
            blocks.append(self.free_ids.pop())
        return blocks

    def check(self, live: list[tuple[Request, int]]) -> None:
        """Assert the pool's invariants given every live request and its logical block count."""
        seen: set[int] = set()
        logical = 0
        for req, n in live:
            logical += n
            if len(req.blocks) > n:
                raise AssertionError(f"request {req.request_id} holds {len(req.blocks)} ids for {n} blocks")
            for b in req.blocks:
                if b in seen:
                    raise AssertionError(f"block {b} owned twice")
                seen.add(b)
        if logical != self.used:
            raise AssertionError(f"logical blocks {logical} != used counter {self.used}")
        if len(seen) + len(self.free_ids) != self.total:
            raise AssertionError(f"leak: {len(seen)} owned + {len(self.free_ids)} free != {self.total}")
        if seen.intersection(self.free_ids):
            raise AssertionError("a block is both owned and free")
        if self.used > self.total:
            raise AssertionError("over-committed")
