"""Shared helpers for engine tests: a small affine cost model and a runner."""

from __future__ import annotations


from servesim.policies.capacity import make_capacity_policy
from servesim.policies.chunking import make_chunk_policy
from servesim.policies.graph_padding import GraphPadding, capture_sizes, token_capture_sizes
from servesim.policies.routing import make_router
from servesim.sim.driver import run_simulation
from servesim.sim.engine import Engine, EngineConfig  # noqa: F401  (re-exported for tests)
from servesim.policies.speculative import make_draft_policy
from servesim.sim.executor import SimExecutor, SimSpeculation
from servesim.sim.speculation import AcceptanceModel, DrafterCost
from servesim.sim.kv_cache import private_blocks
from servesim.sim.records import iteration_arrays, iterations_table, request_arrays
from servesim.sim.types import IterationShape, Phase, Request


class AffineCost:
    """Cheap cost model honouring the CostModel contract (decode price affine in KV)."""

    def price(self, shape: IterationShape) -> float:
        ctx = sum(shape.ctx_new_tokens)
        prior = sum(shape.ctx_prior_tokens)
        fixed, per_kv = self.decode_affine(shape.n_decode, shape.graph, shape.padded_decode)
        launch = 1e-4 if shape.piecewise_tokens else 3e-4  # piecewise graphs: fewer launches
        kv = per_kv * shape.decode_kv_sum
        d, e = self.decode_split(shape.n_decode, shape.graph, shape.padded_decode)
        u = d * shape.decode_kv_max + e * shape.decode_kv_sum
        return fixed + (u if u > kv else kv) + 2e-5 * ctx + 1e-8 * prior * 1.0 + launch * bool(ctx)

    split = (0.0, 0.0)  # a split bound's line: seconds per token of the longest decode KV, of the KV sum

    def decode_affine(self, n: int, graph: bool, padded: int):
        b = padded if graph else n
        return (2e-3 if not graph else 1e-3) + 5e-5 * b, 3e-7

    def decode_split(self, n: int, graph: bool, padded: int):
        return self.split if n else (0.0, 0.0)


class StepwiseExecutor(SimExecutor):
    """Prices every iteration one by one (no closed-form stretches), asks for block ids,
    and checks every batch it is handed."""

    needs_block_ids = True

    def __init__(self, cost, max_batch: int, max_tokens: int, overlap: bool = False, tpb: int = 4,
                 num_blocks: int = 64):
        super().__init__(cost, overlap)
        self.max_batch = max_batch
        self.max_tokens = max_tokens
        self.tpb = tpb
        self.num_blocks = num_blocks
        self.swapped: set[int] = set()

    def plan_decode_stretch(self, n_decode, padded_decode):
        return None

    def execute(self, batch):
        ctx = [c.request for c in batch.context]
        gen = batch.generation
        assert all(r.phase == Phase.CONTEXT for r in ctx), "context chunk of a non-context request"
        assert all(r.phase == Phase.GENERATION for r in gen), "generation entry not generating"
        assert not set(map(id, ctx)) & set(map(id, gen)), "request both in context and generation"
        assert len(ctx) + len(gen) <= self.max_batch
        assert batch.shape.num_tokens <= self.max_tokens
        assert len(gen) == batch.shape.n_decode
        assert batch.shape.decode_kv_max == max((r.kv_len_at(batch.iteration) + 1 for r in gen), default=0), \
            "decode_kv_max is not the longest decode KV"
        pw = batch.shape.piecewise_tokens
        assert not pw or (ctx and pw >= batch.shape.num_tokens), "piecewise size below the iteration's tokens"
        tpb = self.tpb
        # block ids cover the KV each row writes, lie in the pool, and private blocks
        # (those past the shared prefix-cache nodes) belong to one request only
        owner: dict[int, int] = {}
        rows = [(c.request, c.prior_tokens + c.num_tokens) for c in batch.context]
        k = dict(batch.drafts)
        rows += [(r, r.kv_len_at(batch.iteration) + 1 + k.get(r.request_id, 0)) for r in gen]
        for r, kv_len in rows:
            assert len(r.blocks) >= -(-kv_len // tpb), (
                f"request {r.request_id} writes {kv_len} tokens with {len(r.blocks)} blocks")
            assert all(0 <= b < self.num_blocks for b in r.blocks), "block id outside the pool"
            for b in private_blocks(r):
                assert owner.setdefault(b, r.request_id) == r.request_id, f"block {b} owned twice"
        for rid, blocks in batch.swap_out:
            assert rid not in self.swapped and blocks, "swapped out twice, or with no blocks"
            self.swapped.add(rid)
        gen_ids = {r.request_id for r in gen}
        for rid in batch.swap_in:
            assert rid in self.swapped and rid in gen_ids, "swapped in without a swap-out, or not scheduled"
            self.swapped.discard(rid)
        if batch.drafts:
            assert [rid for rid, _ in batch.drafts] == [r.request_id for r in gen], "drafts not in batch order"
        return super().execute(batch)


SimExec = SimExecutor


def run_engine(rows, *, capacity="guaranteed_no_evict", max_batch=8, max_tokens=64, tpb=4,
               blocks=64, chunked=False, chunk_size=None, graphs=True, stepwise=False, replicas=1,
               check=True, reuse=False, host_blocks=0, offload_min_priority=35, keys=None,
               contents=None, retention=None, swap_blocks=0, overlap=False, piecewise=None, spec=None,
               max_positions=None, through_simpy=False, merge_stretches=True,
               fixed_plans=True, cost=None):
    """`spec`: (max_draft_len, alpha or per-position alphas, drafter seconds per draft step);
    `merge_stretches`: Engine.merge_stretches (decode stretches through finishes in one step);
    `fixed_plans` False: the engine asks the executor for every stretch's plan (none kept)."""
    reqs = [Request(i, float(a), int(p), int(o)) for i, (a, p, o) in enumerate(rows)]
    if keys is not None:
        for r, k in zip(reqs, keys):
            r.block_keys = tuple(k)
    if contents is not None:
        for r, c in zip(reqs, contents):
            r.block_contents = tuple(c)
    if retention is not None:
        for r, spec in zip(reqs, retention):
            r.retention = spec
    cost = cost or AffineCost()
    cfg = EngineConfig(
        max_batch_size=max_batch, max_num_tokens=max_tokens, tokens_per_block=tpb,
        num_blocks=blocks, capacity=make_capacity_policy(capacity),
        chunking=make_chunk_policy(chunked, chunk_size),
        graph_padding=GraphPadding(capture_sizes(max_batch)) if graphs else None,
        check_invariants=check, prefix_caching=reuse, host_blocks=host_blocks,
        offload_min_priority=offload_min_priority, kv_block_bytes=1 << 20, swap_blocks=swap_blocks,
        overlap=overlap,
        piecewise_padding=GraphPadding(token_capture_sizes(min(piecewise, max_tokens))) if piecewise else None,
        speculation=make_draft_policy("draft_model", spec[0]) if spec else None,
        max_positions=max_positions)
    engines = []
    for r in range(replicas):
        ex = StepwiseExecutor(cost, max_batch, max_tokens, overlap, tpb, blocks) if stepwise else SimExec(cost, overlap)
        if spec:
            alpha = spec[1] if isinstance(spec[1], (list, tuple)) else [spec[1]]
            ex.speculation = SimSpeculation(AcceptanceModel(list(alpha), seed=r),
                                            DrafterCost("ngram", host_s_per_request=spec[2]))
        if not fixed_plans:
            ex.fixed_stretch_plans = False
        e = Engine(cfg, ex, replica=r)
        e.merge_stretches = merge_stretches
        engines.append(e)
    run_simulation(reqs, engines, make_router("round_robin"), through_simpy=through_simpy)
    its = [iteration_arrays(e) for e in engines]
    req = request_arrays(reqs, its)
    return reqs, engines, iterations_table(its), req


def assert_same_tables(a, b) -> None:
    """Two `run_engine` results wrote the same iteration and request tables (schemas, every
    value, NaN equal to NaN) and the same token times."""
    import numpy as np

    for ta, tb in ((a[2], b[2]), (a[3].table, b[3].table)):
        assert ta.schema.equals(tb.schema, check_metadata=True)
        for name in ta.column_names:
            x, y = ta.column(name).to_pylist(), tb.column(name).to_pylist()
            assert len(x) == len(y) and all(u == v or (u != u and v != v) for u, v in zip(x, y)), name
    assert np.array_equal(a[3].token_times, b[3].token_times)
