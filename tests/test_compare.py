"""`sim compare`: two runs of the same requests side by side (sim/compare.py).

The committed example pair (tests/data/compare/, made by `sim run tests/data/compare/pair.yaml
--out tests/data/compare`) is the same 200 requests priced by a derated roofline
(`reference`, standing in for a GPU run) and the default roofline (`roofline`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from servesim.sim.cli import main
from servesim.sim.compare import REQUEST_PHASES, bucket_range, compare_runs, log2_bucket, request_phases
from servesim.sim.types import ConfigError

DATA = Path(__file__).parent / "data" / "compare"
REF = DATA / "reference"
ROOF = DATA / "roofline"

TOP_KEYS = {"schema_version", "reference", "rel_err", "run_a", "run_b", "warnings", "config_diff",
            "metrics", "requests", "iterations", "iterations_by_context", "request_phases",
            "throughput_over_time"}
LATENCY = ("ttft_s", "tpot_s", "itl_s", "e2e_s")
STATS = ("mean", "p50", "p90", "p99")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _metric(result: dict, metric: str, stat: str = "value") -> dict:
    return next(r for r in result["metrics"] if r["metric"] == metric and r["stat"] == stat)


def test_committed_pair_is_small():
    assert sum(f.stat().st_size for f in DATA.rglob("*") if f.is_file()) < 300_000


def test_cli_compare_writes_json_and_png(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", str(REF), str(ROOF), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "rel. error" in printed and "TTFT" in printed and "MAPE" in printed
    assert (out / "compare.png").stat().st_size > 10_000
    res = json.loads((out / "compare.json").read_text())
    assert set(res) == TOP_KEYS
    assert res["reference"] == "a" and res["run_a"]["variant"] == "reference"
    assert res["run_b"]["variant"] == "roofline"
    assert res["run_a"]["num_requests"] == res["run_b"]["num_requests"] == 200
    # same model and hardware: no warning; the cost-model settings are what differ
    assert res["warnings"] == []
    assert set(res["config_diff"]) == {f"cost_model.roofline.{k}" for k in (
        "flops_efficiency", "bandwidth_efficiency", "attention_flops_efficiency")}
    got = {(r["metric"], r["stat"]) for r in res["metrics"]}
    want = {(k, s) for k in LATENCY for s in STATS} | {
        (k, "value") for k in ("throughput_req_s", "throughput_out_tok_s", "goodput_req_s", "kv_util_mean",
                               "energy_per_token_j")}
    assert got == want  # energy_per_token_j: both summaries have it
    for r in res["metrics"]:
        assert set(r) == {"metric", "stat", "a", "b", "rel_err"}
        if r["a"]:
            assert r["rel_err"] == pytest.approx((r["b"] - r["a"]) / r["a"])
    # the default roofline is faster than the derated reference
    assert _metric(res, "ttft_s", "p50")["rel_err"] < 0 and _metric(res, "e2e_s", "mean")["rel_err"] < 0
    req = res["requests"]
    assert req["finished_both"] == 200
    for k in ("ttft_s", "tpot_s", "e2e_s"):
        assert set(req[k]) == {"n", "median_abs_rel_err", "p90_abs_rel_err", "mean_rel_err"}
        assert req[k]["median_abs_rel_err"] > 0
    it = res["iterations"]
    assert it["key"] == ["num_ctx_requests", "num_gen_requests", "ctx_tokens", "gen_tokens"]
    assert it["matched_keys"] == len(it["matched"]) > 0
    assert 0 < it["mape"] < 1 and 0 < it["coverage_a"] <= 1
    assert set(it["by_phase"]) == {"prefill", "decode", "mixed"}
    assert it["by_phase"]["decode"]["matched_iterations_a"] > 0
    m = it["matched"][0]
    assert set(m) == {"num_ctx_requests", "num_gen_requests", "ctx_tokens", "gen_tokens", "phase",
                      "count_a", "count_b", "mean_s_a", "mean_s_b", "rel_err"}
    # the weighted MAPE is what the matched table gives
    w = np.array([x["count_a"] for x in it["matched"]])
    e = np.abs([x["rel_err"] for x in it["matched"]])
    assert it["mape"] == pytest.approx((w * e).sum() / w.sum())
    dec = it["decode_median_by_batch_size"]
    assert dec and dec[0]["batch_size"] == 1 and set(dec[0]) == {
        "batch_size", "count_a", "count_b", "median_s_a", "median_s_b", "rel_err"}
    ic = res["iterations_by_context"]
    assert ic["key"] == it["key"] + ["ctx_attended_bucket", "decode_kv_bucket"]
    # a finer key: never more of A's iterations paired than by batch alone
    assert 0 < ic["coverage_a"] <= it["coverage_a"] and 0 < ic["mape"] < 1
    assert set(ic["by_phase"]) == {"prefill", "decode", "mixed"}
    with_chunks = int((pq.read_table(REF / "iterations.parquet").column("num_ctx_requests").to_numpy() > 0).sum())
    assert sum(r["iterations_a"] for r in ic["by_ctx_attended"]) == with_chunks  # matched or not
    assert sum(r["matched_iterations_a"] for r in ic["by_ctx_attended"]) == sum(
        ic["by_phase"][p]["matched_iterations_a"] for p in ("prefill", "mixed"))
    rp = res["request_phases"]
    assert rp["n"] == 200 and set(rp["phases"]) == set(REQUEST_PHASES)
    for ph in rp["phases"].values():
        assert set(ph) == {"a", "b", "rel_err", "mean_diff_s", "share_of_e2e_a"}
        assert ph["a"]["p50"] <= ph["a"]["p99"]
    # the phases' mean differences add up to the mean E2E difference
    assert sum(ph["mean_diff_s"] for ph in rp["phases"].values()) == pytest.approx(rp["e2e_mean_diff_s"])
    assert rp["e2e_mean_diff_s"] / rp["e2e_mean_s_a"] == pytest.approx(_metric(res, "e2e_s", "mean")["rel_err"])
    assert "queueing (s)" in printed and "decode span (s)" in printed and "attended context" in printed
    tot = res["throughput_over_time"]
    assert len(tot["bin_start_s"]) == len(tot["out_tok_s_a"]) == len(tot["out_tok_s_b"]) == 60
    # every output token lands in some bin
    total_out = pc.sum(pq.read_table(REF / "requests.parquet").column("output_len")).as_py()
    assert sum(tot["out_tok_s_a"]) * tot["bin_s"] == pytest.approx(total_out)


def test_run_against_itself_has_no_error(tmp_path):
    res = compare_runs(REF, REF, tmp_path, quiet=True)
    assert res["warnings"] == [] and res["config_diff"] == {}
    for r in res["metrics"]:
        assert r["rel_err"] == 0, r
    for k in ("ttft_s", "tpot_s", "e2e_s"):
        assert res["requests"][k]["median_abs_rel_err"] == 0
    it = res["iterations"]
    assert it["mape"] == 0 and it["coverage_a"] == it["coverage_b"] == 1
    assert all(p["mape"] in (0, None) for p in it["by_phase"].values())
    assert all(d["rel_err"] == 0 for d in it["decode_median_by_batch_size"])
    tot = res["throughput_over_time"]
    assert tot["out_tok_s_a"] == tot["out_tok_s_b"]
    ic = res["iterations_by_context"]
    assert ic["mape"] == 0 and ic["coverage_a"] == ic["coverage_b"] == 1
    assert all(r["mape"] in (0, None) for r in ic["by_ctx_attended"])
    for ph in res["request_phases"]["phases"].values():
        assert ph["mean_diff_s"] == 0 and all(e in (0, None) for e in ph["rel_err"].values())


def _slow_down(run: Path, factor: float) -> None:
    """Every duration of a run times `factor`, arrivals kept: a uniformly slower machine."""
    req = pq.read_table(run / "requests.parquet")
    arr = req.column("arrival_s").to_numpy()
    for col in ("first_scheduled_s", "first_token_s", "finish_s"):
        i = req.schema.get_field_index(col)
        req = req.set_column(i, col, pa.array(arr + factor * (req.column(col).to_numpy() - arr)))
    tt = req.column("token_times").combine_chunks()
    lens = pc.list_value_length(tt).fill_null(0).to_numpy()
    vals = pc.list_flatten(tt).to_numpy()
    vals = np.repeat(arr, lens) + factor * (vals - np.repeat(arr, lens))
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    i = req.schema.get_field_index("token_times")
    req = req.set_column(i, "token_times", pa.ListArray.from_arrays(pa.array(offsets), pa.array(vals)))
    pq.write_table(req, run / "requests.parquet")
    it = pq.read_table(run / "iterations.parquet")
    for col in ("start_s", "duration_s"):
        i = it.schema.get_field_index(col)
        it = it.set_column(i, col, pa.array(it.column(col).to_numpy() * factor))
    pq.write_table(it, run / "iterations.parquet")


def test_durations_scaled_by_1_1_give_ten_percent(tmp_path):
    a = _copy(REF, tmp_path / "a")
    b = _copy(REF, tmp_path / "b")
    _slow_down(b, 1.1)
    for run, e in ((a, 0.5), (b, 0.55)):  # energy per token: compared when both runs have it
        s = json.loads((run / "summary.json").read_text())
        s["energy_per_token_j"] = e
        (run / "summary.json").write_text(json.dumps(s))
    res = compare_runs(a, b, None, quiet=True)
    assert (b / "compare.json").exists() and (b / "compare.png").exists()  # default: into RUN_B
    for k in LATENCY:
        for s in STATS:
            assert _metric(res, k, s)["rel_err"] == pytest.approx(0.1, abs=1e-9), (k, s)
    # a uniform slow-down leaves the time-weighted KV utilisation as it was
    assert _metric(res, "kv_util_mean")["rel_err"] == pytest.approx(0.0, abs=1e-9)
    assert _metric(res, "energy_per_token_j")["rel_err"] == pytest.approx(0.1)
    for k in ("ttft_s", "tpot_s", "e2e_s"):
        assert res["requests"][k]["median_abs_rel_err"] == pytest.approx(0.1, abs=1e-9)
        assert res["requests"][k]["mean_rel_err"] == pytest.approx(0.1, abs=1e-9)
    it = res["iterations"]
    assert it["coverage_a"] == 1 and it["mape"] == pytest.approx(0.1, abs=1e-9)
    for p in ("prefill", "decode", "mixed"):
        assert it["by_phase"][p]["matched_keys"] > 0
        assert it["by_phase"][p]["mape"] == pytest.approx(0.1, abs=1e-9)
    assert all(d["rel_err"] == pytest.approx(0.1, abs=1e-9) for d in it["decode_median_by_batch_size"])
    ic = res["iterations_by_context"]
    assert ic["coverage_a"] == 1 and ic["mape"] == pytest.approx(0.1, abs=1e-9)
    assert all(r["mape"] == pytest.approx(0.1, abs=1e-9) for r in ic["by_ctx_attended"])
    # every phase of every request 10% longer: each phase's part of the E2E error is its share of E2E
    rp = res["request_phases"]
    for k, ph in rp["phases"].items():
        for s in STATS:
            assert ph["rel_err"][s] == pytest.approx(0.1, abs=1e-9), (k, s)
        assert ph["share_of_e2e_a"] == pytest.approx(0.1 * ph["a"]["mean"] / rp["e2e_mean_s_a"])
    # b's summary.json still holds the old numbers: compare recomputes and says so
    assert any("summary.json" in w and "(B)" in w for w in res["warnings"])


def test_mismatched_requests_exit_2_naming_the_request(tmp_path, capsys):
    b = _copy(REF, tmp_path / "b")
    req = pq.read_table(b / "requests.parquet")
    pl = req.column("prompt_len").to_numpy().copy()
    rid = int(req.column("request_id").to_numpy()[17])
    pl[17] += 1
    req = req.set_column(req.schema.get_field_index("prompt_len"), "prompt_len", pa.array(pl))
    pq.write_table(req, b / "requests.parquet")
    assert main(["compare", str(REF), str(b), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"request {rid} has prompt_len" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "compare.json").exists()

    # a request missing from one run
    req = pq.read_table(REF / "requests.parquet")
    pq.write_table(req.filter(pc.not_equal(req.column("request_id"), 5)), b / "requests.parquet")
    with pytest.raises(ConfigError, match="request 5 is in"):
        compare_runs(REF, b, tmp_path / "o", quiet=True)


def test_bad_run_dirs_are_named(tmp_path, capsys):
    assert main(["compare", str(REF), str(tmp_path / "nope")]) == 2
    assert "nope: not a run directory" in capsys.readouterr().err
    b = _copy(REF, tmp_path / "b")
    (b / "summary.json").unlink()
    assert main(["compare", str(REF), str(b)]) == 2
    assert "summary.json is missing" in capsys.readouterr().err
    shutil.copy(REF / "summary.json", b / "summary.json")
    (b / "iterations.parquet").write_bytes(b"not parquet")
    with pytest.raises(ConfigError) as e:
        compare_runs(REF, b, tmp_path, quiet=True)
    assert e.value.problems[0][0] == str(b / "iterations.parquet")


def test_model_mismatch_warns_and_no_traceback(tmp_path):
    b = _copy(ROOF, tmp_path / "b")
    cfg = (b / "config.yaml").read_text().replace("  model: llama-3.1-8b", "  model: llama-3.2-1b")
    (b / "config.yaml").write_text(cfg)
    p = subprocess.run([sys.executable, "-m", "servesim.sim.cli", "compare", str(REF), str(b)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "warning" in p.stderr and "llama-3.2-1b" in p.stderr
    res = json.loads((b / "compare.json").read_text())
    assert any("model" in w for w in res["warnings"])


def test_a_replay_that_attends_other_contexts_is_not_the_cost_models_error(tmp_path):
    """B's chunks attend thousands of cached tokens where A's attended none (a replay whose
    cache diverged) and take 30% longer: by batch alone that reads as a 30% price error of
    the iterations with chunks; keyed by the attended context they are not paired at all."""
    b = _copy(REF, tmp_path / "b")
    it = pq.read_table(b / "iterations.parquet")
    ctx = it.column("num_ctx_requests").to_numpy() > 0
    assert ctx.any() and not it.column("ctx_cached_tokens").to_numpy().any()
    cached = np.where(ctx, 5000, 0)
    it = it.set_column(it.schema.get_field_index("ctx_cached_tokens"), "ctx_cached_tokens", pa.array(cached))
    dur = it.column("duration_s").to_numpy() * np.where(ctx, 1.3, 1.0)
    it = it.set_column(it.schema.get_field_index("duration_s"), "duration_s", pa.array(dur))
    pq.write_table(it, b / "iterations.parquet")
    res = compare_runs(REF, b, tmp_path / "o", quiet=True)
    assert res["iterations"]["by_phase"]["mixed"]["mape"] == pytest.approx(0.3)
    ic = res["iterations_by_context"]
    assert ic["by_phase"]["mixed"]["mape"] is None and ic["by_phase"]["prefill"]["mape"] is None
    assert ic["by_phase"]["decode"]["mape"] == 0 and ic["mape"] == 0
    assert ic["coverage_a"] == pytest.approx(1 - ctx.mean())
    (row,) = ic["by_ctx_attended"]  # A's chunks attend no cache; none of them is paired
    assert row["bucket"] == 0 and row["iterations_a"] == ctx.sum() and row["matched_iterations_a"] == 0


def test_a_run_without_first_scheduled_is_named(tmp_path):
    b = _copy(REF, tmp_path / "b")
    req = pq.read_table(b / "requests.parquet")
    pq.write_table(req.drop_columns(["first_scheduled_s"]), b / "requests.parquet")
    with pytest.raises(ConfigError) as e:
        compare_runs(REF, b, tmp_path / "o", quiet=True)
    loc, msg = e.value.problems[0]
    assert loc == str(b / "requests.parquet") and "first_scheduled_s" in msg


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 1 << 40), min_size=1, max_size=50))
def test_log2_buckets_hold_their_tokens_in_order(xs):
    b = log2_bucket(xs)
    for x, k in zip(xs, b.tolist()):
        lo, hi = bucket_range(k)
        assert lo <= x <= hi
    order = np.argsort(xs, kind="stable")
    assert (np.diff(b[order]) >= 0).all()  # monotone in the tokens


_span = st.floats(0.0, 50.0, allow_nan=False)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(_span, _span, _span, _span, _span, _span, _span, st.booleans()), min_size=1, max_size=30))
def test_phases_split_the_mean_e2e_error_exactly(reqs):
    """For any two runs of the same requests: queueing + prefill span + decode span is each
    request's E2E, so the phases' mean differences add up to the mean E2E difference."""
    from types import SimpleNamespace

    def run(which: int) -> SimpleNamespace:
        arr = np.array([r[0] for r in reqs])
        q, p, d = (np.array([r[1 + 3 * which + j] if 1 + 3 * which + j < 7 else r[j + 1] for r in reqs])
                   for j in range(3))
        fin = np.array([r[7] or which == 0 for r in reqs])
        sched = arr + q
        first = sched + p
        t = pa.table({"request_id": np.arange(len(reqs)), "status": np.where(fin, "finished", "rejected"),
                      "arrival_s": arr, "first_scheduled_s": np.where(fin, sched, np.nan),
                      "first_token_s": np.where(fin, first, np.nan), "finish_s": np.where(fin, first + d, np.nan)})
        return SimpleNamespace(requests=t)

    a, b = run(0), run(1)
    rp = request_phases(a, b)
    both = np.array([r[7] for r in reqs])
    assert rp["n"] == both.sum()
    if rp["n"] == 0:
        assert rp["e2e_mean_diff_s"] is None
        return
    total = sum(ph["mean_diff_s"] for ph in rp["phases"].values())
    assert total == pytest.approx(rp["e2e_mean_diff_s"], abs=1e-9)
    if rp["e2e_mean_s_a"]:
        shares = sum(ph["share_of_e2e_a"] for ph in rp["phases"].values())
        assert shares == pytest.approx(rp["e2e_mean_diff_s"] / rp["e2e_mean_s_a"], abs=1e-9)
    for ph in rp["phases"].values():
        for s in STATS:
            if ph["a"][s] is not None:
                assert ph["a"][s] >= 0 and ph["b"][s] >= 0
