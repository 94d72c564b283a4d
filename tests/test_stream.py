"""Bounded-memory runs (sim/stream.py): records streamed to Parquet as the run goes give the
same tables and summaries as a run held in memory; exact percentiles without the values
in memory."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from servesim.policies.routing import make_router
from servesim.sim import metrics, stream
from servesim.sim.driver import run_simulation
from servesim.sim.metrics import (IterationStats, dist, dist_of_chunks, itl_values, percentiles_from_ranks,
                                  select_ranks, summarize)
from servesim.sim.schemas import write_run_table
from servesim.sim.records import RequestSource, iteration_arrays, iterations_table, request_arrays
from servesim.sim.types import Request

import engine_harness as h

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- exact percentiles
finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(finite, max_size=30), min_size=1, max_size=6), st.integers(1, 12))
def test_select_ranks_and_percentiles_equal_numpy(chunks, limit):
    """The radix selection finds the exact order statistics (values repeated, negative, 0
    and -0 included) and percentiles_from_ranks gives np.percentile's floats."""
    arrays = [np.asarray(c, dtype=np.float64) for c in chunks]
    allv = np.concatenate(arrays)
    if not len(allv):
        return
    srt = np.sort(allv)
    ranks = sorted({0, len(allv) - 1, len(allv) // 2, (len(allv) * 9) // 10})
    got = select_ranks(lambda: iter(arrays), ranks, collect_limit=limit, bits=4)
    for r in ranks:
        assert got[r] == srt[r]
    # a first level counted beforehand, and steps that do not divide the 64 bits
    fin = [a[np.isfinite(a)] for a in arrays if len(a)]
    first = sum(metrics._prefix_hist(metrics._sort_keys(a), 6) for a in fin)
    got = select_ranks(lambda: iter(arrays), ranks, collect_limit=limit, bits=5, first=first, first_bits=6)
    for r in ranks:
        assert got[r] == srt[r]
    assert percentiles_from_ranks(len(allv), lambda i: srt[i]) == [float(x) for x in
                                                                    np.percentile(allv, [50, 90, 99])]
    d = dist_of_chunks(lambda: iter(arrays), limit=limit)
    exact = dist(allv)
    assert [d[k] for k in ("p50", "p90", "p99")] == [exact[k] for k in ("p50", "p90", "p99")]
    assert d["mean"] == pytest.approx(exact["mean"], rel=1e-9, abs=1e-6)


def test_dist_of_chunks_in_memory_is_dist():
    rng = np.random.default_rng(0)
    parts = [rng.lognormal(-4, 0.5, n) for n in (10, 0, 1000, 7)]
    assert dist_of_chunks(lambda: iter(parts)) == dist(np.concatenate(parts))
    assert dist_of_chunks(lambda: iter([])) == dist(np.zeros(0))


# ---------------------------------------------------------------- streamed engine records
def _engines(n_replicas, capacity, chunked, max_batch, blocks, overlap):
    cost = h.AffineCost()
    from servesim.policies.capacity import make_capacity_policy
    from servesim.policies.chunking import make_chunk_policy
    from servesim.policies.graph_padding import GraphPadding, capture_sizes

    cfg = h.EngineConfig(max_batch_size=max_batch, max_num_tokens=64, tokens_per_block=4, num_blocks=blocks,
                         capacity=make_capacity_policy(capacity), chunking=make_chunk_policy(chunked, None),
                         graph_padding=GraphPadding(capture_sizes(max_batch)), kv_block_bytes=1 << 20,
                         overlap=overlap)
    return [h.Engine(cfg, h.SimExec(cost, overlap), replica=r) for r in range(n_replicas)]


workloads = st.lists(st.tuples(st.floats(0, 0.2), st.integers(1, 60), st.integers(1, 40)), min_size=1, max_size=40)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads, st.integers(1, 2), st.sampled_from(["guaranteed_no_evict", "max_utilization", "static_batch"]),
       st.booleans(), st.booleans(), st.integers(1, 5), st.integers(1, 9))
def test_streamed_tables_equal_in_memory(rows, n_replicas, capacity, chunked, overlap, flush, group):
    """Streamed with tiny flush thresholds and row groups (many flushes, many groups, the
    end-time window trimmed, requests reordered to id order), the files hold the rows a
    run held in memory makes, and the summary is the same (sums up to rounding)."""
    rows = sorted(rows)
    mk = lambda: [Request(i, float(a), int(p), int(o)) for i, (a, p, o) in enumerate(rows)]  # noqa: E731
    kw = dict(n_replicas=n_replicas, capacity=capacity, chunked=chunked, max_batch=4, blocks=60, overlap=overlap)
    engines = _engines(**kw)
    reqs = mk()
    run_simulation(reqs, engines, make_router("round_robin"))
    its = [iteration_arrays(e) for e in engines]
    mem_req = request_arrays(reqs, its).table
    mem_it = iterations_table(its)

    engines2 = _engines(**kw)
    wl = pd.DataFrame({"request_id": np.arange(len(rows))})
    with tempfile.TemporaryDirectory() as tmp:
        rec = stream.RunRecorder(Path(tmp), engines2, wl["request_id"].to_numpy(), wl, None, group_rows=group,
                                 request_group_rows=group, flush_records=flush, flush_done=flush)
        src = RequestSource(np.array([a for a, _, _ in rows]), lambda lo, hi: mk()[lo:hi], chunk=3)
        run_simulation(src, engines2, make_router("round_robin"))
        rec.close()
        req = pq.read_table(Path(tmp) / "requests.parquet")
        it = pq.read_table(Path(tmp) / "iterations.parquet")
        write_run_table(mem_req, Path(tmp) / "mem_req.parquet")
        write_run_table(mem_it, Path(tmp) / "mem_it.parquet")
        _same_table(req, pq.read_table(Path(tmp) / "mem_req.parquet"))
        _same_table(it, pq.read_table(Path(tmp) / "mem_it.parquet"))
        assert pq.ParquetFile(Path(tmp) / "iterations.parquet").num_row_groups == max(-(-len(it) // group), 1)
        streamed = summarize(rec.scalar_requests(), rec.stats, kv_total_blocks=60, backend="sim", wall_s=0.0,
                             itl=dist_of_chunks(rec.itl_chunks, limit=5))
        held = rec.itl_dist()  # (kept while writing: few)
    exact = summarize(mem_req, mem_it, kv_total_blocks=60, backend="sim", wall_s=0.0)
    _same_summary(streamed, exact)
    assert held == exact["itl_s"]
    assert all(e.recorder is None for e in engines2)
    assert sum(e.num_done() for e in engines2) == len(rows)


def _same_table(a: pa.Table, b: pa.Table) -> None:
    """Same schema (metadata included) and the same values, NaN equal to NaN (repr of a
    float is exact)."""
    assert a.schema.equals(b.schema, check_metadata=True)
    for name in a.column_names:
        assert repr(a.column(name).to_pylist()) == repr(b.column(name).to_pylist()), name


def _same_summary(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict) and set(a[k]) == {"mean", "p50", "p90", "p99"}:
            for s in ("p50", "p90", "p99"):
                assert a[k][s] == b[k][s], (k, s)
            assert a[k]["mean"] == pytest.approx(b[k]["mean"], rel=1e-12), k
        elif isinstance(a[k], float):
            assert a[k] == pytest.approx(b[k], rel=1e-12), k
        else:
            assert a[k] == b[k], k


def test_iteration_stats_groups_add_up():
    rows = [(0.01 * i, 5 + 7 * i % 30, 3 + i % 9) for i in range(30)]
    _, _, it, _ = h.run_engine(rows, stepwise=False)
    one = IterationStats.of_table(it)
    many = IterationStats.of_table(it, group_rows=3)
    assert one.rows == many.rows == it.num_rows and one.ints == many.ints
    assert many.duration_s == pytest.approx(float(it.column("duration_s").to_numpy().sum()), rel=1e-12)


def test_itl_values_of_a_slice():
    """Row groups read back are list arrays with offsets not starting at 0."""
    tt = pa.array([[0.0, 1.0, 3.0], [5.0], [6.0, 6.5]], type=pa.list_(pa.float64()))
    assert itl_values(tt).tolist() == [1.0, 2.0, 0.5]
    assert itl_values(tt.slice(1)).tolist() == [0.5]


# ---------------------------------------------------------------- a whole run, streamed
EXP = """\
name: s
model: llama-3.2-1b
hardware: h100-sxm
seed: 3
workload:
  prefix: {kind: shared_system_prompt, num_requests: 120, system_len: 256, shared_fraction: 0.8,
           user_len: {kind: uniform, low: 16, high: 200}, output_len: {kind: uniform, low: 2, high: 60},
           arrival: {kind: poisson, rate_req_s: 40}}
  slo: {ttft_s: 0.05, tpot_s: 0.01}
scheduler: {max_batch_size: 16, max_num_tokens: 512, capacity: max_utilization, enable_chunked_context: true}
kv_cache: {enable_block_reuse: true, tokens_per_block: 16, pool_tokens: 6000}
cluster: {replicas: REPLICAS}
output: {plots: false, timeline: false}
"""
SPEC = """\
speculative: {proposer: ngram, max_draft_len: 3, acceptance: 0.6}
"""


@pytest.mark.parametrize("replicas,spec", [(1, False), (2, False), (2, True)])
def test_simulate_streamed_equals_in_memory(tmp_path, monkeypatch, replicas, spec):
    """`simulate(out_dir=...)` with small flush sizes and row groups (several flushes and
    groups, the replicas' part files merged) writes the tables and summary `write_run` of
    the run held in memory writes (prompt identity columns, energy and bounds included)."""
    from servesim.sim.config import load_experiment
    from servesim.sim.runner import resolve_experiment, simulate, write_run

    p = tmp_path / "s.yaml"
    p.write_text(EXP.replace("REPLICAS", str(replicas)) + (SPEC if spec else ""))
    setup = resolve_experiment(load_experiment(p, []), p)[0]
    mem = simulate(setup)
    write_run(mem, tmp_path / "mem", "s", "base")
    monkeypatch.setattr(stream, "FLUSH_RECORDS", 7)
    monkeypatch.setattr(stream, "FLUSH_DONE", 5)
    monkeypatch.setattr(stream, "ROW_GROUP_ROWS", 50)
    monkeypatch.setattr(stream, "REQUEST_GROUP_ROWS", 16)
    # the pooled ITLs' percentiles selected in passes over the written column
    monkeypatch.setattr(stream, "ITL_IN_MEMORY", 100)
    monkeypatch.setattr(metrics, "ITL_IN_MEMORY", 100)
    monkeypatch.setattr(metrics, "SLICE", 64)
    res = simulate(setup, out_dir=tmp_path / "str")
    write_run(res, tmp_path / "str", "s", "base")
    for name in ("requests.parquet", "iterations.parquet"):
        _same_table(pq.read_table(tmp_path / "mem" / name), pq.read_table(tmp_path / "str" / name))
    assert "block_hashes" in pq.read_table(tmp_path / "str" / "requests.parquet").column_names
    if spec:  # the per-position list columns, and drafts accepted
        assert "draft_proposed_by_position" in pq.read_table(tmp_path / "str" / "iterations.parquet").column_names
        assert json.loads((tmp_path / "str" / "summary.json").read_text())["spec_acceptance_rate"] > 0
    assert pq.ParquetFile(tmp_path / "str" / "requests.parquet").num_row_groups == 8  # 120 / 16
    assert sorted(f.name for f in (tmp_path / "str").iterdir()) == ["config.yaml", "iterations.parquet",
                                                                     "requests.parquet", "summary.json"]
    sa = json.loads((tmp_path / "mem" / "summary.json").read_text())
    sb = json.loads((tmp_path / "str" / "summary.json").read_text())
    sa.pop("wall_s"), sb.pop("wall_s")
    _same_summary(sb, sa)
    assert res.requests.num_rows == 120  # read from the folder
    assert res.iterations.num_rows == mem.iterations.num_rows


@pytest.mark.parametrize("replicas", [1, 2])
def test_sim_run_small_is_byte_identical(tmp_path, replicas):
    """A run small enough for one row group: `sim run` (streamed) writes the very bytes
    the in-memory path writes."""
    from servesim.sim.config import load_experiment
    from servesim.sim.runner import resolve_experiment, simulate, write_run

    p = tmp_path / "s.yaml"
    p.write_text(EXP.replace("REPLICAS", str(replicas)))
    setup = resolve_experiment(load_experiment(p, []), p)[0]
    write_run(simulate(setup), tmp_path / "mem", "s", "base")
    write_run(simulate(setup, out_dir=tmp_path / "str"), tmp_path / "str", "s", "base")
    for name in ("requests.parquet", "iterations.parquet"):
        assert (tmp_path / "mem" / name).read_bytes() == (tmp_path / "str" / name).read_bytes(), name


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=8), st.integers(1, 25))
def test_group_writer_bytes_are_write_table(sizes, group):
    """Tables of any sizes written through GroupWriter make the very file pq.write_table of
    their concatenation makes with that row group size (list columns included)."""
    rng = np.random.default_rng(len(sizes) * 31 + group)
    parts = []
    for n in sizes:
        lens = rng.integers(0, 4, n)
        parts.append(pa.table({"i": np.arange(n, dtype=np.int64), "x": rng.random(n),
                               "l": pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(lens)])
                                                                      .astype(np.int32)),
                                                             pa.array(rng.random(int(lens.sum()))))}))
    with tempfile.TemporaryDirectory() as tmp:
        seen = []
        w = stream.GroupWriter(Path(tmp) / "a.parquet", group, on_group=lambda t: seen.append(t.num_rows))
        for p in parts:
            w.write(p)
        w.close(empty=parts[0].schema.empty_table())
        whole = pa.concat_tables(parts)
        pq.write_table(whole, Path(tmp) / "b.parquet", row_group_size=group, use_dictionary=False)
        assert (Path(tmp) / "a.parquet").read_bytes() == (Path(tmp) / "b.parquet").read_bytes()
        assert sum(seen) == whole.num_rows and all(s == group for s in seen[:-1])
