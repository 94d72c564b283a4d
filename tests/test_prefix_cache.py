"""Prefix reuse, prioritised eviction and the host tier in the engine (S2 invariants)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from servesim.policies.retention import RetentionSpec, TokenRange
from servesim.sim.kv_cache import BlockManager, blocks_for
from servesim.sim.prefix_cache import PrefixCache
from servesim.sim.types import Phase

from engine_harness import run_engine
from test_engine import _check_run


def chain_keys(tokens, tpb):
    """Chain keys of full blocks, collision-free by construction (nested tuples hashed by
    the cache as ints via an interning table)."""
    keys, prev = [], 0
    for j in range(len(tokens) // tpb):
        prev = hash((prev, tuple(tokens[j * tpb:(j + 1) * tpb])))
        keys.append(prev)
    return keys


@st.composite
def shared_prefix_workload(draw, tpb):
    n = draw(st.integers(2, 25))
    n_prefixes = draw(st.integers(1, 3))
    prefixes = [draw(st.lists(st.integers(0, 3), min_size=0, max_size=60)) for _ in range(n_prefixes)]
    rows, keys, contents = [], [], []
    t = 0.0
    for i in range(n):
        pre = prefixes[draw(st.integers(0, n_prefixes - 1))]
        suffix = draw(st.lists(st.integers(0, 3), min_size=1, max_size=30))
        toks = pre + suffix
        t += draw(st.floats(0, 0.05))
        rows.append((t, len(toks), draw(st.integers(1, 40))))
        keys.append(chain_keys(toks, tpb))
        contents.append([tuple(toks[j * tpb:(j + 1) * tpb]) for j in range(len(toks) // tpb)])
    return rows, keys, contents


def unlimited_pool(rows, tpb):
    """A pool nothing can exhaust: every block every request could ever hold, none of
    them shared (a request holds at most blocks_for(prompt + output) blocks, and a block
    allocated once is never allocated again while held or cached). Sized to the workload
    rather than 100k blocks, so the O(pool) invariant check after every step stays cheap."""
    return sum(blocks_for(p + o, tpb) for _, p, o in rows) + 1


def assert_never_short(reqs, it):
    """Nothing was evicted and nobody paused: the pool really was unlimited for this run."""
    assert not it.column("evictions").to_numpy().any(), "an unlimited pool evicted"
    assert all(r.preemptions == 0 for r in reqs), "an unlimited pool paused a request"


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.sampled_from(["guaranteed_no_evict", "max_utilization"]), st.sampled_from([2, 4]),
       st.integers(12, 80), st.sampled_from([0, 8]), st.booleans())
def test_reuse_invariants(data, capacity, tpb, blocks, host_blocks, chunked):
    rows, keys, contents = data.draw(shared_prefix_workload(tpb))
    cfg = dict(capacity=capacity, max_batch=6, max_tokens=128, tpb=tpb, blocks=blocks, chunked=chunked,
               chunk_size=None, graphs=False)
    reqs, engines, it, req = run_engine(rows, reuse=True, host_blocks=host_blocks, keys=keys,
                                        contents=contents, **cfg)
    # check_invariants ran after every step: refcounts >= 0, no block both cached and
    # owned, referenced nodes never evicted, reused blocks hold the request's tokens
    _check_run(rows, cfg, reqs, engines, it, req)
    e = engines[0]
    e.cache.check()
    assert all(n.ref == 0 for n in e.cache.nodes.values()), "a finished run holds references"
    # every request reuses at most its full prompt blocks, leaving one token to compute
    for r in reqs:
        if r.phase == Phase.FINISHED:
            assert r.cached_tokens <= r.prompt_len - 1
            # whole blocks, or all but the last token (partial reuse of the last block)
            assert r.cached_tokens % tpb == 0 or r.cached_tokens == r.prompt_len - 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_unlimited_pool_capacity_policies_agree(data):
    """With a pool nothing can exhaust, MAX_UTILIZATION and GUARANTEED_NO_EVICT give the
    same outputs (no pauses, the same admissions)."""
    rows, keys, contents = data.draw(shared_prefix_workload(4))
    outs = []
    for cap in ("guaranteed_no_evict", "max_utilization"):
        reqs, engines, it, req = run_engine(rows, capacity=cap, max_batch=6, max_tokens=128, tpb=4,
                                            blocks=unlimited_pool(rows, 4), reuse=True, keys=keys,
                                            contents=contents, graphs=False)
        assert_never_short(reqs, it)
        outs.append((req.token_times, it.column("ctx_tokens").to_numpy()))
    assert np.array_equal(outs[0][0], outs[1][0])
    assert np.array_equal(outs[0][1], outs[1][1])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.booleans())
def test_reuse_never_changes_outputs_only_work(data, chunked):
    """Reuse and chunking change how much prompt is computed, never output lengths; the
    prompt tokens computed plus those reused equal the prompts (no pauses here)."""
    rows, keys, contents = data.draw(shared_prefix_workload(4))
    for reuse in (False, True):
        reqs, engines, it, req = run_engine(rows, max_batch=6, max_tokens=128, tpb=4,
                                            blocks=unlimited_pool(rows, 4), reuse=reuse, keys=keys,
                                            contents=contents, chunked=chunked,
                                            chunk_size=8 if chunked else None, graphs=False)
        assert_never_short(reqs, it)
        computed = int(it.column("ctx_tokens").to_numpy().sum())
        reused = sum(r.cached_tokens for r in reqs)
        assert computed + reused == sum(p for _, p, _ in rows)
        assert all(r.phase == Phase.FINISHED for r in reqs)
        if not reuse:
            assert reused == 0


def test_second_request_reuses_prefix():
    toks = list(range(40))
    keys = [chain_keys(toks, 4), chain_keys(toks[:30] + [99] * 10, 4)]
    rows = [(0.0, 40, 2), (1.0, 40, 2)]
    reqs, engines, it, req = run_engine(rows, reuse=True, keys=keys, tpb=4, blocks=200, graphs=False)
    assert reqs[0].cached_tokens == 0
    assert reqs[1].cached_tokens == 28  # 7 full blocks match (block 7 holds tokens 28..31)
    ctx = it.column("ctx_tokens").to_numpy()
    assert ctx[ctx > 0].tolist() == [40, 12]


def test_partial_reuse_of_last_block():
    toks = list(range(16))
    rows = [(0.0, 16, 2), (1.0, 16, 2)]
    reqs, engines, it, req = run_engine(rows, reuse=True, keys=[chain_keys(toks, 4)] * 2, tpb=4,
                                        blocks=200, graphs=False)
    assert reqs[1].cached_tokens == 15  # 3 shared blocks + 3 tokens copied from the 4th
    ctx = it.column("ctx_tokens").to_numpy()
    assert ctx[ctx > 0].tolist() == [16, 1]


def test_collision_never_reuses_other_tokens():
    """Two prompts whose chain keys collide but whose tokens differ: no reuse."""
    keys = [[1, 2, 3], [1, 2, 3]]
    contents = [[(0,) * 4, (1,) * 4, (2,) * 4], [(0,) * 4, (7,) * 4, (2,) * 4]]
    rows = [(0.0, 13, 2), (1.0, 13, 2)]
    reqs, *_ = run_engine(rows, reuse=True, keys=keys, contents=contents, tpb=4, blocks=200, graphs=False)
    assert reqs[1].cached_tokens == 4  # only the first block really matches


def _cache_with(n_blocks, host=0, min_prio=35):
    kv = BlockManager(n_blocks, 4)
    cache = PrefixCache(kv, host_blocks=host, offload_min_priority=min_prio)
    kv.cache = cache
    return kv, cache


def test_eviction_order_priority_then_lru():
    kv, cache = _cache_with(8)
    prios = [35, 90, 35, 10, 90, 35]
    nodes = []
    for i, p in enumerate(prios):
        kv.used += 1
        node = cache.insert(100 + i, kv.free_ids.pop(), p, None, None)
        nodes.append(node)
    times = [5.0, 1.0, 3.0, 4.0, 2.0, 0.5]
    for t, node in sorted(zip(times, nodes), key=lambda x: x[0]):  # time runs forward
        cache.release(node, t)
    order = []
    for _ in range(len(nodes)):
        before = set(cache.nodes)
        cache.evict(1, 10.0)
        order.extend(before - set(cache.nodes))
    # priority 10 first, then 35 by last use (0.5, 3.0, 5.0), then 90 by last use (1.0, 2.0)
    assert order == [103, 105, 102, 100, 101, 104]


def test_priority_expires_to_default():
    kv, cache = _cache_with(4)
    kv.used += 2
    hi = cache.insert(1, kv.free_ids.pop(), 90, 4.0, None)  # 90 until 4 s after release (t=5)
    lo = cache.insert(2, kv.free_ids.pop(), 35, None, None)
    cache.release(hi, 1.0)
    cache.release(lo, 2.0)
    cache.evict(1, 3.0)
    assert 1 in cache.nodes and 2 not in cache.nodes  # before expiry the 90 survives
    kv.used += 1
    lo2 = cache.insert(3, kv.free_ids.pop(), 35, None, None)
    cache.release(lo2, 4.0)
    cache.evict(1, 6.0)  # now both are 35: the older (hi, used at 1.0) goes
    assert 1 not in cache.nodes and 3 in cache.nodes


def test_offload_and_onboard():
    kv, cache = _cache_with(4, host=2, min_prio=35)
    kv.used += 2
    a = cache.insert(1, kv.free_ids.pop(), 50, None, None)
    b = cache.insert(2, kv.free_ids.pop(), 20, None, None)
    cache.release(a, 1.0)
    cache.release(b, 2.0)
    cache.evict(2, 3.0)
    assert a.on_host and 1 in cache.nodes  # >= 35: offloaded
    assert 2 not in cache.nodes  # < 35: dropped
    assert cache.stats.offloaded == 1 and cache.stats.dropped == 1
    hits = cache.match([1, 2])
    assert hits == [a]
    cache.acquire(hits, 4.0)
    assert not a.on_host and a.ref == 1 and a.block_id >= 0
    assert cache.stats.onboarded == 1 and kv.pending_onboard == 1


def test_retention_keeps_system_prompt_hot():
    """A system prompt with priority 90 survives a flood of one-off requests that evict
    everything at priority 35; without retention it is evicted."""
    tpb = 4
    system = list(range(1000, 1016))  # 4 blocks
    rows, keys, ret = [], [], []
    spec = RetentionSpec((TokenRange(0, 16, 90),))
    t = 0.0
    for i in range(40):
        if i % 10 == 0:
            toks = system + [i] * 4
        else:
            toks = [5000 + i * 100 + j for j in range(24)]
        rows.append((t, len(toks), 2))
        keys.append(chain_keys(toks, tpb))
        ret.append(spec if i % 10 == 0 else None)  # only the system-prompt requests ask
        t += 1.0
    hit = {}
    for with_ret in (False, True):
        reqs, *_ = run_engine(rows, reuse=True, keys=keys, tpb=tpb, blocks=20, graphs=False,
                              retention=ret if with_ret else None)
        hit[with_ret] = sum(r.cached_tokens for r in reqs)
    assert hit[True] == 3 * 16 and hit[False] == 0


@settings(max_examples=80, deadline=None)
@given(st.lists(st.sampled_from([0, 10, 35, 35, 35, 60, 90, 100]), min_size=1, max_size=40), st.randoms())
def test_eviction_order_property(blocks, rnd):
    """Evicting one block at a time always takes the lowest priority, then the least
    recently released -- whatever mix of priorities and release order."""
    kv, cache = _cache_with(len(blocks) + 1)
    nodes = []
    for i, prio in enumerate(blocks):
        kv.used += 1
        nodes.append(cache.insert(1000 + i, kv.free_ids.pop(), prio, None, None))
    order = list(range(len(nodes)))
    rnd.shuffle(order)
    released = {}
    for t, i in enumerate(order):  # time runs forward
        cache.release(nodes[i], float(t))
        released[nodes[i].key] = (nodes[i].priority, float(t))
    evicted = []
    while cache.nodes:
        before = set(cache.nodes)
        assert cache.evict(1, 1e9) == 1
        (gone,) = before - set(cache.nodes)
        evicted.append(released[gone])
    assert evicted == sorted(evicted)
    cache.check()


def _consistent_pool():
    """A pool in a valid state: request 0 holds two cached blocks and a private one, a
    third cached block is unreferenced (evictable), one node is on the host tier."""
    from servesim.sim.types import Request

    kv, cache = _cache_with(12, host=2)

    def hold(rid, n_blocks, keys):  # a request holding n_blocks, the first len(keys) cached
        req = Request(rid, 0.0, 4 * n_blocks, 1)
        kv.used += n_blocks
        req.blocks = [kv.free_ids.pop() for _ in range(n_blocks)]
        req.nodes = [cache.insert(k, b, 35, None, None) for k, b in zip(keys, req.blocks)]
        req.node_blocks = list(range(len(keys)))
        return req

    req = hold(0, 3, [11, 12])
    gone = hold(1, 2, [21, 22])
    kv.release(gone, 2)  # both cached, unreferenced
    cache.evict(1, 1.0)  # the older one goes to the host tier (priority 35 >= 35)
    live = [(req, 3)]
    kv.check(live)
    assert cache.host_used == 1 and kv.cached == 1 and len(kv.free_ids) == 12 - 3 - 1
    return kv, cache, req, live


def _corruptions():
    def cached_block_also_free(kv, cache, req):
        n = next(n for n in cache.nodes.values() if n.ref == 0 and not n.on_host)
        kv.free_ids.append(n.block_id)

    def leaked_free_block(kv, cache, req):
        kv.free_ids.pop()

    def free_block_twice(kv, cache, req):
        kv.free_ids[1] = kv.free_ids[0]  # the count stays right; one id is listed twice

    def private_block_also_free(kv, cache, req):
        kv.free_ids.append(req.blocks[2])
        kv.free_ids.pop(0)

    def cached_counter_off(kv, cache, req):
        kv.cached += 1
        kv.used -= 1

    def used_counter_off(kv, cache, req):
        kv.used += 1

    def referenced_block_evictable(kv, cache, req):
        cache._lru[req.nodes[0].key] = req.nodes[0]

    def negative_reference(kv, cache, req):
        n = next(n for n in cache.nodes.values() if n.ref == 0 and not n.on_host)
        n.ref = -1

    def referenced_block_on_host(kv, cache, req):
        req.nodes[1].on_host = True

    def host_counter_off(kv, cache, req):
        cache.host_used += 1

    def node_under_another_key(kv, cache, req):
        cache.nodes[99] = cache.nodes.pop(req.nodes[0].key)

    def shared_block_owned_twice(kv, cache, req):
        req.blocks[2] = req.blocks[0]

    return [cached_block_also_free, leaked_free_block, free_block_twice, private_block_also_free,
            cached_counter_off, used_counter_off, referenced_block_evictable, negative_reference,
            referenced_block_on_host, host_counter_off, node_under_another_key, shared_block_owned_twice]


@pytest.mark.parametrize("corrupt", _corruptions(), ids=lambda f: f.__name__)
def test_invariant_checks_catch_a_corrupted_pool(corrupt):
    """The per-step check the properties above rely on (BlockManager.check, which runs
    PrefixCache.check) catches each kind of corruption, on a pool the size those
    properties now use (small: sized to the workload, not 100k blocks)."""
    kv, cache, req, live = _consistent_pool()
    corrupt(kv, cache, req)
    with pytest.raises(AssertionError):
        kv.check(live)
