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

from servesim.sim.cli import main
from servesim.sim.compare import compare_runs
from servesim.sim.types import ConfigError

DATA = Path(__file__).parent / "data" / "compare"
REF = DATA / "reference"
ROOF = DATA / "roofline"

TOP_KEYS = {"schema_version", "reference", "rel_err", "run_a", "run_b", "warnings", "config_diff",
            "metrics", "requests", "iterations", "throughput_over_time"}
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
