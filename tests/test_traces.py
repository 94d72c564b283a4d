"""Tests of servesim.traces: readers, schema, generators, transforms, config + builder."""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from servesim.sim.types import ConfigError
from servesim.traces import synthetic, transforms
from servesim.traces.fingerprint import workload_fingerprint
from servesim.traces.readers import BUNDLED_TRACES, DATA_DIR, read_azure, read_mooncake, read_table, read_trace
from servesim.traces.schema import make_workload, present_columns, validate_workload
from servesim.traces.spec import WorkloadConfig, build_workload, parse_workload_config
from servesim.traces.writers import write_table

AZURE = DATA_DIR / "AzureLLMInferenceTrace_conv.csv"
MOONCAKE = DATA_DIR / "mooncake_conversation_trace.jsonl"
HYP = settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------- reference values (stdlib only)


@pytest.fixture(scope="module")
def azure_ref():
    with AZURE.open(newline="") as f:
        rows = list(csv.reader(f))
    body = rows[1:]
    times = [dt.datetime.strptime(r[0][:26], "%Y-%m-%d %H:%M:%S.%f") for r in body]  # 7 digits -> us
    return {
        "header": rows[0],
        "n": len(body),
        "prompt": [int(r[1]) for r in body],
        "output": [int(r[2]) for r in body],
        "span_s": (times[-1] - times[0]).total_seconds(),
    }


@pytest.fixture(scope="module")
def mooncake_ref():
    with MOONCAKE.open() as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def azure_df():
    return read_azure(AZURE)


@pytest.fixture(scope="module")
def mooncake_df():
    return read_mooncake(MOONCAKE)


# ---------------------------------------------------------------------- shipped data


def test_shipped_files_and_licenses_exist():
    for name in (
        "AzureLLMInferenceTrace_conv.csv",
        "mooncake_conversation_trace.jsonl",
        "LICENSE-AzurePublicDataset",
        "LICENSE-Mooncake",
        "README.md",
    ):
        assert (DATA_DIR / name).is_file(), name
    readme = (DATA_DIR / "README.md").read_text()
    assert "CC-BY 4.0" in readme and "Apache-2.0" in readme
    assert "Splitwise" in readme and "Mooncake" in readme and "FAST 2025" in readme and "ISCA 2024" in readme


def test_package_init_is_light():
    code = "import sys, servesim.traces; print('pandas' in sys.modules, 'numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


# ---------------------------------------------------------------------- Azure reader


def test_azure_shipped_trace(azure_df, azure_ref):
    df = azure_df
    assert azure_ref["header"] == ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]
    assert len(df) == azure_ref["n"] == 19_366
    exp_prompt = sum(azure_ref["prompt"]) / azure_ref["n"]
    exp_output = sum(azure_ref["output"]) / azure_ref["n"]
    assert 1154.6 < exp_prompt < 1154.8 and 211.0 < exp_output < 211.2
    assert df["prompt_len"].mean() == pytest.approx(exp_prompt, rel=1e-12)
    assert df["output_len"].mean() == pytest.approx(exp_output, rel=1e-12)
    assert df["prompt_len"].tolist() == azure_ref["prompt"]  # order kept (the file is sorted)
    assert df["output_len"].tolist() == azure_ref["output"]
    arr = df["arrival_s"].to_numpy()
    assert arr[0] == 0.0
    assert (np.diff(arr) >= 0).all()
    assert arr[-1] == pytest.approx(azure_ref["span_s"], abs=1e-5)
    assert df["request_id"].tolist() == list(range(len(df)))
    assert list(df.columns) == ["request_id", "arrival_s", "prompt_len", "output_len"]
    assert [str(t) for t in df.dtypes] == ["int64", "float64", "int64", "int64"]
    validate_workload(df, "azure")


def test_azure_2024_format(tmp_path):
    p = tmp_path / "AzureLLMInferenceTrace_code_2024.csv"
    p.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2024-05-10 00:00:00.009930+00:00,4808,10\n"
        "2024-05-10 00:00:00.2+00:00,3180,8\n"
        "2024-05-10 00:00:01+00:00,110,27\n"
        "2024-05-10T02:00:02.5+02:00,7433,14\n"
    )
    df = read_azure(p)
    assert df["arrival_s"].tolist() == pytest.approx([0.0, 0.19007, 0.99007, 2.49007])
    assert df["prompt_len"].tolist() == [4808, 3180, 110, 7433]
    assert df["output_len"].tolist() == [10, 8, 27, 14]
    assert read_trace(p).equals(df)  # auto-detected from the header


def test_azure_unsorted_rows_are_sorted_stably(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:00:02,1,1\n2023-11-16 18:00:01,2,2\n2023-11-16 18:00:02,3,3\n"
    )
    df = read_azure(p)
    assert df["arrival_s"].tolist() == [0.0, 1.0, 1.0]
    assert df["prompt_len"].tolist() == [2, 1, 3]
    assert df["request_id"].tolist() == [0, 1, 2]


AZ_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
AZ_ROW = "2023-11-16 18:15:46.6805900,374,44\n"


@pytest.mark.parametrize(
    "bad_line, what",
    [
        ("2023-11-16 18:15:47.1,37x4,44\n", "ContextTokens"),
        ("2023-11-16 18:15:47.1,374,0\n", "GeneratedTokens"),
        ("2023-11-16 18:15:47.1,374,-3\n", "GeneratedTokens"),
        ("2023-11-16 18:15:47.1,374\n", "GeneratedTokens"),  # too few fields
        ("2023-11-16 18:15:47.1,374,44,9\n", "fields, saw 4"),  # too many fields
        ("not a time,374,44\n", "TIMESTAMP"),
        (",374,44\n", "TIMESTAMP"),
    ],
)
@pytest.mark.parametrize("line_no", [2, 3, 6])
def test_azure_malformed_line_is_named(tmp_path, bad_line, what, line_no):
    lines = [AZ_ROW] * 5
    lines[line_no - 2] = bad_line
    p = tmp_path / "bad.csv"
    p.write_text(AZ_HEADER + "".join(lines))
    with pytest.raises(ConfigError) as e:
        read_azure(p)
    msg = str(e.value)
    assert f"line {line_no}:" in msg and str(p) in msg and what in msg


@pytest.mark.parametrize("line_no", [2, 4])
def test_azure_blank_line_inside_is_an_error(tmp_path, line_no):
    lines = [AZ_ROW] * 4
    lines[line_no - 2] = "\n"
    p = tmp_path / "blank.csv"
    p.write_text(AZ_HEADER + "".join(lines))
    with pytest.raises(ConfigError, match=f"line {line_no}: ContextTokens must be an integer >= 1, got an empty cell"):
        read_azure(p)


def test_azure_numeric_seconds_timestamps(tmp_path):
    p = tmp_path / "s.csv"
    p.write_text("timestamp,contexttokens,generatedtokens,extra\n10.5,3,4,x\n12,5,6,y\n")
    df = read_azure(p)
    assert df["arrival_s"].tolist() == [0.0, 1.5] and df["prompt_len"].tolist() == [3, 5]


def test_azure_header_problems(tmp_path):
    p = tmp_path / "h.csv"
    p.write_text("TIME,ContextTokens,GeneratedTokens\n" + AZ_ROW)
    with pytest.raises(ConfigError, match=r"line 1: .*missing column\(s\) \['TIMESTAMP'\]"):
        read_azure(p)
    p.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        read_azure(p)
    p.write_text(AZ_HEADER)
    with pytest.raises(ConfigError, match="no requests"):
        read_azure(p)


def test_trailing_blank_lines_are_fine(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text(AZ_HEADER + AZ_ROW + AZ_ROW + "\n\n")
    assert len(read_azure(p)) == 2


@pytest.mark.parametrize("reader", [read_azure, read_mooncake, read_table, read_trace])
def test_missing_file(tmp_path, reader):
    p = tmp_path / "nope" / "trace.csv"
    with pytest.raises(ConfigError, match="file not found") as e:
        reader(p)
    assert str(p) in str(e.value)


# ---------------------------------------------------------------------- Mooncake reader


def test_mooncake_shipped_trace(mooncake_df, mooncake_ref):
    df, ref = mooncake_df, mooncake_ref
    assert len(df) == len(ref) == 12_031
    assert df.attrs["hash_block_size"] == 512
    # What the file satisfies: one hash per 512-token block, the last one partial.
    assert all(len(r["hash_ids"]) == math.ceil(r["input_length"] / 512) for r in ref)
    assert (df["block_hashes"].map(len).to_numpy() == -(-df["prompt_len"].to_numpy() // 512)).all()
    assert all(h[0] == 0 for h in df["block_hashes"])  # every request shares block 0
    assert df["arrival_s"].tolist() == [r["timestamp"] / 1000 for r in ref]  # the file is sorted
    assert df["prompt_len"].tolist() == [r["input_length"] for r in ref]
    assert df["output_len"].tolist() == [r["output_length"] for r in ref]
    assert [list(h) for h in df["block_hashes"]] == [r["hash_ids"] for r in ref]
    assert df["prompt_len"].mean() == pytest.approx(12_035.06, abs=0.01)
    assert df["output_len"].mean() == pytest.approx(342.62, abs=0.01)
    validate_workload(df, "mooncake")


MC = '{"timestamp": %s, "input_length": %s, "output_length": %s, "hash_ids": %s}\n'


@pytest.mark.parametrize(
    "bad, what",
    [
        (MC % (5, 600, 5, "[1]"), "hash_ids has 1 entries, expected ceil(input_length / 512) = 2"),
        (MC % (5, 600, 0, "[1, 2]"), "output_length must be an integer >= 1"),
        (MC % (5, 600.5, 3, "[1, 2]"), "input_length must be an integer"),
        (MC % (-1, 600, 3, "[1, 2]"), "timestamp must be"),
        (MC % (5, 600, 3, '[1, "2"]'), "hash_ids must be a list of integers"),
        ('{"timestamp": 5, "input_length": 600, "output_length": 3}\n', "missing key(s) ['hash_ids']"),
        ('{"timestamp": 5, "input_length": 600,\n', "invalid JSON"),
        ("[1, 2]\n", "expected a JSON object"),
    ],
)
def test_mooncake_malformed_line_is_named(tmp_path, bad, what):
    good = MC % (0, 600, 5, "[1, 2]")
    p = tmp_path / "m.jsonl"
    p.write_text(good + "\n" + good + bad + good)  # a blank line 2: the bad one is line 4
    with pytest.raises(ConfigError) as e:
        read_mooncake(p)
    assert f"{p}, line 4: " in str(e.value) and what in str(e.value)


def test_mooncake_unsorted_and_blank_lines(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text(MC % (2000, 10, 1, "[7]") + "\n" + MC % (1000, 513, 2, "[7, 8]"))
    df = read_trace(p)
    assert df["arrival_s"].tolist() == [1.0, 2.0]
    assert df["block_hashes"].tolist() == [(7, 8), (7,)]
    assert df.attrs["hash_block_size"] == 512


# ---------------------------------------------------------------------- schema, table I/O, fingerprint


def rich_table(n: int = 6) -> pd.DataFrame:
    prompt = np.arange(1, n + 1) * 5
    return make_workload(
        np.linspace(0, 2, n),
        prompt,
        np.arange(1, n + 1),
        hash_block_size=4,
        priority=np.arange(n) % 2,
        tenant=["a", "NA", "", "b,c", "a", "x"][:n],
        slo_ttft_s=[np.nan, 0.5] * (n // 2),
        slo_tpot_s=[0.05] * n,
        block_hashes=[None if i == 2 else tuple(range(i, i + -(-p // 4))) for i, p in enumerate(prompt)],
        prompt_tokens=[tuple(range(p)) if i % 2 else None for i, p in enumerate(prompt)],
    )


@pytest.mark.parametrize("ext", ["csv", "parquet"])
def test_table_roundtrip(tmp_path, ext):
    df = rich_table()
    validate_workload(df, "rich")
    p = write_table(df, tmp_path / f"w.{ext}")
    back = read_trace(p)  # auto: .parquet, or a .csv with our header
    cols = present_columns(df)
    assert present_columns(back) == cols
    assert back.attrs["hash_block_size"] == 4
    assert workload_fingerprint(back, cols) == workload_fingerprint(df, cols)
    assert back["tenant"].tolist() == df["tenant"].tolist()
    assert back["block_hashes"].tolist() == df["block_hashes"].tolist()


def test_table_csv_minimal_and_errors(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("arrival_s,prompt_len,output_len\n0,5,1\n0.5,7,2\n")
    df = read_table(p)
    assert df["request_id"].tolist() == [0, 1] and df["prompt_len"].tolist() == [5, 7]
    cases = [
        ("arrival_s,prompt_len,output_len,slo_ttft\n0,5,1,1\n", "line 1: unknown column(s) ['slo_ttft']"),
        ("arrival_s,prompt_len,output_len\n0,5,1\n1,0,1\n", "line 3: prompt_len must be >= 1"),
        ("arrival_s,prompt_len,output_len,slo_tpot_s\n0,5,1,\n1,5,1,-2\n", "line 3: slo_tpot_s must be > 0"),
        ("request_id,arrival_s,prompt_len,output_len\n3,0,5,1\n3,1,5,1\n", "line 3: request_id 3 is not unique"),
        ("arrival_s,prompt_len,output_len,block_hashes\n0,5,1,1 2\n", "needs its block size"),
        ("# hash_block_size=4\narrival_s,prompt_len,output_len,block_hashes\n0,5,1,1 2\n1,5,1,1 x\n", "line 4: block_hashes must be space-separated"),
        ("# hash_block_size=4\narrival_s,prompt_len,output_len,block_hashes\n0,5,1,1 2\n1,5,1,1 2 3\n", "line 4: block_hashes has 3 entries"),
        ("# hash_block_size=4\narrival_s,prompt_len,output_len,block_hashes\n0,5,1,1 2\n1,5,1,1 2,3\n", "line 4: malformed CSV"),
        ("arrival_s,prompt_len,output_len,prompt_tokens\n0,3,1,1 2 3\n1,3,1,1 2\n", "line 3: prompt_tokens has 2 entries"),
    ]
    for text, want in cases:
        p.write_text(text)
        with pytest.raises(ConfigError) as e:
            read_table(p)
        assert want in str(e.value), (text, str(e.value))


def test_validate_workload_names_source_and_first_bad_row():
    df = rich_table()
    bad = df.copy()
    bad.attrs = dict(df.attrs)
    bad.loc[4, "output_len"] = 0
    bad.loc[3, "prompt_len"] = -1
    with pytest.raises(ConfigError, match=r"^mysrc: row 3 \(request_id 3\): prompt_len must be >= 1"):
        validate_workload(bad, "mysrc")
    no_bs = df.copy()
    no_bs.attrs = {}
    with pytest.raises(ConfigError, match="hash_block_size"):
        validate_workload(no_bs, "x")
    with pytest.raises(ConfigError, match="missing column"):
        validate_workload(df.drop(columns="arrival_s"), "x")
    with pytest.raises(ConfigError, match="unknown column"):
        validate_workload(df.assign(foo=1), "x")
    with pytest.raises(ConfigError, match="dtype float64, expected int64"):
        validate_workload(make_workload([0.0], [3], [1]).astype({"prompt_len": float}), "x")


def test_fingerprint_sensitivity():
    df = make_workload([0.0, 1.0], [3, 4], [1, 2])
    fp = workload_fingerprint(df)
    assert fp == workload_fingerprint(make_workload([0.0, 1.0], [3, 4], [1, 2]))
    assert fp != workload_fingerprint(make_workload([0.0, 1.0 + 1e-12], [3, 4], [1, 2]))
    assert fp != workload_fingerprint(make_workload([0.0, 1.0], [3, 4], [2, 1]))
    assert len(fp) == 64


# ---------------------------------------------------------------------- generators (hypothesis)


rates = st.floats(0.01, 1000, allow_nan=False)
seeds = st.integers(0, 2**32 - 1)


@HYP
@given(n=st.integers(0, 2000), rate=rates, cv=st.floats(0.1, 5), seed=seeds, kind=st.sampled_from(["poisson", "gamma", "fixed", "offline"]))
def test_arrivals_sorted_and_start_at_zero(n, rate, cv, seed, kind):
    rng = np.random.default_rng(seed)
    arr = {
        "poisson": lambda: synthetic.poisson_arrivals(n, rate, rng),
        "gamma": lambda: synthetic.gamma_arrivals(n, rate, cv, rng),
        "fixed": lambda: synthetic.fixed_arrivals(n, rate),
        "offline": lambda: synthetic.offline_arrivals(n),
    }[kind]()
    assert arr.shape == (n,) and arr.dtype == np.float64
    assert np.isfinite(arr).all()
    if n:
        assert arr[0] == 0.0
        assert (np.diff(arr) >= 0).all()


@settings(deadline=None, max_examples=15)
@given(rate=st.floats(0.1, 100), seed=seeds)
def test_poisson_mean_rate(rate, seed):
    n = 50_000
    arr = synthetic.poisson_arrivals(n, rate, np.random.default_rng(seed))
    assert (n - 1) / arr[-1] == pytest.approx(rate, rel=0.03)  # 1/sqrt(n) = 0.45 %
    gaps = np.diff(arr)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)


@settings(deadline=None, max_examples=15)
@given(rate=st.floats(0.1, 100), cv=st.floats(0.2, 3.0), seed=seeds)
def test_gamma_rate_and_cv(rate, cv, seed):
    n = 50_000
    arr = synthetic.gamma_arrivals(n, rate, cv, np.random.default_rng(seed))
    gaps = np.diff(arr)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.10)
    assert (n - 1) / arr[-1] == pytest.approx(rate, rel=0.06)


def test_fixed_arrivals_exact():
    assert synthetic.fixed_arrivals(4, 2.0).tolist() == [0.0, 0.5, 1.0, 1.5]


length_specs = st.one_of(
    st.builds(lambda v: {"kind": "constant", "value": v}, st.integers(1, 5000)),
    st.builds(lambda a, b: {"kind": "uniform", "low": min(a, b), "high": max(a, b)}, st.integers(1, 5000), st.integers(1, 5000)),
    st.builds(lambda m, s: {"kind": "lognormal", "mean": m, "sigma": s}, st.floats(1, 10_000), st.floats(0, 2.5)),
    st.builds(lambda a, m: {"kind": "zipf", "a": a, "max": m}, st.floats(0.1, 3), st.integers(1, 20_000)),
    st.just({"kind": "empirical", "trace": "azure_conv"}),
)
bounds = st.tuples(st.integers(1, 300), st.one_of(st.none(), st.integers(300, 6000)))


@HYP
@given(spec=length_specs, bnd=bounds, seed=seeds, n=st.integers(1, 500))
def test_lengths_within_bounds_and_deterministic(spec, bnd, seed, n):
    lo, hi = bnd
    if spec["kind"] == "zipf":
        hi = max(spec.pop("max"), lo)
    cfg = {
        "synthetic": {
            "num_requests": n,
            "arrival": {"kind": "poisson", "rate_req_s": 3.0},
            "prompt_len": {**spec, "min": lo, "max": hi},
            "output_len": {**spec, "min": lo, "max": hi},
        }
    }
    w = parse_workload_config(cfg)
    a = build_workload(w, Path("."), seed)
    b = build_workload(w, Path("."), seed)
    pd.testing.assert_frame_equal(a, b)
    assert workload_fingerprint(a) == workload_fingerprint(b)
    for col in ("prompt_len", "output_len"):
        v = a[col].to_numpy()
        assert v.dtype == np.int64 and v.min() >= lo
        if hi is not None:
            assert v.max() <= hi
    assert a["request_id"].tolist() == list(range(n))
    validate_workload(a, "synthetic")


def test_different_seeds_differ_and_streams_are_independent():
    base = {
        "num_requests": 200,
        "arrival": {"kind": "poisson", "rate_req_s": 3.0},
        "prompt_len": {"kind": "lognormal", "mean": 800, "sigma": 1.0},
        "output_len": {"kind": "uniform", "low": 10, "high": 500},
    }
    a = build_workload(parse_workload_config({"synthetic": base}), ".", 1)
    b = build_workload(parse_workload_config({"synthetic": base}), ".", 2)
    assert not a.equals(b)
    # changing the prompt distribution leaves arrivals and outputs untouched
    c = build_workload(parse_workload_config({"synthetic": {**base, "prompt_len": 100}}), ".", 1)
    assert c["arrival_s"].equals(a["arrival_s"]) and c["output_len"].equals(a["output_len"])
    assert (c["prompt_len"] == 100).all()


def test_lognormal_mean_parameterisation():
    v = synthetic.lognormal_lengths(200_000, 1000.0, 0.8, np.random.default_rng(0))
    assert v.mean() == pytest.approx(1000, rel=0.02)
    assert np.median(v) == pytest.approx(1000 * math.exp(-0.32), rel=0.02)


def test_zipf_support_and_skew():
    v = synthetic.zipf_lengths(100_000, 1.5, 50, np.random.default_rng(0), lo=2)
    assert v.min() == 2 and v.max() == 50
    counts = np.bincount(v)
    assert counts[2] > counts[3] > counts[10] > counts[50]
    assert counts[2] / counts[4] == pytest.approx(2**1.5, rel=0.1)


# ---------------------------------------------------------------------- transforms


def test_rate_scale_halves_the_span(azure_df):
    out = transforms.scale_rate(azure_df, 2.0)
    assert out["arrival_s"].iloc[-1] == pytest.approx(azure_df["arrival_s"].iloc[-1] / 2)
    assert azure_df["arrival_s"].iloc[-1] > 3000  # input untouched
    assert transforms.mean_rate(out) == pytest.approx(2 * transforms.mean_rate(azure_df))


def test_target_rate_and_cut(azure_df):
    out = transforms.set_rate(transforms.first_n(azure_df, 1000), 20.0)
    assert len(out) == 1000 and transforms.mean_rate(out) == pytest.approx(20.0)
    assert out["prompt_len"].tolist() == azure_df["prompt_len"].iloc[:1000].tolist()


def test_time_window_rebased(azure_df):
    out = transforms.time_window(azure_df, 600.0, 900.0)
    arr = azure_df["arrival_s"].to_numpy()
    assert len(out) == int(((arr >= 600) & (arr < 900)).sum()) > 0
    assert out["arrival_s"].min() >= 0 and out["arrival_s"].max() < 300


def test_offline_and_caps(mooncake_df):
    df = transforms.first_n(mooncake_df, 200)
    out = transforms.cap_lengths(transforms.make_offline(df), max_prompt_len=1500, max_output_len=100)
    assert (out["arrival_s"] == 0).all()
    assert out["prompt_len"].max() == 1500 and out["output_len"].max() == 100
    validate_workload(out, "capped")  # block_hashes cut to ceil(1500/512) = 3 blocks
    assert out["block_hashes"].map(len).max() == 3
    assert df["prompt_len"].max() > 1500  # input untouched


def test_fill_slo_keeps_row_values():
    df = make_workload([0.0, 1.0], [3, 4], [1, 2], slo_ttft_s=[np.nan, 0.2])
    out = transforms.fill_slo(df, ttft_s=1.0, tpot_s=0.05)
    assert out["slo_ttft_s"].tolist() == [1.0, 0.2] and out["slo_tpot_s"].tolist() == [0.05, 0.05]
    assert present_columns(out) == list(out.columns)


# ---------------------------------------------------------------------- config + builder


def test_build_from_bundled_trace_with_transforms():
    cfg = parse_workload_config(
        {"trace": "azure_conv", "num_requests": 500, "rate_scale": 2.0, "max_prompt_len": 2048, "slo": {"ttft_s": 1.0}}
    )
    df = build_workload(cfg, Path("."), seed=0)
    raw = read_azure(AZURE).iloc[:500]
    assert len(df) == 500 and df["prompt_len"].max() <= 2048
    assert df["arrival_s"].iloc[-1] == pytest.approx(raw["arrival_s"].iloc[-1] / 2)
    assert (df["slo_ttft_s"] == 1.0).all() and "slo_tpot_s" not in df.columns


def test_build_trace_with_arrival_override_and_window():
    cfg = parse_workload_config(
        {"trace": "mooncake_conv", "window_s": [600, 1200], "arrival": {"kind": "gamma", "rate_req_s": 10, "cv": 3}}
    )
    a = build_workload(cfg, ".", seed=7)
    assert a.equals(build_workload(cfg, ".", seed=7))
    assert a.attrs["hash_block_size"] == 512
    assert a["arrival_s"].iloc[0] == 0.0
    raw = read_mooncake(MOONCAKE)
    sel = raw[(raw["arrival_s"] >= 600) & (raw["arrival_s"] < 1200)]
    assert a["prompt_len"].tolist() == sel["prompt_len"].tolist()  # same requests, new times
    offline = build_workload(parse_workload_config({"trace": "mooncake_conv", "arrival": {"kind": "offline"}, "num_requests": 10}), ".", 0)
    assert (offline["arrival_s"] == 0).all()


def test_build_relative_path_and_missing(tmp_path):
    write_table(make_workload([0.0, 1.0, 3.0], [3, 4, 5], [1, 2, 3]), tmp_path / "w.parquet")
    cfg = parse_workload_config({"trace": "w.parquet", "target_rate_req_s": 4.0})
    df = build_workload(cfg, tmp_path, 0)
    assert df["arrival_s"].tolist() == pytest.approx([0.0, 1 / 6, 0.5])  # (N-1)/span = 4
    with pytest.raises(ConfigError, match=r"exp.yaml: workload.trace: file not found"):
        build_workload(parse_workload_config({"trace": "nope.csv"}), tmp_path, 0, config_source="exp.yaml")
    with pytest.raises(ConfigError, match=r"workload.window_s: no request arrives"):
        build_workload(parse_workload_config({"trace": "w.parquet", "window_s": [100, 200]}), tmp_path, 0)


def test_pydantic_errors_carry_key_paths():
    bad = {"synthetic": {"num_requests": 5, "arrival": {"kind": "poisson", "rate_req_s": 0}, "prompt_len": 10, "output_len": 10}}
    with pytest.raises(ValidationError) as e:
        WorkloadConfig.model_validate(bad)
    (err,) = e.value.errors()
    assert err["loc"][:2] == ("synthetic", "arrival") and err["loc"][-1] == "rate_req_s"
    with pytest.raises(ConfigError) as ce:
        parse_workload_config(bad, "exp.yaml")
    assert ce.value.problems == [("exp.yaml: workload.synthetic.arrival.rate_req_s", "Input should be greater than 0, got 0")]

    with pytest.raises(ConfigError) as ce:
        parse_workload_config({"trace": "azure_conv", "rate_scal": 2, "slo": {"ttft": 1}}, "exp.yaml")
    assert sorted(ce.value.problems) == [
        ("exp.yaml: workload.rate_scal", "unknown key"),
        ("exp.yaml: workload.slo.ttft", "unknown key"),
    ]
    cases = {
        "workload.rate_scale": {"trace": "azure_conv", "rate_scale": -1},
        "workload.arrival.rate_req_s": {"trace": "azure_conv", "arrival": {"kind": "fixed", "rate_req_s": 0}},
        "workload.arrival": {"trace": "azure_conv", "arrival": {"kind": "bursty"}},
        "workload.window_s": {"trace": "azure_conv", "window_s": [10, 5]},
        "workload.synthetic.prompt_len.sigma": {
            "synthetic": {"num_requests": 5, "arrival": {"kind": "offline"}, "prompt_len": {"kind": "lognormal", "mean": 5, "sigma": -1}, "output_len": 1}
        },
        "workload.synthetic.output_len": {  # shorthand int: the path ends at it
            "synthetic": {"num_requests": 5, "arrival": {"kind": "offline"}, "prompt_len": 3, "output_len": 0}
        },
        "workload.synthetic.arrival": {"synthetic": {"num_requests": 5, "arrival": {"kind": "trace"}, "prompt_len": 3, "output_len": 3}},
    }
    for path, data in cases.items():
        with pytest.raises(ConfigError) as ce:
            parse_workload_config(data)
        assert [loc for loc, _ in ce.value.problems] == [path], (path, ce.value.problems)
    for data in ({}, {"trace": "azure_conv", "synthetic": bad["synthetic"]}, {"trace": "a", "rate_scale": 2, "target_rate_req_s": 3}):
        with pytest.raises(ConfigError):
            parse_workload_config(data)


def test_config_defaults_are_explicit():
    cfg = parse_workload_config({"trace": "azure_conv"})
    dumped = cfg.model_dump()
    assert dumped["arrival"] == {"kind": "trace"} and dumped["rate_scale"] == 1.0 and dumped["slo"] == {"ttft_s": None, "tpot_s": None}
    assert WorkloadConfig.model_validate(dumped) == cfg
    assert set(BUNDLED_TRACES) == {"azure_conv", "mooncake_conv"}
