"""Paged KV block manager.

Blocks are counted exactly at every iteration but their *ids* are handed out lazily:
`used` is the number of blocks logically held by live requests (the engine updates it
in closed form over decode stretches), while `sync(request, kv_len)` materialises ids for
a request when someone needs them (the GPU executor every iteration, the invariant checks,
a release). Because `used` counts every logical block, the free list never runs dry
(`len(free_ids) >= total - used` always holds).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .types import Request

if TYPE_CHECKING:
    from .prefix_cache import PrefixCache


def private_blocks(req: Request) -> list[int]:
    """The block ids of `req` that are not prefix-cache nodes (its own)."""
    nb = req.node_blocks
    if not nb or nb[-1] == len(nb) - 1:  # the nodes are its first blocks (the usual case)
        return req.blocks[len(nb):]
    shared = set(nb)
    return [b for i, b in enumerate(req.blocks) if i not in shared]


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
        self.used = 0  # logical blocks held by live requests (shared ones counted once)
        self.cached = 0  # unreferenced blocks kept by the prefix cache (evictable)
        self.reserved = 0  # blocks promised by the capacity policy (GUARANTEED_NO_EVICT)
        self.reserving = False  # whether the capacity policy keeps `reserved`
        self.cache: PrefixCache | None = None
        self.now = 0.0  # engine time, for retention durations
        self.pending_onboard = 0  # host->GPU block copies not yet priced
        self.pending_offload = 0  # GPU->host block copies not yet recorded
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst) block copies (partial reuse)

    # ---- accounting ------------------------------------------------------------
    @property
    def free(self) -> int:
        """Blocks neither used nor cached."""
        return self.total - self.used - self.cached

    @property
    def available(self) -> int:
        """Blocks a new allocation can get (free plus evictable cached ones)."""
        return self.total - self.used

    def grow(self, n: int) -> None:
        """Allocate `n` logical blocks, evicting cached ones if the free list is short."""
        short = n - self.free
        if short > 0 and self.cache is not None:
            self.cache.evict(short, self.now)
        self.used += n
        if self.used + self.cached > self.total:
            raise RuntimeError(f"KV pool over-committed: {self.used} used + {self.cached} cached "
                               f"> {self.total} blocks")

    def reserve(self, req: Request, n: int) -> None:
        req.reserved_blocks = n
        self.reserved += n

    def release(self, req: Request, logical_blocks: int) -> None:
        """Return all of a request's blocks: private ones to the free list, shared
        (cached) ones to the prefix cache."""
        nodes = req.nodes
        self.used -= logical_blocks - len(nodes)
        self.reserved -= req.reserved_blocks
        req.reserved_blocks = 0
        if nodes:
            freed = self.cache.release_many(nodes, self.now)
            if self.reserving:
                self.reserved -= freed  # the last holder stops reserving a shared block
            private = private_blocks(req)
            req.nodes = []
            req.node_blocks = []
        else:
            private = req.blocks
        if private:
            self.free_ids.extend(reversed(private))
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
        owner: dict[int, object] = {}
        logical = 0
        for req, n in live:
            nodes = req.nodes
            if len(req.blocks) > n:
                raise AssertionError(f"request {req.request_id} holds {len(req.blocks)} ids for {n} blocks")
            at = dict(zip(req.node_blocks, nodes))
            if len(at) != len(nodes):
                raise AssertionError(f"request {req.request_id}: cache nodes without a distinct block index")
            if any(i >= len(req.blocks) for i in at):
                raise AssertionError(f"request {req.request_id}: a cache node past its materialised blocks")
            for i, b in enumerate(req.blocks):
                node = at.get(i)
                if node is not None:
                    if node.block_id != b or node.on_host or node.ref <= 0:
                        raise AssertionError(f"request {req.request_id} block {i} is not its cached node")
                    if owner.get(b, node) is not node:
                        raise AssertionError(f"block {b} owned twice")
                    owner[b] = node
                else:
                    if b in owner:
                        raise AssertionError(f"block {b} owned twice")
                    owner[b] = req
            logical += n - len(nodes)
        shared = {id(n) for n in owner.values() if not isinstance(n, Request)}
        cached_ids = set()
        if self.cache is not None:
            for node in self.cache.nodes.values():
                if node.on_host:
                    continue
                if node.ref == 0:
                    if node.block_id in owner:
                        raise AssertionError(f"cached block {node.block_id} also owned")
                    cached_ids.add(node.block_id)
                elif id(node) not in shared:
                    # referenced but its holders have not materialised it: impossible, nodes
                    # always hold real ids
                    raise AssertionError(f"node {node.key} referenced by no live request")
            self.cache.check()
        logical += len(shared)
        if logical != self.used:
            raise AssertionError(f"logical blocks {logical} != used counter {self.used}")
        free = set(self.free_ids)
        if len(free) != len(self.free_ids):
            raise AssertionError("a block is on the free list twice")
        if len(owner) + len(cached_ids) + len(free) != self.total:
            raise AssertionError(f"leak: {len(owner)} owned + {len(cached_ids)} cached + {len(free)} free "
                                 f"!= {self.total}")
        if free & set(owner) or free & cached_ids:
            raise AssertionError("a block is both owned and free")
        if self.used + self.cached > self.total:
            raise AssertionError("over-committed")
