"""Prefix cache over KV blocks: reuse, prioritised-LRU eviction and a host offload tier.

Full blocks are keyed by a chain key (the key of the previous block and the block's
content, see traces/reuse_bound.py), so a dict of keys is a radix tree of blocks: a new
request reuses the longest run of its leading keys found here. A node can be

* on the GPU and referenced by running requests (`ref > 0`): never evicted;
* on the GPU and unreferenced: *cached*, evictable in order of (effective priority,
  last use) -- TensorRT-LLM's prioritised LRU;
* on the host (offload tier): evicted from the GPU at or above
  `offload_min_priority` and copied to host memory instead of dropped; reusable after
  being copied back (onboarded) into a fresh GPU block.

Priorities are 0..100 (default 35). A priority given with a duration falls back to the
default once the duration has passed since the block was last released (each release
restarts the clock and restores the priority).

When a node stores its tokens (`content`), a match compares them too, so a chain-key
collision can never hand a request the wrong KV.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field

DEFAULT_PRIORITY = 35


class CacheNode:
    __slots__ = ("key", "block_id", "ref", "priority", "base_priority", "expire_at", "duration",
                 "last_used", "on_host", "stamp", "content", "hits", "tenant", "index", "released",
                 "released_s")

    def __init__(self, key: int, block_id: int, priority: int, duration: float | None, content):
        self.key = key
        self.block_id = block_id
        self.ref = 1
        self.priority = priority  # effective priority (falls back when expired)
        self.base_priority = priority
        self.duration = duration
        self.expire_at = float("inf")
        self.last_used = 0.0
        self.on_host = False
        self.stamp = 0
        self.content = content
        self.hits = 0  # times a request reused it (an eviction policy's view)
        self.tenant = ""  # the tenant of the request that cached it
        self.index = -1  # its block's position in that prompt
        self.released = 0  # sequence number of its last release (eviction candidates' order)
        self.released_s = 0.0  # time of its last release (last_used may be touched since: a copy source)


@dataclass
class CacheStats:
    evictions_by_priority: dict[int, int] = field(default_factory=dict)
    dropped: int = 0  # GPU blocks evicted without offload
    offloaded: int = 0  # GPU -> host copies
    onboarded: int = 0  # host -> GPU copies
    host_dropped: int = 0  # evicted from the host tier
    inserted: int = 0
    hit_blocks: int = 0
    host_hit_blocks: int = 0


class PrefixCache:
    def __init__(self, kv, host_blocks: int = 0, offload_min_priority: int = DEFAULT_PRIORITY,
                 default_priority: int = DEFAULT_PRIORITY, eviction=None):
        self.kv = kv
        # a user's eviction policy (policies/eviction.py), asked with views of every
        # evictable block; None: the prioritised LRU computed by the heaps below
        self.eviction = eviction
        self._rel_seq = 0  # BlockManager: owns ids and the used/cached counters
        self.host_blocks = host_blocks
        self.offload_min_priority = offload_min_priority
        self.default_priority = default_priority
        self.nodes: dict[int, CacheNode] = {}
        # Unreferenced GPU nodes, in eviction order. The bulk (default priority) sits in an
        # LRU-ordered dict -- releases happen in time order, so insertion order is recency
        # order; nodes of any other priority (and default-priority nodes whose raised
        # priority expired, whose recency is older) sit in a heap. Eviction takes the
        # smaller (priority, last use) of the two fronts.
        self._lru: OrderedDict[int, CacheNode] = OrderedDict()
        self._gpu_heap: list = []  # (priority, last_used, seq, node)
        self._host_heap: list = []  # (last_used, seq, node) of host nodes
        self._expiry: list = []  # (expire_at, seq, node)
        self._seq = 0
        self.host_used = 0
        self.stats = CacheStats()

    # ------------------------------------------------------------------ lookup
    def match(self, keys, contents=None) -> list[CacheNode]:
        """Nodes for the longest run of leading keys present (GPU or host)."""
        out = []
        nodes = self.nodes
        for i, k in enumerate(keys):
            node = nodes.get(k)
            if node is None:
                break
            if contents is not None and node.content is not None and node.content != contents[i]:
                break  # a key collision: never reuse different tokens
            out.append(node)
        return out

    @staticmethod
    def new_refs(hits: list[CacheNode]) -> int:
        """GPU blocks that acquiring `hits` newly takes (unreferenced or on the host)."""
        return sum(1 for n in hits if n.ref == 0)

    def acquire(self, hits: list[CacheNode], now: float) -> None:
        """Reference `hits` for a request; host nodes are copied back to the GPU."""
        kv = self.kv
        onboard = []
        lru = self._lru
        for n in hits:
            n.hits += 1
            if n.ref == 0:
                n.ref = 1
                n.stamp = -1  # invalidates its heap entries
                lru.pop(n.key, None)
                if n.on_host:
                    onboard.append(n)
                else:
                    kv.cached -= 1
                    kv.used += 1
            else:
                n.ref += 1
        self.stats.hit_blocks += len(hits)
        for n in onboard:  # pinned above, so making room cannot evict them
            # off the host tier first: making room on the GPU may offload a block to the
            # host, and a full tier of blocks being onboarded has none to drop
            n.on_host = False
            self.host_used -= 1
            kv.grow(1)
            n.block_id = kv.free_ids.pop()
            self.stats.onboarded += 1
            self.stats.host_hit_blocks += 1
            kv.pending_onboard += 1

    def insert(self, key: int, block_id: int, priority: int, duration: float | None, content) -> CacheNode | None:
        """Cache a freshly computed full block held by a request (ref 1), at `priority`
        for `duration` seconds after each release (None: for good). None if the key is
        already cached (the request keeps its block private)."""
        if key in self.nodes:
            return None
        node = CacheNode(key, block_id, priority, duration, content)
        self.nodes[key] = node
        self.stats.inserted += 1
        return node

    def insert_many(self, keys, block_ids, start: int, stop: int, prios=None,
                    contents=None, tenant: str = "") -> tuple[list[CacheNode], list[int]]:
        """Cache blocks start..stop-1 of a request (ref 1 each); returns the new nodes and
        the block index of each. A key another request cached meanwhile is stepped over,
        as TensorRT-LLM's block reuse steps into the matched block: that block of the
        request stays private (a duplicate, freed with the request) and the blocks after it
        are inserted (their chain keys extend the matched one). `prios` lists (priority,
        duration) per block (None: default)."""
        nodes = self.nodes
        out = []
        idx = []
        dp = self.default_priority
        for i in range(start, stop):
            key = keys[i]
            if key in nodes:
                continue
            if prios is None:
                node = CacheNode(key, block_ids[i], dp, None, None if contents is None else contents[i])
            else:
                p, d = prios[i - start]
                node = CacheNode(key, block_ids[i], p, d, None if contents is None else contents[i])
            node.tenant = tenant
            node.index = i
            nodes[key] = node
            out.append(node)
            idx.append(i)
        self.stats.inserted += len(out)
        return out, idx

    def release(self, node: CacheNode, now: float) -> None:
        self.release_many((node,), now)

    def release_many(self, nodes, now: float) -> int:
        """Drop one reference of each node; returns how many became unreferenced."""
        freed = 0
        lru = self._lru
        default = self.default_priority
        for node in nodes:
            node.ref -= 1
            if node.ref:
                continue
            freed += 1
            node.last_used = now
            self._rel_seq += 1
            node.released = self._rel_seq
            node.released_s = now
            if node.duration is not None:
                node.priority = node.base_priority
                node.expire_at = now + node.duration
                self._seq += 1
                heapq.heappush(self._expiry, (node.expire_at, self._seq, node))
            if node.priority == default:
                lru[node.key] = node
            else:
                self._push_gpu(node)
        self.kv.used -= freed
        self.kv.cached += freed
        return freed

    # ------------------------------------------------------------------ eviction
    def _push_gpu(self, node: CacheNode) -> None:
        self._seq += 1
        node.stamp = self._seq
        heapq.heappush(self._gpu_heap, (node.priority, node.last_used, self._seq, node))

    def _expire(self, now: float) -> None:
        exp = self._expiry
        while exp and exp[0][0] <= now:
            t, _, node = heapq.heappop(exp)
            if t == node.expire_at and node.priority != self.default_priority:
                node.priority = self.default_priority
                if node.ref == 0 and not node.on_host and self.nodes.get(node.key) is node:
                    self._push_gpu(node)  # re-queue at its new priority (older than the LRU's)

    def evict(self, n: int, now: float) -> int:
        """Free `n` GPU blocks from unreferenced cached nodes; returns how many it freed."""
        self._expire(now)
        if self.eviction is not None:
            return self._evict_by_policy(n, now)
        heap = self._gpu_heap
        lru = self._lru
        default = self.default_priority
        freed = 0
        while freed < n:
            if not heap and lru:  # the common case: only default-priority blocks
                self._evict_node(lru.popitem(last=False)[1], default)
                freed += 1
                continue
            while heap:  # drop stale heap fronts
                _, _, seq, top = heap[0]
                if top.stamp == seq and top.ref == 0 and not top.on_host:
                    break
                heapq.heappop(heap)
            if lru:
                key = next(iter(lru))
                cand = lru[key]
                if heap and (heap[0][0], heap[0][1]) < (default, cand.last_used):
                    prio, _, _, node = heapq.heappop(heap)
                else:
                    del lru[key]
                    node, prio = cand, default
            elif heap:
                prio, _, _, node = heapq.heappop(heap)
            else:
                break
            self._evict_node(node, prio)
            freed += 1
        return freed

    def evictable(self) -> list[CacheNode]:
        """Every unreferenced GPU node, in the order they were released (oldest first)."""
        out = list(self._lru.values())
        out.extend(top for _, _, seq, top in self._gpu_heap
                   if top.stamp == seq and top.ref == 0 and not top.on_host)
        out.sort(key=lambda node: node.released)
        return out

    def _evict_by_policy(self, n: int, now: float) -> int:
        from servesim.policies.eviction import CachedBlockView
        from servesim.policies.loading import PolicyError

        cands = self.evictable()
        n = min(n, len(cands))
        if n <= 0:
            return 0
        views = [CachedBlockView(c.key, c.index, c.tenant, c.priority, c.released_s, c.hits) for c in cands]
        import operator

        picked = list(self.eviction.evict(views, n, now))
        name = self.eviction.name
        try:
            picked = [operator.index(i) for i in picked]
        except TypeError:
            pass  # reported below
        if (len(picked) != n or len(set(picked)) != n
                or not all(isinstance(i, int) and 0 <= i < len(cands) for i in picked)):
            raise PolicyError(f"kv_cache.eviction {name!r}: evict(<{len(cands)} candidates>, n={n}) returned "
                              f"{picked[:8]!r}{'...' if len(picked) > 8 else ''}: expected {n} distinct indices "
                              f"in [0, {len(cands)})")
        lru = self._lru
        for i in picked:
            node = cands[i]
            lru.pop(node.key, None)
            node.stamp = -1  # its heap entry, if any, is stale
            self._evict_node(node, node.priority)
        return n

    def _evict_node(self, node: CacheNode, prio: int) -> None:
        """Free an unreferenced node's GPU block: offload it to the host tier (priority at
        or above the threshold, a tier configured) or drop it."""
        by_prio = self.stats.evictions_by_priority
        by_prio[prio] = by_prio.get(prio, 0) + 1
        kv = self.kv
        kv.free_ids.append(node.block_id)
        node.block_id = -1
        kv.cached -= 1
        if self.host_blocks > 0 and prio >= self.offload_min_priority:
            self._offload(node)
        else:
            del self.nodes[node.key]
            node.stamp = -1
            self.stats.dropped += 1

    def _offload(self, node: CacheNode) -> None:
        if self.host_used >= self.host_blocks:
            self._drop_host()
        node.on_host = True
        self.host_used += 1
        self.stats.offloaded += 1
        self.kv.pending_offload += 1
        self._seq += 1
        node.stamp = self._seq
        heapq.heappush(self._host_heap, (node.last_used, self._seq, node))

    def _drop_host(self) -> None:
        heap = self._host_heap
        while heap:
            _, seq, node = heapq.heappop(heap)
            if node.stamp != seq or node.ref != 0 or not node.on_host:
                continue
            del self.nodes[node.key]
            node.stamp = -1
            self.host_used -= 1
            self.stats.host_dropped += 1
            return
        raise RuntimeError("host tier full of pinned blocks")

    # ------------------------------------------------------------------ checks
    def check(self) -> None:
        gpu_cached = 0
        host = 0
        for key, node in self.nodes.items():
            assert node.key == key
            assert node.ref >= 0, "negative reference count"
            if node.on_host:
                host += 1
                assert node.ref == 0, "a referenced block is on the host"
                assert key not in self._lru
            elif node.ref == 0:
                gpu_cached += 1
            else:
                assert key not in self._lru, "a referenced block is evictable"
        for key, node in self._lru.items():
            assert self.nodes.get(key) is node and node.priority == self.default_priority
        assert gpu_cached == self.kv.cached, f"cached counter {self.kv.cached} != {gpu_cached}"
        assert host == self.host_used <= max(self.host_blocks, 0)
