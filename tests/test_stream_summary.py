"""sim/stream_summary.py: a streamed run's summary from its requests file in batches is
the summary metrics.summarize makes of the whole table (the same floats), and the bounds'
batch sums give run_bounds' numbers."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from servesim.sim.bounds import BoundSums, run_bound_k, run_bounds
from servesim.sim.metrics import IterationStats, summarize
from servesim.sim.stream_summary import RequestPasses, bound_sums_file, summarize_file

REASONS = ("", "kv_pool", "token_budget")


@st.composite
def request_tables(draw):
    """A requests table's scalar columns: finished and rejected rows, NaN SLOs, tenants,
    one-token outputs (NaN TPOT), ties."""
    n = draw(st.integers(0, 60))
    rows = []
    for i in range(n):
        rejected = draw(st.booleans()) and draw(st.booleans())
        arrival = draw(st.sampled_from([0.0, 0.5, 1.0])) + draw(st.integers(0, 50)) / 8
        prompt = draw(st.integers(1, 400))
        out = draw(st.integers(1, 60))
        cached = draw(st.integers(0, prompt))
        queue = draw(st.integers(0, 40)) / 16
        ttft = queue + draw(st.integers(1, 20)) / 32
        tpot = draw(st.integers(1, 9)) / 256
        nan = float("nan")
        rows.append({
            "request_id": i,
            "status": "rejected" if rejected else "finished",
            "reject_reason": draw(st.sampled_from(REASONS[1:])) if rejected else "",
            "arrival_s": arrival,
            "first_scheduled_s": nan if rejected else arrival + queue,
            "first_token_s": nan if rejected else arrival + ttft,
            "finish_s": nan if rejected else arrival + ttft + (out - 1) * tpot,
            "prompt_len": prompt, "output_len": out, "cached_tokens": 0 if rejected else cached,
            "tenant": draw(st.sampled_from(["", "a", "b"])),
            "slo_ttft_s": draw(st.sampled_from([nan, 0.1, 0.5])),
            "slo_tpot_s": draw(st.sampled_from([nan, 0.01, 0.03])),
        })
    names = ["request_id", "status", "reject_reason", "arrival_s", "first_scheduled_s", "first_token_s", "finish_s",
             "prompt_len", "output_len", "cached_tokens", "tenant", "slo_ttft_s", "slo_tpot_s"]
    types = [pa.int64(), pa.string(), pa.string()] + [pa.float64()] * 4 + [pa.int64()] * 3 + [pa.string()] \
        + [pa.float64()] * 2
    return pa.table({k: pa.array([r[k] for r in rows], type=t) for k, t in zip(names, types)})


def _iterations() -> IterationStats:
    st_ = IterationStats()
    st_.add(pa.table({"duration_s": [0.01, 0.02], "kv_blocks_used": [3, 4], "ctx_tokens": [10_000, 0],
                      "evictions": [1, 0], "offloads": [0, 0], "onboards": [0, 0],
                      "draft_tokens_proposed": [0, 0], "draft_tokens_accepted": [0, 0]}))
    return st_


def _same(a, b) -> None:
    """Equal, NaN equal to NaN, floats to the bit (repr)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (a, b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, float):
        assert isinstance(b, float) and (repr(a) == repr(b)), (a, b)
    else:
        assert a == b and type(a) is type(b), (a, b)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request_tables(), st.integers(1, 17))
def test_summary_from_batches_is_the_whole_tables(table, batch_rows):
    kw = dict(kv_total_blocks=60, backend="sim", wall_s=1.5, num_preemptions=2, num_swaps=1, kv_block_bytes=64,
              evictions_by_priority={35: 1})
    exact = summarize(table, _iterations(), itl={"mean": None}, **kw)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "requests.parquet"
        pq.write_table(table, path)
        got = summarize_file(path, _iterations(), itl={"mean": None}, batch_rows=batch_rows, **kw)
    _same(got, exact)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request_tables(), st.integers(1, 17), st.integers(1, 8))
def test_summary_past_the_limit_selects_exact_percentiles(table, batch_rows, limit):
    """Beyond dist_of_chunks' limit the percentiles are still exact and the mean within
    rounding of the whole table's."""
    kw = dict(kv_total_blocks=60, backend="sim", wall_s=0.0)
    exact = summarize(table, _iterations(), itl={"mean": None}, **kw)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "requests.parquet"
        pq.write_table(table, path)
        got = summarize_file(path, _iterations(), itl={"mean": None}, batch_rows=batch_rows, limit=limit, **kw)
    for k in ("ttft_s", "tpot_s", "e2e_s", "queue_s"):
        for s in ("p50", "p90", "p99"):
            _same(got[k][s], exact[k][s])
        if exact[k]["mean"] is None:
            assert got[k]["mean"] is None
        else:
            assert math.isclose(got[k]["mean"], exact[k]["mean"], rel_tol=1e-12, abs_tol=1e-15)
    _same(got["long_waits"], exact["long_waits"])


@pytest.fixture(scope="module")
def setup():
    from servesim.sim.config import load_experiment
    from servesim.sim.runner import resolve_experiment

    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "e.yaml"
        p.write_text("name: b\nmodel: llama-3.1-8b\nhardware: h100-sxm\nworkload:\n  synthetic:\n"
                     "    num_requests: 4\n    arrival: {kind: poisson, rate_req_s: 1}\n"
                     "    prompt_len: {kind: constant, value: 16}\n    output_len: {kind: constant, value: 4}\n"
                     "kv_cache: {enable_block_reuse: false}\n")
        return resolve_experiment(load_experiment(p), p)[0]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(request_tables(), st.integers(1, 17))
def test_bounds_from_batch_sums_are_the_whole_tables(setup, table, batch_rows):
    summary = {"throughput_out_tok_s": 100.0}
    exact = run_bounds(setup, table, summary)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "requests.parquet"
        pq.write_table(table, path)
        sums = bound_sums_file(path, run_bound_k(setup), batch_rows=batch_rows)
        # (the batches a summary's passes hold or read again, as stream_run hands them over)
        passes = RequestPasses(path, batch_rows)
        assert (passes.held is not None) == (len(table) <= batch_rows)
        held = bound_sums_file(path, run_bound_k(setup), batch_rows=batch_rows, passes=passes)
    _same(run_bounds(setup, None, summary, sums=sums), exact)
    _same(run_bounds(setup, None, summary, sums=held), exact)
    assert sums.n == int(np.sum(np.asarray(table.column("status").to_pylist()) == "finished")) if len(table) else True


def test_bound_sums_of_no_rows():
    s = BoundSums(0).add_table(pa.table({"status": pa.array([], pa.string()), "prompt_len": pa.array([], pa.int64()),
                                         "output_len": pa.array([], pa.int64()),
                                         "cached_tokens": pa.array([], pa.int64())}))
    assert s.n == 0 and s.n_out == 0.0 and s.p_min == float("inf")
