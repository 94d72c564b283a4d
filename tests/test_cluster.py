"""S6 clusters: replica groups, routers (prefix-aware), disaggregated prefill/decode over a
processor-sharing KV link. Invariants are hypothesis properties; bad input exits 2
naming the key."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import simpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from servesim.policies.capacity import make_capacity_policy
from servesim.policies.chunking import make_chunk_policy
from servesim.policies.graph_padding import GraphPadding, capture_sizes
from servesim.policies.routing import ROUTERS, PrefixAware, make_router
from servesim.sim.cli import main
from servesim.sim.config import RunConfig
from servesim.sim.driver import run_simulation
from servesim.sim.engine import INF, Engine, EngineConfig
from servesim.sim.executor import SimExecutor
from servesim.sim.link import PSLink
from servesim.sim.runner import (engine_config, finish_run, make_cost_model, make_sim_speculation,
                                 prepare_requests, resolve, simulate)
from servesim.sim.types import Request

from engine_harness import AffineCost

PROPS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _cfg(n=24, rate=30.0, prompt=(16, 600), out=(1, 40), seed=0, **over) -> RunConfig:
    raw = {"seed": seed, "model": "llama-3.2-1b", "hardware": "h100-sxm",
           "workload": {"synthetic": {"num_requests": n, "arrival": {"kind": "poisson", "rate_req_s": rate},
                                      "prompt_len": {"kind": "uniform", "low": prompt[0], "high": prompt[1]},
                                      "output_len": {"kind": "uniform", "low": out[0], "high": out[1]}}},
           "scheduler": {"max_batch_size": 16, "max_num_tokens": 2048},
           "output": {"plots": False, "timeline": False}}
    for k, v in over.items():
        raw[k] = v
    return RunConfig.model_validate(raw)


def _bytes(table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, use_dictionary=False)
    return buf.getvalue()


def _reference_run(setup):
    """Today's single-replica run, through a verbatim copy of the driver loop before S6
    (the oracle for 'one replica, no disaggregation gives exactly today's records')."""
    requests = prepare_requests(setup)
    engine = Engine(engine_config(setup, True), SimExecutor(make_cost_model(setup), setup.cfg.runtime.overlap_scheduler,
                                                            make_sim_speculation(setup, 0)), replica=0)
    env = simpy.Environment()
    times = [r.arrival_s for r in requests]
    state = {"ptr": 0}

    def deliver(now):
        while state["ptr"] < len(times) and times[state["ptr"]] <= now:
            engine.enqueue(requests[state["ptr"]])
            state["ptr"] += 1

    def nxt():
        return times[state["ptr"]] if state["ptr"] < len(times) else INF

    def proc():
        while True:
            now = env.now
            deliver(now)
            if not engine.has_work():
                if state["ptr"] >= len(times):
                    return
                yield env.timeout(nxt() - now)
                continue
            horizon = nxt()
            t = now
            while True:
                end = engine.step(t, horizon)
                if end >= horizon or end == t or not engine.has_work():
                    break
                t = end
            if end > now:
                yield env.timeout(end - now)

    env.run(until=env.process(proc()))
    engine.finish()
    return finish_run(setup, requests, [engine], "sim", 0.0)


@PROPS
@given(seed=st.integers(0, 10_000), rate=st.sampled_from([5.0, 50.0, 500.0]),
       capacity=st.sampled_from(["guaranteed_no_evict", "max_utilization"]),
       chunked=st.booleans(), router=st.sampled_from(sorted(ROUTERS)),
       form=st.sampled_from(["default", "replicas1", "group1"]))
def test_one_replica_gives_todays_records(seed, rate, capacity, chunked, router, form):
    """One replica and no disaggregation (plain, `replicas: 1`, or one group of one, any
    router): the same request and iteration bytes as the pre-S6 driver."""
    cluster = {"default": {}, "replicas1": {"replicas": 1, "router": router},
               "group1": {"groups": [{"count": 1}], "router": router}}[form]
    cfg = _cfg(n=30, rate=rate, seed=seed, cluster=cluster,
               scheduler={"max_batch_size": 8, "max_num_tokens": 1024, "capacity": capacity,
                          "enable_chunked_context": chunked},
               kv_cache={"max_tokens": 6000, "enable_block_reuse": True})
    setup = resolve(cfg, Path("."))
    new = simulate(setup, check_invariants=True)
    old = _reference_run(resolve(_cfg(n=30, rate=rate, seed=seed, scheduler=cfg.scheduler.model_dump(),
                                      kv_cache={"max_tokens": 6000, "enable_block_reuse": True}), Path(".")))
    assert _bytes(new.requests) == _bytes(old.requests)
    assert _bytes(new.iterations) == _bytes(old.iterations)
    assert "per_replica" not in new.summary


# ---------------------------------------------------------------------------------------
DISAGG = st.fixed_dictionaries({
    "prefill": st.integers(1, 3), "decode": st.integers(1, 3), "bw": st.sampled_from([0.5, 5.0, 50.0]),
    "latency": st.sampled_from([0.0, 1e-3]), "rate": st.sampled_from([10.0, 200.0]),
    "seed": st.integers(0, 1000), "capacity": st.sampled_from(["guaranteed_no_evict", "max_utilization"]),
    "router": st.sampled_from(sorted(ROUTERS)), "decode_router": st.sampled_from(sorted(ROUTERS)),
})


def _disagg_cfg(d, n=30, **extra) -> RunConfig:
    return _cfg(n=n, rate=d["rate"], seed=d["seed"], kv_cache={"max_tokens": 20000, "enable_block_reuse": True},
                scheduler={"max_batch_size": 8, "max_num_tokens": 1024, "capacity": d["capacity"]},
                cluster={"router": d["router"], "disaggregation": {
                    "prefill": {"count": d["prefill"]},
                    "decode": {"count": d["decode"], "scheduler": {"max_batch_size": 16}},
                    "link": {"bandwidth_gb_s": d["bw"], "latency_s": d["latency"]},
                    "decode_router": d["decode_router"]}}, **extra)


@PROPS
@given(d=DISAGG)
def test_kv_reaches_the_decode_pool_before_its_first_decode_step(d):
    res = simulate(resolve(_disagg_cfg(d), Path(".")), check_invariants=True)
    req = res.requests.to_pandas()
    it = res.iterations.to_pandas()
    P = d["prefill"]
    assert set(it.loc[it.replica < P, "pool"]) <= {"prefill"} and set(it.loc[it.replica >= P, "pool"]) <= {"decode"}
    # prefill replicas run only context work (every prompt's first token), decode ones generate
    assert (it.loc[it.pool == "prefill", "num_gen_requests"] == 0).all()
    per_tok = 2 * 16 * 8 * 64 * 2  # llama-3.2-1b: layers x KV heads x head_dim x K,V x bf16 bytes
    assert (req.status == "finished").all()
    for r in req.itertuples():
        tt = np.asarray(r.token_times)
        assert len(tt) == r.output_len and np.all(np.diff(tt) > 0)
        assert r.first_token_s == tt[0]
        if r.output_len == 1:
            assert r.replica < P and r.prefill_replica == -1 and r.kv_transfer_s is None or np.isnan(r.kv_transfer_s)
            continue
        assert 0 <= r.prefill_replica < P <= r.replica
        blocks = -(-r.prompt_len // 32)
        assert r.kv_transfer_s >= d["latency"] + blocks * 32 * per_tok / (d["bw"] * 1e9) * (1 - 1e-9)
        arrived = r.first_token_s + r.kv_transfer_s  # (one rounding of the sum: compared within 1e-9 s)
        mine = it[it.replica == r.replica]
        ends = (mine.start_s + mine.duration_s).to_numpy()
        k = int(np.argmin(np.abs(ends - tt[1])))
        assert ends[k] == tt[1]
        starts = mine.start_s.to_numpy()
        assert starts[k] >= arrived - 1e-9  # its first decode step began after the KV was there
        if d["capacity"] == "guaranteed_no_evict":
            # ... and as soon as it was there: every iteration of its replica that began
            # after then and before its first step ran a full batch
            skipped = (starts > arrived + 1e-9) & (starts < starts[k])
            assert (mine.num_gen_requests.to_numpy()[skipped] == 16).all()
    rows = res.summary["per_replica"]
    assert [r["pool"] for r in rows] == ["prefill"] * P + ["decode"] * d["decode"]
    assert sum(r["requests"] for r in rows if r["pool"] == "prefill") == int((req.output_len > 1).sum())


@settings(max_examples=5, deadline=None)
@given(d=DISAGG, router=st.sampled_from(sorted(ROUTERS)))
def test_same_config_same_bytes_cluster(d, router):
    for make in (lambda: _disagg_cfg(d),
                 lambda: _cfg(n=40, rate=100.0, seed=d["seed"], kv_cache={"enable_block_reuse": True},
                              cluster={"router": router, "groups": [
                                  {"count": 2}, {"count": 1, "hardware": "h200-sxm",
                                                 "scheduler": {"max_batch_size": 4}}]})):
        a, b = (simulate(resolve(make(), Path("."))) for _ in range(2))
        assert _bytes(a.requests) == _bytes(b.requests) and _bytes(a.iterations) == _bytes(b.iterations)


class _CheckingRouter:
    """least_outstanding_tokens, checking each view's outstanding tokens against a count
    over every request of its engine."""

    name = "checking"

    def __init__(self):
        self.inner = make_router("least_outstanding_tokens")
        self.checks = 0

    def route(self, request, replicas):
        for h in replicas:
            e = h._engine
            want = sum(r.prompt_len + r.output_len - r.generated - (r.prompt_len if r.transfer_in else 0)
                       for r in e.waiting)
            want += sum(r.prompt_len - min(r.context_done, r.prompt_len) + r.output_len - r.generated
                        for r in e.context)
            want += sum(r.output_len - (r.generated + e.g - r.gen_base_iter) for r in e.decoding.values())
            assert h.outstanding_tokens() == max(want, 0)
            self.checks += 1
        return self.inner.route(request, replicas)


@PROPS
@given(seed=st.integers(0, 1000), capacity=st.sampled_from(["guaranteed_no_evict", "max_utilization"]),
       chunked=st.booleans(), disagg=st.booleans())
def test_outstanding_tokens_is_the_work_left(seed, capacity, chunked, disagg):
    from servesim.sim import cluster as cl

    router = _CheckingRouter()
    orig = cl.Dispatch.__init__

    def patched(self, handles, engines, r):  # every dispatcher of the run uses the checking router
        orig(self, handles, engines, router)

    cl.Dispatch.__init__ = patched
    try:
        # long prompts over a small token budget: chunks (mid-context requests at arrivals)
        # or rejections; a small pool: pauses under max_utilization
        sched = {"max_batch_size": 8, "max_num_tokens": 512, "capacity": capacity, "enable_chunked_context": chunked}
        kv = {"max_tokens": 12000}
        cluster = ({"disaggregation": {"prefill": {"count": 2}, "decode": {"count": 2}}} if disagg
                   else {"replicas": 3})
        simulate(resolve(_cfg(n=40, rate=200.0, prompt=(16, 2000), seed=seed, scheduler=sched, kv_cache=kv,
                              cluster=cluster),
                         Path(".")), check_invariants=True)
    finally:
        cl.Dispatch.__init__ = orig
    assert router.checks > 0


# ---------------------------------------------------------------------------------------
@PROPS
@given(router=st.sampled_from(sorted(ROUTERS)), small=st.integers(1, 3), big=st.integers(1, 2),
       seed=st.integers(0, 1000), order=st.booleans())
def test_never_routed_where_it_can_never_fit(router, small, big, seed, order):
    """Replicas with a small KV pool next to big ones: a request only the big ones can hold
    is never sent to a small one (where it would be rejected)."""
    groups = [{"count": small, "kv_cache": {"pool_tokens": 1024}}, {"count": big}]
    cfg = _cfg(n=40, rate=50.0, prompt=(16, 2000), out=(1, 64), seed=seed, kv_cache={"enable_block_reuse": True},
               cluster={"router": router, "groups": groups if order else groups[::-1]})
    res = simulate(resolve(cfg, Path(".")), check_invariants=True)
    req = res.requests.to_pandas()
    small_ids = set(range(small)) if order else set(range(big, big + small))
    assert (req.status == "finished").all(), req[req.status != "finished"]
    too_big = req.prompt_len + req.output_len - 1 > 1024
    assert not req[too_big].replica.isin(small_ids).any()


def _group_requests(groups, per_group, tpb, gap, rng):
    """Requests sharing a system prompt per group (distinct keys per group), each with its
    own suffix, arriving `gap` seconds apart in a random order."""
    reqs = []
    order = [g for g in range(groups) for _ in range(per_group)]
    rng.shuffle(order)
    key = 10_000
    sys_len = [int(rng.integers(1, 6)) for _ in range(groups)]
    for i, g in enumerate(order):
        prefix = [1000 * (g + 1) + j for j in range(sys_len[g])]
        sfx = int(rng.integers(0, 4))
        keys = prefix + list(range(key, key + sfx))
        key += sfx
        r = Request(i, i * gap, len(keys) * tpb + int(rng.integers(1, tpb)), int(rng.integers(1, 8)))
        r.block_keys = tuple(keys)
        reqs.append(r)
    return reqs


def _hit_rate(router, reqs, replicas, tpb):
    cfg = EngineConfig(max_batch_size=8, max_num_tokens=512, tokens_per_block=tpb, num_blocks=4096,
                       capacity=make_capacity_policy("guaranteed_no_evict"), chunking=make_chunk_policy(False, None),
                       graph_padding=GraphPadding(capture_sizes(8)), check_invariants=True, prefix_caching=True)
    engines = [Engine(cfg, SimExecutor(AffineCost()), replica=i) for i in range(replicas)]
    fresh = []
    for r in reqs:
        c = Request(r.request_id, r.arrival_s, r.prompt_len, r.output_len)
        c.block_keys = r.block_keys
        fresh.append(c)
    run_simulation(fresh, engines, router)
    return sum(r.cached_tokens for r in fresh) / sum(r.prompt_len for r in fresh)


@PROPS
@given(groups=st.integers(1, 5), per_group=st.integers(1, 6), replicas=st.integers(2, 4), seed=st.integers(0, 10**6))
def test_prefix_aware_hit_rate_never_below_round_robin(groups, per_group, replicas, seed):
    """Groups sharing system prompts, arrivals spread so every replica is idle at each
    arrival (no load imbalance): prefix-aware routing reuses at least as much as
    round-robin (and as least-outstanding-tokens)."""
    tpb = 16
    reqs = _group_requests(groups, per_group, tpb, gap=10.0, rng=np.random.default_rng(seed))
    pa = _hit_rate(make_router("prefix_aware"), reqs, replicas, tpb)
    assert pa >= _hit_rate(make_router("round_robin"), reqs, replicas, tpb)
    assert pa >= _hit_rate(make_router("least_outstanding_tokens"), reqs, replicas, tpb)


def test_prefix_aware_beats_round_robin_under_load():
    """Three groups of system prompts interleaved, arriving together in waves: round-robin
    spreads each group over every replica, prefix-aware keeps each where it is cached."""
    tpb = 16
    reqs = []
    for i in range(64):
        g = i % 3
        keys = tuple([1000 * (g + 1) + j for j in range(8)] + [10_000 + i])
        r = Request(i, (i // 8) * 0.05, len(keys) * tpb + 3, 16)
        r.block_keys = keys
        reqs.append(r)
    pa = _hit_rate(make_router("prefix_aware"), reqs, 4, tpb)
    rr = _hit_rate(make_router("round_robin"), reqs, 4, tpb)
    lot = _hit_rate(make_router("least_outstanding_tokens"), reqs, 4, tpb)
    assert pa > rr and pa > lot, (pa, rr, lot)


class _View:
    def __init__(self, i, out, match, fits=True):
        self.index, self._out, self._match, self._fits = i, out, match, fits

    def load(self):
        return self._out // 100

    def outstanding_tokens(self):
        return self._out

    def prefix_match_tokens(self, request):
        return self._match

    def can_ever_fit(self, request):
        return self._fits


def test_prefix_aware_load_bound():
    r = Request(0, 0.0, 100, 10)
    pa = PrefixAware(load_factor=1.5, slack_tokens=100)
    # the cached replica is within 1.5 x 1000 + 100 of the least loaded: it wins
    assert pa.route(r, [_View(0, 1000, 0), _View(1, 1600, 64)]) == 1
    # beyond the bound: the cache does not flood it; the least loaded gets it
    assert pa.route(r, [_View(0, 1000, 0), _View(1, 1700, 64)]) == 0
    # nothing cached: least outstanding tokens, ties to the first
    assert pa.route(r, [_View(0, 500, 0), _View(1, 400, 0), _View(2, 400, 0)]) == 1
    assert make_router("least_outstanding_tokens").route(r, [_View(0, 5, 99), _View(1, 4, 0)]) == 1
    with pytest.raises(ValueError):
        PrefixAware(load_factor=0.5)


# ---------------------------------------------------------------------------------------
def _link_run(starts, sizes, bw, latency):
    env = simpy.Environment()
    done = {}
    link = PSLink(env, bw, latency, lambda t: done.__setitem__(t.payload, env.now))

    def starter(i):
        yield env.timeout(starts[i])
        link.start(sizes[i], 0, i)

    for i in range(len(starts)):
        env.process(starter(i))
    env.run()
    return [done[i] for i in range(len(starts))]


def test_link_processor_sharing_exact():
    # alone: latency + size / bandwidth; k together: all at latency + k * size / bandwidth
    assert _link_run([0.0], [100.0], 10.0, 0.5) == [pytest.approx(10.5)]
    assert _link_run([0.0] * 4, [100.0] * 4, 10.0, 0.0) == [pytest.approx(40.0)] * 4
    # B joins at 5 s: A has 50 bytes left, both at 5 B/s -> A done at 15, B (50 left) at 20
    assert _link_run([0.0, 5.0], [100.0, 100.0], 10.0, 0.0) == [pytest.approx(15.0), pytest.approx(20.0)]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 5), st.floats(1, 100)), min_size=1, max_size=8), st.floats(0, 0.5))
def test_link_work_conserving(jobs, latency):
    """Never faster than alone; with every transfer started at 0 the link is busy until
    exactly the total bytes / bandwidth have moved, and smaller transfers finish first."""
    starts = [s for s, _ in jobs]
    sizes = [z for _, z in jobs]
    ends = _link_run(starts, sizes, 10.0, latency)
    for s, z, e in zip(starts, sizes, ends):
        assert e >= s + latency + z / 10.0 - 1e-9
    ends0 = _link_run([0.0] * len(sizes), sizes, 10.0, latency)
    assert max(ends0) == pytest.approx(latency + sum(sizes) / 10.0)
    order = np.argsort(sizes, kind="stable")
    assert all(ends0[a] <= ends0[b] + 1e-9 for a, b in zip(order, order[1:]))


# ---------------------------------------------------------------------------------------
BASE = """\
name: bad
model: llama-3.2-1b
workload: {synthetic: {num_requests: 10, arrival: {kind: poisson, rate_req_s: 1}, prompt_len: 100, output_len: 10}}
"""


@pytest.mark.parametrize("cluster, key, words", [
    ("{router: fastest}", "cluster.router", "prefix_aware"),
    ("{replicas: 3, groups: [{count: 2}, {count: 2}]}", "cluster.groups", "4 replicas"),
    ("{groups: [{count: 1, workload: {trace: azure_conv}}]}", "cluster.groups[0].workload", "unknown key"),
    ("{groups: [{count: 1, cluster: {replicas: 2}}]}", "cluster.groups[0].cluster", "whole cluster"),
    ("{groups: [{count: 1, scheduler: {max_batch_size: 0}}]}", "cluster.groups[0].scheduler.max_batch_size",
     "greater than 0"),
    ("{groups: [{count: 1, hardware: tpu-v9}]}", "cluster.groups[0].hardware", ""),
    ("{groups: [{count: 1, kv_cache: {tokens_per_block: 64}}]}", "cluster.groups[0].kv_cache.tokens_per_block",
     "one block size"),
    ("{groups: [{count: 600}, {count: 600}]}", "cluster.groups", "1024"),
    ("{replicas: 4, disaggregation: {prefill: {count: 1}, decode: {count: 1}}}", "cluster.replicas", "pools"),
    ("{disaggregation: {prefill: {count: 1}, decode: {count: 1, model: llama-3.1-8b}}}",
     "cluster.disaggregation.decode.model", "same model"),
    ("{disaggregation: {prefill: {count: 1}, decode: {count: 1, kv_cache: {dtype: fp8}}}}",
     "cluster.disaggregation.decode.kv_cache.dtype", "KV dtype"),
    ("{disaggregation: {prefill: {count: 1, kv_cache: {tokens_per_block: 16}}, decode: {count: 1}}}",
     "cluster.disaggregation.prefill.kv_cache.tokens_per_block", "page the KV"),
    ("{disaggregation: {prefill: {count: 1}, decode: {count: 1, kv_cache: {pool_tokens: 32}}}}",
     "cluster.disaggregation.decode", "can hold no request"),
    ("{disaggregation: {prefill: {count: 1}, decode: {count: 1, runtime: {overlap_scheduler: true}}}}",
     "cluster.disaggregation.decode.runtime.overlap_scheduler", "not modelled"),
    ("{disaggregation: {prefill: {count: 1}, decode: {count: 1}, link: {bandwidth_gb_s: 0}}}",
     "cluster.disaggregation.link.bandwidth_gb_s", "greater than 0"),
    ("{disaggregation: {prefill: {count: 1}}}", "cluster.disaggregation.decode", "missing key"),
    ("{prefix_aware: {load_factor: 0.5}}", "cluster.prefix_aware.load_factor", "greater than or equal to 1"),
])
def test_bad_cluster_input(tmp_path, capsys, cluster, key, words):
    p = tmp_path / "bad.yaml"
    p.write_text(BASE + f"cluster: {cluster}\n")
    assert main(["validate", str(p)]) == 2
    err = capsys.readouterr().err
    assert key in err and words in err and "Traceback" not in err, err


def test_per_replica_summary_and_table(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text(BASE.replace("num_requests: 10", "num_requests: 40").replace("rate_req_s: 1", "rate_req_s: 50")
                 + "cluster: {router: least_outstanding_tokens, groups: [{count: 2}, {count: 1, hardware: h200-sxm}]}\n"
                 + "output: {plots: false, timeline: false}\n")
    assert main(["run", str(p), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "base: per replica" in printed
    import json

    s = json.loads((tmp_path / "out" / "base" / "summary.json").read_text())
    rows = s["per_replica"]
    assert [r["replica"] for r in rows] == [0, 1, 2] and {r["pool"] for r in rows} == {"colocated"}
    assert sum(r["requests"] for r in rows) == s["num_finished"] == 40
    assert "per_replica" not in (tmp_path / "out" / "comparison.csv").read_text().splitlines()[0]


def test_gpu_backend_refuses_pools_and_groups():
    from servesim.gpu_backend.runner import _check_supported
    from servesim.sim.types import ConfigError

    for cluster, key in (({"disaggregation": {"prefill": {"count": 1}, "decode": {"count": 1}}},
                          "cluster.disaggregation"),
                         ({"groups": [{"count": 1, "scheduler": {"max_batch_size": 4}}]}, "cluster.groups")):
        with pytest.raises(ConfigError) as e:
            _check_supported(resolve(_cfg(n=4, cluster=cluster), Path(".")))
        assert key in str(e.value)


def test_group_layouts_ride_along(tmp_path, capsys):
    """A group's parallelism is resolved as a run's (the cost model's layout keys), and its
    problems are named at the group's keys."""
    s = resolve(_cfg(n=4, cluster={"groups": [{"count": 2}, {"count": 1, "cluster": {"tensor_parallel": 2}}]}),
                Path("."))
    assert [r.setup.cfg.cluster.tensor_parallel for r in s.cluster.replicas] == [1, 1, 2]
    assert s.cluster.num_gpus == 4 and s.cfg.cluster.replicas == 3
    p = tmp_path / "bad.yaml"
    p.write_text(BASE + "cluster: {groups: [{count: 1}, {count: 1, cluster: {tensor_parallel: 3}}]}\n")
    assert main(["validate", str(p)]) == 2
    assert "cluster.groups[1].cluster.tensor_parallel: model llama-3.2-1b has 32 attention heads" in \
        capsys.readouterr().err


@settings(max_examples=6, deadline=None)
@given(n=st.integers(2, 4), router=st.sampled_from(sorted(ROUTERS)), seed=st.integers(0, 1000))
def test_groups_without_overrides_are_replicas(n, router, seed):
    """`groups: [{count: n}]` (or n groups of one) is `replicas: n`, byte for byte."""
    runs = [simulate(resolve(_cfg(n=30, rate=100.0, seed=seed, kv_cache={"enable_block_reuse": True},
                                  cluster=c), Path(".")))
            for c in ({"replicas": n, "router": router}, {"groups": [{"count": n}], "router": router},
                      {"groups": [{"count": 1}] * n, "router": router})]
    for r in runs[1:]:
        assert _bytes(r.requests) == _bytes(runs[0].requests) and _bytes(r.iterations) == _bytes(runs[0].iterations)
    assert runs[1].summary["per_replica"] == runs[0].summary["per_replica"]
