"""`sim sweep`: points, resumption, the results table, knee and Pareto flags, errors."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from servesim.sim.cli import main
from servesim.sim.sweep import (Knee, SweepFile, expand, knee_flags, load_sweep, pareto_flags, run_sweep)
from servesim.sim.types import ConfigError

EXPERIMENT = """
name: tiny
model: llama-3.2-1b
hardware: h100-sxm
workload:
  trace: azure_conv
  num_requests: 60
  max_prompt_len: 2000
  max_output_len: 40
  slo: {ttft_s: 0.5, tpot_s: 0.02}
scheduler: {max_batch_size: 32, max_num_tokens: 4096}
output: {plots: false, timeline: false}
variants:
  - name: a
  - name: b
    scheduler: {max_batch_size: 8}
"""


def write(tmp_path: Path, sweep: dict, experiment: str = EXPERIMENT) -> Path:
    (tmp_path / "exp.yaml").write_text(experiment)
    doc = {"name": "t", "base": "exp.yaml", **sweep}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return tmp_path / "sweep.yaml"


GRID = {"variant": "b", "grid": {"workload.target_rate_req_s": [5, 20, 80], "scheduler.max_batch_size": [4, 16]}}


def test_grid_runs_resumes_and_grows(tmp_path):
    sweep = load_sweep(write(tmp_path, GRID))
    assert [p.params for p in sweep.points][:2] == [
        {"workload.target_rate_req_s": 5, "scheduler.max_batch_size": 4},
        {"workload.target_rate_req_s": 5, "scheduler.max_batch_size": 16}]
    assert len({p.config_sha256 for p in sweep.points}) == 6
    out = tmp_path / "out"
    res = run_sweep(sweep, out, jobs=1, progress=False)
    assert (res["ran"], res["skipped"], res["failed"]) == (6, 0, 0)
    df = res["table"].to_pandas()
    assert list(df.point) == list(range(6)) and (df.status == "ok").all()
    assert (df.gpus == 1).all() and (df.num_finished == 60).all()
    # the offered rate is the one asked for; the ttft/tpot/e2e percentiles are ordered
    assert df.offered_rate_req_s.round(6).tolist() == [5, 5, 20, 20, 80, 80]
    for k in ("ttft_s", "tpot_s", "e2e_s"):
        assert (df[f"{k}_p50"] <= df[f"{k}_p90"]).all() and (df[f"{k}_p90"] <= df[f"{k}_p99"]).all()
    # each point's row is the summary `sim run` writes for that config
    p = sweep.points[3]
    assert (out / "points" / f"{p.config_sha256}.json").is_file()
    for f in ("results.parquet", "latency_vs_load.png", "pareto.png"):
        assert (out / f).is_file(), f
    first = (out / "results.parquet").read_bytes()
    # again: nothing runs, the same table
    res2 = run_sweep(load_sweep(tmp_path / "sweep.yaml"), out, jobs=1, progress=False, plots=False)
    assert (res2["ran"], res2["skipped"]) == (0, 6)
    assert (out / "results.parquet").read_bytes() == first
    # a grid grown by one value runs only the new points
    grown = {**GRID, "grid": {**GRID["grid"], "scheduler.max_batch_size": [4, 16, 32]}}
    res3 = run_sweep(load_sweep(write(tmp_path, grown)), out, jobs=1, progress=False, plots=False)
    assert (res3["ran"], res3["skipped"]) == (3, 6)
    df3 = res3["table"].to_pandas()
    # a point written by another version of the simulator runs again
    f = out / "points" / f"{sweep.points[0].config_sha256}.json"
    doc = json.loads(f.read_text())
    f.write_text(json.dumps({**doc, "code_version": "0.0.0+other"}))
    res4 = run_sweep(load_sweep(tmp_path / "sweep.yaml"), out, jobs=1, progress=False, plots=False)
    assert (res4["ran"], res4["skipped"]) == (1, 8)
    assert json.loads(f.read_text())["code_version"] != "0.0.0+other"
    old = df.set_index("config_sha256").drop(columns=["point", "knee", "saturated", "pareto"])
    new = df3.set_index("config_sha256").loc[old.index, old.columns]
    assert new.equals(old)


def test_point_matches_sim_run(tmp_path):
    """A sweep point's metrics are the summary of `sim run` with the same --set pairs."""
    sweep = load_sweep(write(tmp_path, {"variant": "b", "grid": {"workload.target_rate_req_s": [40]}}))
    df = run_sweep(sweep, tmp_path / "out", jobs=1, progress=False, plots=False)["table"].to_pandas()
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(["run", str(tmp_path / "exp.yaml"), "--only", "b", "--out", str(tmp_path / "run"),
                   "--set", "workload.target_rate_req_s=40"])
    assert rc == 0
    s = json.loads((tmp_path / "run" / "b" / "summary.json").read_text())
    for k in ("ttft_s", "tpot_s", "e2e_s"):
        for q in ("p50", "p90", "p99"):
            assert df[f"{k}_{q}"].iloc[0] == s[k][q]
    assert df.throughput_out_tok_s.iloc[0] == s["throughput_out_tok_s"]
    assert df.config_sha256.iloc[0] == json.loads((tmp_path / "run" / "experiment.json").read_text())[
        "runs"]["b"]["config_sha256"]


def test_processes_give_the_same_table(tmp_path):
    path = write(tmp_path, GRID)
    a = run_sweep(load_sweep(path), tmp_path / "one", jobs=1, progress=False, plots=False)["table"]
    b = run_sweep(load_sweep(path), tmp_path / "two", jobs=2, progress=False, plots=False)["table"]
    assert a.equals(b, check_metadata=True)


def test_random_sample_is_seeded_and_in_range(tmp_path):
    rnd = {"random": {"samples": 12, "seed": 3, "params": {
        "workload.target_rate_req_s": {"uniform": [1, 50], "round": 2},
        "scheduler.max_batch_size": {"choice": [4, 8, 16]},
        "kv_cache.tokens_per_block": {"choice": [16, 32]},
        "workload.num_requests": {"randint": [10, 30]}}}}
    a = load_sweep(write(tmp_path, rnd))
    b = load_sweep(tmp_path / "sweep.yaml")
    assert [p.params for p in a.points] == [p.params for p in b.points]
    for p in a.points:
        assert 1 <= p.params["workload.target_rate_req_s"] < 50
        assert p.params["scheduler.max_batch_size"] in (4, 8, 16)
        assert 10 <= p.params["workload.num_requests"] <= 30
    c = load_sweep(write(tmp_path, {"random": {**rnd["random"], "seed": 4}}))
    assert [p.params for p in c.points] != [p.params for p in a.points]


@pytest.mark.parametrize("sweep, where, what", [
    ({"grid": {"scheduler.max_batch_size": [8, 0]}}, "point 1 (scheduler.max_batch_size=0)",
     "scheduler.max_batch_size"),
    ({"grid": {"scheduler.max_batch_sise": [8]}}, "point 0", "unknown key"),
    ({"grid": {"scheduler.max_batch_size": []}}, "sweep.yaml", "empty list"),
    ({}, "sweep.yaml", "exactly one of 'grid' and 'random'"),
    ({"grid": {"seed": [1]}, "variant": "zz"}, "sweep.yaml: variant", "no variant 'zz'"),
    ({"grid": {"seed": [1]}, "load_key": "x"}, "sweep.yaml", "not a swept key"),
    ({"random": {"samples": 2, "params": {"seed": {"uniform": [5, 1]}}}}, "sweep.yaml", "must be below"),
    ({"random": {"samples": 2, "params": {"seed": {"choice": [1], "randint": [1, 2]}}}}, "sweep.yaml",
     "exactly one of choice"),
])
def test_bad_sweep_files_name_the_key(tmp_path, sweep, where, what):
    path = write(tmp_path, sweep)
    with pytest.raises(ConfigError) as e:
        load_sweep(path)
    text = "\n".join(f"{loc}: {msg}" for loc, msg in e.value.problems)
    assert where in text and what in text, text
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert main(["sweep", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "Traceback" not in err.getvalue()


def test_unrunnable_point_is_a_failed_row_not_a_crash(tmp_path):
    """A config that validates but cannot run (70B weights on one GPU) is an error row."""
    path = write(tmp_path, {"grid": {"model": ["llama-3.2-1b", "llama-3.1-70b"]}})
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert main(["sweep", str(path), "--out", str(tmp_path / "o"), "--jobs", "1"]) == 1
    df = pq.read_table(tmp_path / "o" / "results.parquet").to_pandas()
    assert df.status.tolist() == ["ok", "error"]
    assert "GB of weights per GPU" in df.error.iloc[1]


# ----------------------------------------------------------------- the flags' invariants

# values from a small set too, so that ties in x, in y and in both are common
_v = st.one_of(st.floats(0, 1e4, allow_nan=False), st.sampled_from([1.0, 2.0, 3.0]))
rows_st = st.lists(st.tuples(_v, _v), min_size=1, max_size=30)


@settings(max_examples=60, deadline=None)
@given(rows_st)
def test_pareto_front_is_exactly_the_undominated(pts):
    rows = [{"status": "ok", "out_tok_s_per_gpu": x, "ttft_s_p99": y} for x, y in pts]
    flags = pareto_flags(rows)

    def dominated(p):
        return any(q[0] >= p[0] and q[1] <= p[1] and q != p for q in pts)

    assert flags == [not dominated(p) for p in pts]
    assert any(flags)  # a non-empty set always has an undominated point


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([1, 2]), st.floats(0.1, 100), st.floats(1e-3, 100),
                          st.floats(0.05, 1.0)), min_size=1, max_size=20, unique_by=lambda t: (t[0], t[1])),
       st.floats(1.5, 10), st.floats(0.5, 1.0))
def test_knee_is_the_first_saturated_point_of_each_curve(pts, factor, ratio):
    rows = [{"point": i, "status": "ok", "b": b, "rate": rate, "ttft_s_p99": ttft,
             "throughput_req_s": rate * share, "offered_rate_req_s": rate}
            for i, (b, rate, ttft, share) in enumerate(pts)]
    flags = knee_flags(rows, "rate", ["rate", "b"], Knee(ttft_factor=factor, throughput_ratio=ratio))
    for b in (1, 2):
        idx = sorted((i for i, r in enumerate(rows) if r["b"] == b), key=lambda i: rows[i]["rate"])
        if not idx:
            continue
        ref = rows[idx[0]]["ttft_s_p99"]
        sat = [rows[i]["ttft_s_p99"] > factor * ref or rows[i]["throughput_req_s"] < ratio * rows[i]["rate"]
               for i in idx]
        assert [flags[i][0] for i in idx] == sat
        knees = [i for i in idx if flags[i][1]]
        assert len(knees) == (1 if any(sat) else 0)
        if knees:
            assert knees[0] == idx[sat.index(True)]


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.sampled_from(["a.x", "a.y", "b", "c.d.e"]), st.lists(st.integers(0, 9), min_size=1,
                                                                                    max_size=4), min_size=1))
def test_grid_expansion_is_the_full_product(grid):
    spec = SweepFile.model_validate({"name": "g", "base": "x.yaml", "grid": grid})
    pts = expand(spec)
    assert len(pts) == math.prod(len(v) for v in grid.values())
    for p in pts:
        assert list(p) == list(grid) and all(p[k] in grid[k] for k in grid)
    assert len({json.dumps(p, sort_keys=True) for p in pts}) == math.prod(len(set(v)) for v in grid.values()) or \
        any(len(set(v)) < len(v) for v in grid.values())


@pytest.mark.ray
def test_ray_local_gives_the_same_table(tmp_path):
    """Marked `ray` (a local Ray instance takes ~7 s to start and stop on 2 cores); skipped
    without the ray extra."""
    pytest.importorskip("ray")
    path = write(tmp_path, GRID)
    a = run_sweep(load_sweep(path), tmp_path / "local", jobs=1, progress=False, plots=False)
    b = run_sweep(load_sweep(path), tmp_path / "ray", jobs=2, ray_address="local", progress=False, plots=False)
    assert a["table"].equals(b["table"], check_metadata=True)
    assert (tmp_path / "local" / "results.parquet").read_bytes() == (tmp_path / "ray" / "results.parquet").read_bytes()


def test_committed_sweep_and_search_files_load():
    from servesim.sim.search import load_search

    repo = Path(__file__).resolve().parents[1]
    sweeps = sorted((repo / "experiments" / "sweeps").glob("*.yaml"))
    searches = sorted((repo / "experiments" / "search").glob("*.yaml"))
    assert sweeps and searches
    for f in sweeps:
        s = load_sweep(f)
        assert len(s.points) >= 50 and s.load_key is not None
    for f in searches:
        s = load_search(f)
        assert any(not sh.pruned for sh in s.shapes)


def test_output_folder_that_is_a_file(tmp_path):
    path = write(tmp_path, {"grid": {"seed": [1]}})
    (tmp_path / "taken").write_text("x")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert main(["sweep", str(path), "--out", str(tmp_path / "taken")]) == 2
    assert "is a file, not a folder" in err.getvalue() and "Traceback" not in err.getvalue()
