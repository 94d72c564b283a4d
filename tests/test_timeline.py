"""`sim timeline RUN_DIR`: every iteration and request of a finished run as a Chrome trace,
read in batches (the output does not depend on the batch size), with window and replica
filters, and clear errors."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import servesim.sim.timeline as tl
from servesim.sim.cli import main

EXPERIMENT = """
name: tl
model: llama-3.2-1b
hardware: h100-sxm
workload:
  trace: azure_conv
  num_requests: 120
  rate_scale: 8.0
  max_prompt_len: 2000
  max_output_len: 30
scheduler: {max_batch_size: 16, max_num_tokens: 4096}
cluster: {replicas: 2}
output: {plots: false, timeline: false}
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tl")
    (d / "exp.yaml").write_text(EXPERIMENT)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["run", str(d / "exp.yaml"), "--out", str(d / "out")]) == 0
    return d / "out" / "base"


def test_every_iteration_and_request(run_dir, tmp_path):
    out = tmp_path / "t.json"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["timeline", str(run_dir), "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    ev = doc["traceEvents"]
    it = pq.read_table(run_dir / "iterations.parquet")
    req = pq.read_table(run_dir / "requests.parquet").to_pandas()
    slices = [e for e in ev if e["ph"] == "X"]
    assert len(slices) == it.num_rows == doc["otherData"]["iterations_written"]
    assert {e["pid"] for e in slices} == {0, 1}
    # per replica, slices never overlap (ts + dur <= next ts)
    for r in (0, 1):
        s = sorted((e for e in slices if e["pid"] == r), key=lambda e: e["ts"])
        assert all(a["ts"] + a["dur"] <= b["ts"] + 1e-6 for a, b in zip(s, s[1:]))
    # requests: balanced b/e per (id, name); queued <= prefill <= decode, inside the request span
    spans = defaultdict(dict)
    for e in ev:
        if e.get("cat") == "request":
            spans[e["id"]].setdefault(e["name"], {})[e["ph"]] = e["ts"]
    fin = req[req.status == "finished"]
    assert set(spans) == set(fin.request_id) and doc["otherData"]["requests_written"] == len(fin)
    for rid, sp in spans.items():
        assert all(set(v) == {"b", "e"} and v["b"] <= v["e"] for v in sp.values()), sp
        row = fin[fin.request_id == rid].iloc[0]
        assert sp["request"]["b"] == pytest.approx(row.arrival_s * 1e6, abs=1e-3)
        assert sp["request"]["e"] == pytest.approx(row.finish_s * 1e6, abs=1e-3)
        order = [sp[k] for k in ("queued", "prefill", "decode") if k in sp]
        assert all(a["e"] <= b["b"] + 1e-6 for a, b in zip(order, order[1:]))
        assert "prefill" in sp


@pytest.fixture(scope="module")
def whole(run_dir, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("whole")
    tl.write_run_trace(run_dir, d / "all.json")
    return json.loads((d / "all.json").read_text())


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(1, 3000))
def test_output_does_not_depend_on_the_batch_size(run_dir, whole, tmp_path_factory, rows):
    d = tmp_path_factory.mktemp("b")
    old = tl.BATCH_ROWS
    try:
        tl.BATCH_ROWS = rows
        tl.write_run_trace(run_dir, d / "small.json")
    finally:
        tl.BATCH_ROWS = old
    a = whole
    b = json.loads((d / "small.json").read_text())
    key = lambda e: json.dumps(e, sort_keys=True)  # noqa: E731
    assert sorted(map(key, a["traceEvents"])) == sorted(map(key, b["traceEvents"]))


def test_window_replicas_and_gzip(run_dir, tmp_path):
    it = pq.read_table(run_dir / "iterations.parquet").to_pandas()
    mid = float(it.start_s.median())
    lo, hi = mid * 0.8, mid * 1.2
    out = tmp_path / "w.json.gz"
    c = tl.write_run_trace(run_dir, out, start=lo, end=hi, replicas={1})
    doc = json.loads(gzip.open(out, "rt").read())
    sl = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    want = it[(it.replica == 1) & (it.start_s + it.duration_s >= lo) & (it.start_s <= hi)]
    assert len(sl) == len(want) == c["iterations_written"] > 0
    assert all(e["pid"] == 1 for e in doc["traceEvents"] if "pid" in e)
    for e in doc["traceEvents"]:
        if e.get("cat") == "request" and e["name"] == "request":
            assert (e["ph"] == "b" and e["ts"] <= hi * 1e6 + 1e-3) or (e["ph"] == "e" and e["ts"] >= lo * 1e6 - 1e-3)


@pytest.mark.parametrize("args, what", [
    (["--start", "5", "--end", "1"], "must be after --start"),
    (["--replicas", "a,b"], "give replica numbers"),
    (["--start", "-1"], "expected a time in seconds"),
])
def test_bad_arguments(run_dir, args, what):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert main(["timeline", str(run_dir), *args]) == 2
    assert what in err.getvalue() and "Traceback" not in err.getvalue()


def test_not_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert main(["timeline", str(tmp_path / "empty")]) == 2
        assert main(["timeline", str(tmp_path / "nope")]) == 2
    assert "not a finished run" in err.getvalue() and "not a run folder" in err.getvalue()
