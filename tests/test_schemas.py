"""The output tables' declared schemas (sim/schemas.py): writers build by name, files carry
their version, readers refuse versions they do not know, and nothing claims a feature
that does not exist."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from servesim.sim import schemas
from servesim.sim.records import DERIVED, IterationRecord, StretchRecord
from servesim.sim.types import ConfigError

from engine_harness import run_engine

REPO = Path(__file__).resolve().parents[1]


def test_every_field_has_unit_and_doc():
    for kind, schema in schemas.SCHEMAS.items():
        assert schema.metadata[schemas.VERSION_KEY] == str(schemas.SCHEMA_VERSION).encode()
        assert schema.metadata[schemas.TABLE_KEY] == kind.encode()
        for f in schema:
            assert f.metadata and b"unit" in f.metadata and f.metadata[b"doc"], f.name


def test_engine_record_is_the_schema():
    req_cols = [n for n in schemas.ITERATIONS.names if n not in schemas.OPTIONAL["iterations"]]
    assert set(IterationRecord._fields) == set(req_cols) - set(DERIVED)
    assert StretchRecord._fields[:3] == ("g0", "K", "t0")


def test_run_tables_follow_the_schema():
    rows = [(0.01 * i, 5 + 7 * i % 30, 3 + i % 9) for i in range(20)]
    _, _, it, req = run_engine(rows, stepwise=False)
    for table, schema in ((it, schemas.ITERATIONS), (req.table, schemas.REQUESTS)):
        want = [f for f in schema if f.name in table.column_names]
        assert table.schema.names == [f.name for f in want]
        for f in want:
            assert table.schema.field(f.name).type == f.type
            assert table.schema.field(f.name).nullable == f.nullable
    assert it.num_rows > 0 and set(schemas.ITERATIONS.names) - set(it.column_names) == set(schemas.OPTIONAL["iterations"])


def test_build_table_errors_name_the_column():
    cols = {n: np.zeros(2) for n in schemas.ITERATIONS.names if n not in schemas.OPTIONAL["iterations"]}
    schemas.build_table("iterations", cols)  # complete: fine
    with pytest.raises(ValueError, match="bogus"):
        schemas.build_table("iterations", {**cols, "bogus": np.zeros(2)})
    del cols["kv_blocks_used"]
    with pytest.raises(ValueError, match="kv_blocks_used missing"):
        schemas.build_table("iterations", cols)
    cols["kv_blocks_used"] = pa.array([1, None], type=pa.int64())
    with pytest.raises(ValueError, match="kv_blocks_used has nulls"):
        schemas.build_table("iterations", cols)


def test_fill_values_are_typed():
    assert schemas.fill_value(schemas.ITERATIONS, "ctx_tokens") == 0
    assert schemas.fill_value(schemas.ITERATIONS, "start_s") is None


def _run(tmp_path: Path) -> Path:
    exp = tmp_path / "e.yaml"
    exp.write_text("name: e\nmodel: llama-3.2-1b\nhardware: h100-sxm\n"
                   "workload: {synthetic: {num_requests: 20, prompt_len: 64, output_len: 8, "
                   "arrival: {kind: poisson, rate_req_s: 50}}}\noutput: {plots: false, timeline: false}\n")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "servesim.sim.cli", "run", str(exp), "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out / "base"


def test_files_carry_version_and_other_versions_are_refused(tmp_path):
    run = _run(tmp_path)
    for name in ("requests", "iterations"):
        meta = pq.read_schema(run / f"{name}.parquet").metadata
        assert meta[schemas.VERSION_KEY] == str(schemas.SCHEMA_VERSION).encode()
        assert meta[schemas.TABLE_KEY] == name.encode()
        schemas.read_run_table(run / f"{name}.parquet", name)  # reads back
    # a run of another (future or unknown) version: a clear error naming the file
    t = pq.read_table(run / "iterations.parquet")
    meta = dict(t.schema.metadata)
    meta[schemas.VERSION_KEY] = b"99"
    pq.write_table(t.replace_schema_metadata(meta), run / "iterations.parquet")
    with pytest.raises(ConfigError, match="schema version 99") as e:
        schemas.read_run_table(run / "iterations.parquet", "iterations")
    assert "iterations.parquet" in str(e.value)
    r = subprocess.run([sys.executable, "-m", "servesim.sim.cli", "compare", str(run), str(run)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "schema version 99" in r.stderr and "Traceback" not in r.stderr


def test_pre_schema_runs_are_read(tmp_path):
    """Version 1 (no version key: the layout before declared schemas) stays readable: the
    committed GPU runs are of that version."""
    run = _run(tmp_path)
    t = pq.read_table(run / "iterations.parquet")
    pq.write_table(t.replace_schema_metadata(None), run / "iterations.parquet")
    assert schemas.file_version(pq.read_schema(run / "iterations.parquet")) == 1
    assert schemas.read_run_table(run / "iterations.parquet", "iterations", ("duration_s",)).num_rows == t.num_rows


def test_summary_names_both_hit_rates(tmp_path):
    run = _run(tmp_path)
    s = json.loads((run / "summary.json").read_text())
    assert "prefix_hit_rate" in s and "prefix_hit_rate_all_requests" in s
    assert s["spec_acceptance_rate"] is None  # no speculative decoding in this run


def test_hit_rate_over_finished_and_over_all_requests():
    from servesim.sim.metrics import summarize

    nan = float("nan")
    req = schemas.build_table("requests", {
        "request_id": [0, 1], "replica": [0, 0], "status": ["finished", "rejected"], "reject_reason": ["", "kv_pool"],
        "arrival_s": [0.0, 0.0], "first_scheduled_s": [0.0, nan], "first_token_s": [0.5, nan],
        "finish_s": [1.0, nan], "prompt_len": [100, 1000], "output_len": [2, 5], "cached_tokens": [50, 0],
        "preemptions": [0, 0], "priority": [0, 0], "tenant": ["", ""], "slo_ttft_s": [nan, nan],
        "slo_tpot_s": [nan, nan], "token_times": pa.array([[0.5, 1.0], []], type=pa.list_(pa.float64()))})
    it_cols = {n: np.zeros(1) for n in schemas.ITERATIONS.names if n not in schemas.OPTIONAL["iterations"]}
    it_cols["duration_s"] = np.ones(1)
    s = summarize(req, schemas.build_table("iterations", it_cols), kv_total_blocks=10, backend="sim", wall_s=0)
    assert s["prefix_hit_rate"] == 0.5  # the finished request's prompt tokens
    assert s["prefix_hit_rate_all_requests"] == 50 / 1100  # every request's, the rejected one's too
