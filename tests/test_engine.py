"""Engine invariants (DESIGN.md) over random workloads and configs, driven by hypothesis."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from servesim.policies.graph_padding import token_capture_sizes
from servesim.sim.types import Phase

from engine_harness import run_engine


@st.composite
def workloads(draw, max_n=30):
    n = draw(st.integers(1, max_n))
    offline = draw(st.booleans())
    gaps = draw(st.lists(st.floats(0, 0.05), min_size=n, max_size=n))
    arr = np.zeros(n) if offline else np.cumsum(gaps)
    prompts = draw(st.lists(st.integers(1, 120), min_size=n, max_size=n))
    outs = draw(st.lists(st.integers(1, 80), min_size=n, max_size=n))
    return list(zip(arr, prompts, outs))


@st.composite
def configs(draw):
    max_batch = draw(st.integers(1, 12))
    tpb = draw(st.sampled_from([1, 2, 4, 16]))
    chunked = draw(st.booleans())
    return dict(
        capacity=draw(st.sampled_from(["guaranteed_no_evict", "max_utilization", "static_batch"])),
        max_batch=max_batch,
        max_tokens=draw(st.integers(max(max_batch, 16), 256)),
        tpb=tpb,
        blocks=draw(st.integers(4, 200)) * (16 // tpb),
        chunked=chunked,
        chunk_size=draw(st.sampled_from([None, tpb * 4, tpb * 8])) if chunked else None,
        graphs=draw(st.booleans()),
        overlap=draw(st.booleans()),
        piecewise=draw(st.sampled_from([None, 32, 100])),
    )


def _check_run(rows, cfg, reqs, engines, it, req, strict_times=True):
    # every request either finished with exactly output_len tokens or was rejected because
    # it can never fit; rejection only for those
    times = req.token_times
    off = req.token_offsets
    for i, r in enumerate(sorted(reqs, key=lambda r: r.request_id)):
        n_tok = off[i + 1] - off[i]
        if r.phase == Phase.FINISHED:
            assert n_tok == r.output_len
            t = times[off[i]:off[i + 1]]
            if strict_times:
                assert np.all(np.diff(t) > 0), "token times must strictly increase"
            else:  # speculative decoding: the tokens of one step share its end time
                assert np.all(np.diff(t) >= 0), "token times must not decrease"
            assert t[0] > r.arrival_s
        else:
            assert r.phase == Phase.REJECTED
            # KV at the last step (the overlap scheduler's discarded extra step writes one more)
            need = -(-(r.prompt_len + r.output_len - 1 + cfg.get("overlap", False)) // cfg["tpb"])
            too_long = (not cfg["chunked"]) and r.prompt_len > cfg["max_tokens"]
            assert need > cfg["blocks"] or too_long, "a request that fits was rejected"
    # per-iteration limits
    ctx_req = it.column("num_ctx_requests").to_numpy()
    gen_req = it.column("num_gen_requests").to_numpy()
    tok = it.column("ctx_tokens").to_numpy() + it.column("gen_tokens").to_numpy()  # drafts included
    assert np.all(ctx_req + gen_req <= cfg["max_batch"])
    assert np.all(tok <= cfg["max_tokens"])
    assert np.all(tok > 0)
    used = it.column("kv_blocks_used").to_numpy()
    assert np.all(used <= cfg["blocks"]) and np.all(used >= 0)
    # CUDA graphs: decode-only iterations padded to a captured batch; with piecewise graphs,
    # every iteration with context that fits the largest token size runs at a captured size
    graph = it.column("graph").to_numpy()
    pad = it.column("padded_tokens").to_numpy()
    assert np.all(pad >= 0) and not np.any(pad[~graph])
    with_ctx = ctx_req > 0
    pw = cfg.get("piecewise")
    if pw is None:
        assert not np.any(graph & with_ctx)
    else:
        sizes = set(token_capture_sizes(min(pw, cfg["max_tokens"])))
        assert np.array_equal(graph[with_ctx], tok[with_ctx] <= max(sizes))
        assert all(int(t + p) in sizes for t, p in zip(tok[with_ctx & graph], pad[with_ctx & graph]))
    start = it.column("start_s").to_numpy()
    dur = it.column("duration_s").to_numpy()
    assert np.all(dur > 0)
    assert np.all(start[1:] >= start[:-1] + dur[:-1] - 1e-9), "iterations overlap"
    if cfg.get("overlap") and len(engines) == 1:
        # the overlap scheduler decides iteration j when j-1 starts: a request that arrived
        # after j-1 started (j-1 running into j) enters j only if nothing else was running
        first_at: dict[float, int] = {}
        for r in reqs:
            if r.phase == Phase.FINISHED:
                first_at[r.first_scheduled_s] = first_at.get(r.first_scheduled_s, 0) + 1
        index = {float(s): j for j, s in enumerate(start)}
        for r in reqs:
            if r.phase != Phase.FINISHED:
                continue
            j = index[r.first_scheduled_s]
            if j > 0 and start[j] <= start[j - 1] + dur[j - 1] + 1e-9 and start[j - 1] < r.arrival_s:
                assert gen_req[j] == 0 and first_at[r.first_scheduled_s] == ctx_req[j], \
                    "a request entered the iteration decided before it arrived"
    if len(engines) == 1 and len(dur) and not any(r.preemptions for r in reqs):
        _check_no_starvation(reqs, req, float(dur.max()))
    for e in engines:  # nothing left behind, pool fully returned
        assert not e.has_work()
        assert e.kv.used == 0 and e.kv.reserved == 0
        assert len(e.kv.free_ids) + e.kv.cached == e.kv.total


def _check_no_starvation(reqs, req, longest_iteration: float) -> None:
    """Requests are served in order: none waits to be scheduled beyond the moment every
    request that arrived before it has finished (plus the iteration running then, and one
    more with the overlap scheduler). Overtaken forever, a request would wait longer."""
    finish = dict(zip(req.table.column("request_id").to_pylist(), req.table.column("finish_s").to_pylist()))
    done_before = -np.inf  # latest finish among the requests that arrived earlier
    for r in sorted(reqs, key=lambda r: (r.arrival_s, r.request_id)):
        if r.phase == Phase.FINISHED:
            bound = max(r.arrival_s, done_before) + 2 * longest_iteration + 1e-9
            assert r.first_scheduled_s <= bound, (
                f"request {r.request_id} waited until {r.first_scheduled_s:.4f}, every earlier request "
                f"was done by {done_before:.4f}: starved")
            done_before = max(done_before, finish[r.request_id])


def test_long_prompt_is_not_overtaken_forever():
    """S12: without chunking, a prompt longer than max_num_tokens minus the running decodes
    fits only when the decodes leave it the budget; later prompts must not overtake it
    forever (head-of-line blocking, TensorRT-LLM's MicroBatchScheduler)."""
    rows = [(0.002 * i, 60 if i == 5 else 8, 30) for i in range(400)]  # a steady stream, one long prompt
    reqs, engines, it, req = run_engine(rows, max_batch=16, max_tokens=64, tpb=4, blocks=4000, graphs=False)
    t = req.table.to_pandas().set_index("request_id")
    ttft = t.first_token_s - t.arrival_s
    e2e_median = float((t.finish_s - t.arrival_s).median())
    # it waits for the decodes ahead of it to drain (about one output length), not for the stream to end
    assert ttft[5] < 3 * e2e_median and t.first_token_s[5] < t.arrival_s.max()
    _check_no_starvation(reqs, req, float(it.column("duration_s").to_numpy().max()))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(), configs())
def test_invariants_random(rows, cfg):
    reqs, engines, it, req = run_engine(rows, **cfg)
    _check_run(rows, cfg, reqs, engines, it, req)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(max_n=20), configs())
def test_closed_form_stretches_equal_stepwise(rows, cfg):
    """Advancing decode stretches in closed form gives the same records as stepping."""
    a = run_engine(rows, **cfg)
    b = run_engine(rows, stepwise=True, **cfg)
    _check_run(rows, cfg, *b)
    ita, itb = a[2], b[2]
    assert ita.num_rows == itb.num_rows
    for col in ("num_ctx_requests", "num_gen_requests", "ctx_tokens", "gen_tokens",
                "padded_tokens", "kv_blocks_used", "graph", "decode_kv_tokens", "ctx_cached_tokens"):
        assert np.array_equal(ita.column(col).to_numpy(), itb.column(col).to_numpy()), col
    np.testing.assert_allclose(ita.column("duration_s").to_numpy(), itb.column("duration_s").to_numpy(),
                               rtol=1e-9)
    np.testing.assert_allclose(a[3].token_times, b[3].token_times, rtol=1e-9, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(workloads(max_n=25), st.sampled_from([0, 10, 1000]), st.booleans())
def test_max_utilization_under_pressure_finishes(rows, swap_blocks, stepwise):
    """A tiny pool forces pauses (recompute, or swap while host space lasts); every
    request still finishes (no livelock) with exactly its tokens."""
    cfg = dict(capacity="max_utilization", max_batch=8, max_tokens=256, tpb=4, blocks=60,
               chunked=False, chunk_size=None, graphs=False)
    reqs, engines, it, req = run_engine(rows, swap_blocks=swap_blocks, stepwise=stepwise, **cfg)
    _check_run(rows, cfg, reqs, engines, it, req)
    assert engines[0].swap_used == 0


def test_pressure_causes_preemption():
    rows = [(0.0, 40, 80)] * 8
    cfg = dict(capacity="max_utilization", max_batch=8, max_tokens=512, tpb=4, blocks=80,
               chunked=False, chunk_size=None, graphs=False)
    reqs, engines, it, req = run_engine(rows, **cfg)
    assert engines[0].num_preemptions > 0
    assert sum(r.preemptions for r in reqs) == engines[0].num_preemptions
    _check_run(rows, cfg, reqs, engines, it, req)


def test_swap_preemption_avoids_recompute():
    rows = [(0.0, 40, 80)] * 8
    cfg = dict(capacity="max_utilization", max_batch=8, max_tokens=512, tpb=4, blocks=80,
               chunked=False, chunk_size=None, graphs=False)
    _, e_re, it_re, _ = run_engine(rows, **cfg)
    reqs, e_sw, it_sw, req = run_engine(rows, swap_blocks=1000, **cfg)
    assert e_sw[0].num_swaps > 0 and e_sw[0].num_preemptions > 0
    # swapped requests resume generating: only the prompts are ever computed
    assert it_sw.column("ctx_tokens").to_numpy().sum() == 8 * 40
    assert it_re.column("ctx_tokens").to_numpy().sum() > 8 * 40
    _check_run(rows, cfg, reqs, e_sw, it_sw, req)


def test_guaranteed_no_evict_never_preempts():
    rows = [(0.0, 40, 80)] * 8
    cfg = dict(capacity="guaranteed_no_evict", max_batch=8, max_tokens=512, tpb=4, blocks=80,
               chunked=False, chunk_size=None, graphs=False)
    reqs, engines, it, req = run_engine(rows, **cfg)
    assert engines[0].num_preemptions == 0
    # only as many requests as fit in 80 blocks (30 blocks each) run together
    assert it.column("num_gen_requests").to_numpy().max() <= 2
    _check_run(rows, cfg, reqs, engines, it, req)


def test_static_batch_admits_nothing_while_busy():
    rows = [(0.0, 10, 5), (0.0, 10, 50), (0.001, 10, 5)]
    cfg = dict(capacity="static_batch", max_batch=2, max_tokens=64, tpb=4, blocks=100,
               chunked=False, chunk_size=None, graphs=False)
    reqs, engines, it, req = run_engine(rows, **cfg)
    by_id = {r.request_id: r for r in reqs}
    # request 2 arrives while the first batch runs; it starts only after request 1 finishes
    t = req.table.to_pydict()
    finish1 = t["finish_s"][1]
    assert t["first_scheduled_s"][2] >= finish1
    assert by_id[2].phase == Phase.FINISHED
    _check_run(rows, cfg, reqs, engines, it, req)


def test_inflight_batching_joins_running_batch():
    rows = [(0.0, 10, 5), (0.0, 10, 50), (0.001, 10, 5)]
    cfg = dict(capacity="guaranteed_no_evict", max_batch=2, max_tokens=64, tpb=4, blocks=100,
               chunked=False, chunk_size=None, graphs=False)
    reqs, engines, it, req = run_engine(rows, **cfg)
    t = req.table.to_pydict()
    assert t["first_scheduled_s"][2] < t["finish_s"][1]


def test_chunking_splits_long_prompt():
    rows = [(0.0, 100, 3)]
    cfg = dict(capacity="guaranteed_no_evict", max_batch=4, max_tokens=32, tpb=4, blocks=100,
               chunked=True, chunk_size=16, graphs=False)
    reqs, engines, it, req = run_engine(rows, **cfg)
    ctx = it.column("ctx_tokens").to_numpy()
    assert list(ctx[:7]) == [16, 16, 16, 16, 16, 16, 4]
    assert ctx.sum() == 100
    _check_run(rows, cfg, reqs, engines, it, req)


def test_reject_never_fits():
    rows = [(0.0, 500, 10), (0.0, 10, 10)]
    cfg = dict(capacity="guaranteed_no_evict", max_batch=4, max_tokens=1024, tpb=4, blocks=50,
               chunked=False, chunk_size=None, graphs=False)
    reqs, engines, it, req = run_engine(rows, **cfg)
    assert reqs[0].phase == Phase.REJECTED and reqs[1].phase == Phase.FINISHED
    _check_run(rows, cfg, reqs, engines, it, req)


@settings(max_examples=40, deadline=None)
@given(workloads(max_n=30), st.sampled_from(["round_robin", "least_loaded"]), st.integers(2, 3))
def test_replicas_share_the_work(rows, router, replicas):
    """Several replicas: every request is served by exactly one, each replica's pool and
    limits hold, and round robin alternates in arrival order."""
    from servesim.policies.routing import make_router
    from servesim.sim.driver import run_simulation
    from servesim.sim.records import iteration_arrays, iterations_table, request_arrays
    from servesim.sim.types import Request

    import engine_harness as h

    reqs = [Request(i, float(a), int(p), int(o)) for i, (a, p, o) in enumerate(rows)]
    cfg = h.EngineConfig(max_batch_size=4, max_num_tokens=256, tokens_per_block=4, num_blocks=200,
                         capacity=h.make_capacity_policy("guaranteed_no_evict"),
                         chunking=h.make_chunk_policy(False, None), graph_padding=None, check_invariants=True)
    engines = [h.Engine(cfg, h.SimExec(h.AffineCost()), replica=i) for i in range(replicas)]
    run_simulation(reqs, engines, make_router(router))
    its = [iteration_arrays(e) for e in engines]
    req = request_arrays(reqs, its)
    assert all(r.phase == Phase.FINISHED for r in reqs)
    assert sorted(r.request_id for e in engines for r in e.done) == list(range(len(reqs)))
    for r in reqs:
        assert r in engines[r.replica].done
    if router == "round_robin":
        order = sorted(reqs, key=lambda r: (r.arrival_s, r.request_id))
        assert [r.replica for r in order] == [i % replicas for i in range(len(order))]
    it = iterations_table(its)
    n = it.column("num_ctx_requests").to_numpy() + it.column("num_gen_requests").to_numpy()
    assert n.max() <= 4
    assert len(req.token_times) == sum(r.output_len for r in reqs)


def test_overlap_scheduler_decides_one_iteration_ahead():
    """With the overlap scheduler a request arriving while the engine is busy waits one
    iteration more: iteration n+1 was decided when n started. On an idle engine it starts
    at once, as without."""
    cfg = dict(capacity="guaranteed_no_evict", max_batch=4, max_tokens=64, tpb=4, blocks=100,
               chunked=False, chunk_size=None, graphs=False)
    rows = [(0.0, 8, 40), (0.0105, 8, 3)]  # the second arrives mid-decode of the first
    firsts = {}
    for overlap in (False, True):
        reqs, _, it, _ = run_engine(rows, overlap=overlap, **cfg)
        start = it.column("start_s").to_numpy()
        firsts[overlap] = [int(np.searchsorted(start, r.first_scheduled_s)) for r in reqs]
        assert reqs[0].first_scheduled_s == 0.0  # idle engine: no lag
    assert firsts[True][1] == firsts[False][1] + 1


def test_overlap_scheduler_runs_one_discarded_step():
    """With the overlap scheduler a request that emitted its last token still runs one more
    iteration (its token discarded) and frees its slot a step later."""
    rows = [(0.0, 20, 5), (0.0, 20, 1)]
    cfg = dict(capacity="guaranteed_no_evict", max_batch=4, max_tokens=64, tpb=4, blocks=100,
               chunked=False, chunk_size=None, graphs=False)
    _, _, it_plain, req_plain = run_engine(rows, **cfg)
    reqs, engines, it_ov, req_ov = run_engine(rows, overlap=True, **cfg)
    _check_run(rows, cfg, reqs, engines, it_ov, req_ov)
    assert it_ov.num_rows == it_plain.num_rows + 1
    assert it_ov.column("gen_tokens").to_numpy().sum() == it_plain.column("gen_tokens").to_numpy().sum() + 2
    assert len(req_ov.token_times) == len(req_plain.token_times) == 6
    # a static batch waits for the discarded step too before the next batch forms
    rows = [(0.0, 10, 3), (0.001, 10, 3)]
    cfg["capacity"] = "static_batch"
    cfg["max_batch"] = 1
    _, _, a, ra = run_engine(rows, **cfg)
    _, _, b, rb = run_engine(rows, overlap=True, **cfg)
    assert rb.table.column("first_scheduled_s")[1].as_py() > ra.table.column("first_scheduled_s")[1].as_py()


def test_requests_beyond_the_models_positions_are_rejected_and_counted():
    """S12: a request whose KV would outgrow max_position_embeddings is rejected, per
    request, with its reason; the others run."""
    from servesim.sim.metrics import summarize

    rows = [(0.0, 30, 10), (0.0, 60, 50), (0.0, 20, 5)]  # the second reaches 109 KV tokens
    reqs, engines, it, req = run_engine(rows, max_tokens=128, blocks=400, max_positions=100)
    by_id = {r.request_id: r for r in reqs}
    assert by_id[1].phase == Phase.REJECTED and by_id[1].reject_reason == "max_positions"
    assert by_id[0].phase == by_id[2].phase == Phase.FINISHED
    assert req.table.column("reject_reason").to_pylist() == ["", "max_positions", ""]
    s = summarize(req.table, it, kv_total_blocks=400, backend="sim", wall_s=0)
    assert s["num_rejected"] == 1 and s["rejected_by_reason"] == {"max_positions": 1}


def test_a_request_swapped_in_is_not_swapped_out_in_the_same_iteration():
    """Regression (hypothesis found it): several swap-ins in one admission pass each saw the
    decodes' block need from before the earlier ones, and the pause that followed sent the
    last one straight back to the host in the iteration that brought it in."""
    outs = [1, 1, 1, 9, 1, 1, 6, 1, 1, 1, 1, 1, 1, 2, 2]
    rows = [(0.0, 47, 30), (0.0, 47, 31), (0.0, 75, 23), (0.0, 25, 11)] + [(0.0, 1, o) for o in outs]
    cfg = dict(capacity="max_utilization", max_batch=8, max_tokens=256, tpb=4, blocks=60,
               chunked=False, chunk_size=None, graphs=False)
    reqs, engines, it, req = run_engine(rows, swap_blocks=1000, stepwise=True, **cfg)
    assert engines[0].num_swaps > 0
    _check_run(rows, cfg, reqs, engines, it, req)


def test_a_context_without_a_chunk_blocks_the_ones_behind_it():
    """Regression (hypothesis found it): with chunking, a 16-token prompt that gets no chunk
    (less than a block of budget left beside the decodes) was overtaken by a later 1-token
    prompt; now it is not, and nothing waits beyond the earlier requests' finish."""
    rows = [(0.0, 1, 1)] * 25 + [(0.0, 16, 1), (0.0, 1, 4)]
    for cap in ("guaranteed_no_evict", "max_utilization"):
        cfg = dict(capacity=cap, max_batch=3, max_tokens=16, tpb=16, blocks=4, chunked=True,
                   chunk_size=None, graphs=False)
        reqs, engines, it, req = run_engine(rows, **cfg)
        _check_run(rows, cfg, reqs, engines, it, req)
        first = {r.request_id: r.first_scheduled_s for r in reqs}
        assert first[25] <= first[26]
