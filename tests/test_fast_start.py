"""Fast start: the bundled trace's binary copy is the CSV's table, and `sim run` imports
no plotting, fitting or GPU code."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import json
import pickle

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from servesim.sim.metrics import _equals, string_counts
from servesim.sim.schemas import arrow_array, numpy_of
from servesim.sim.types import ConfigError
from servesim.traces import bundle, readers
from servesim.traces.spec import build_workload, parse_workload_config, workload_columns

REPO = Path(__file__).resolve().parents[1]
CSV = "AzureLLMInferenceTrace_conv.csv"


def _from_csv(path: Path):
    saved = readers.BUNDLED_BINARY.pop(CSV)
    try:
        return readers.read_azure(path)
    finally:
        readers.BUNDLED_BINARY[CSV] = saved


def test_binary_copy_is_the_csv():
    """The shipped .npz gives the very table (values and dtypes) the shipped CSV does, and
    was made from this CSV (its recorded sha256)."""
    path = readers.DATA_DIR / CSV
    copy = readers.DATA_DIR / readers.BUNDLED_BINARY[CSV]
    with np.load(copy, allow_pickle=False) as z:
        assert str(z["source_sha256"]) == hashlib.sha256(path.read_bytes()).hexdigest(), \
            "traces/data/azure_conv.npz is stale: run python -m servesim.traces.bundle"
    fast = readers.bundled_binary(path)
    assert fast is not None
    slow = _from_csv(path)
    assert fast.equals(slow) and list(fast.dtypes) == list(slow.dtypes) and fast.attrs == slow.attrs
    assert len(fast) == 19_366
    assert readers.read_trace(path).equals(slow)  # what a run reads


def test_binary_copy_ignored_when_the_csv_changes(tmp_path, monkeypatch):
    """An edited CSV is read as it is: the copy stands only for the file it was made from."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(readers.DATA_DIR / CSV, data / CSV)
    monkeypatch.setattr(readers, "DATA_DIR", data.resolve())
    bundle.write_binary(CSV)
    assert readers.bundled_binary(data / CSV) is not None
    lines = (data / CSV).read_text().splitlines()
    head, first = lines[0], lines[1].split(",")
    first[1] = "3"  # the first request's prompt: 3 tokens
    (data / CSV).write_text("\n".join([head, ",".join(first), *lines[2:]]))
    assert readers.bundled_binary(data / CSV) is None
    df = readers.read_azure(data / CSV)
    assert int(df["prompt_len"].iat[0]) == 3
    (data / readers.BUNDLED_BINARY[CSV]).write_bytes(b"not an npz")  # a corrupt copy: the CSV
    assert readers.read_azure(data / CSV).equals(df)
    other = tmp_path / CSV  # a file of that name elsewhere is not the bundled one
    shutil.copy(readers.DATA_DIR / CSV, other)
    assert readers.bundled_binary(other) is None


def test_sim_run_imports_no_plotting_fitting_or_gpu_code(tmp_path):
    """What `sim run` imports to run the whole Azure trace with plots off (benchmarks/sim_speed.py's
    run: some requests rejected, Poisson arrivals): none of pandas, pyarrow.compute,
    matplotlib, scipy, torch, triton, the GPU backend, the plots or the calibrator; nor SimPy
    (one replica's loop runs without it: sim/driver.py). The cyclic garbage collector, off
    for the command (sim/cli.py main), is on again once it returns."""
    exp = tmp_path / "e.yaml"
    exp.write_text("name: e\nmodel: llama-2-7b\nhardware: h100-sxm\n"
                   "workload: {trace: azure_conv, arrival: {kind: poisson, rate_req_s: 6.45}}\n"
                   "output: {plots: false, timeline: false}\n")
    code = ("import sys\n"
            f"sys.argv = ['sim', 'run', {str(exp)!r}, '--out', {str(tmp_path / 'out')!r}]\n"
            "import gc\n"
            "from servesim.sim import cli\n"
            "assert gc.isenabled()\n"
            "assert cli.main(sys.argv[1:]) == 0\n"
            "assert gc.isenabled(), 'sim run left the garbage collector off'\n"
            "bad = [m for m in ('pandas', 'pyarrow.compute', 'matplotlib', 'scipy', 'torch', 'triton',\n"
            "       'servesim.gpu_backend', 'simpy',\n"
            "       'servesim.sim.plots', 'servesim.sim.calibrate') if m in sys.modules]\n"
            "print('IMPORTED', bad)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "IMPORTED []" in r.stdout, r.stdout
    assert (tmp_path / "out" / "base" / "requests.parquet").is_file()
    summary = json.loads((tmp_path / "out" / "base" / "summary.json").read_text())
    assert summary["num_rejected"] > 0 and summary["rejected_by_reason"]  # (the string counts ran)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["trace", "offline", "poisson", "gamma", "fixed"]), st.one_of(st.none(), st.integers(1, 30000)),
       st.integers(0, 2**32 - 1), st.sampled_from(["azure_conv", "auto-path"]))
def test_workload_columns_are_build_workloads_table(kind, n, seed, trace):
    """The numpy path of a bundled trace (traces/spec.py workload_columns) gives the very
    table build_workload does, without making a DataFrame."""
    arrival = {"kind": kind} if kind in ("trace", "offline") else {"kind": kind, "rate_req_s": 3.5}
    if kind == "gamma":
        arrival["cv"] = 2.0
    data = {"trace": "azure_conv" if trace == "azure_conv" else str(readers.DATA_DIR / CSV), "arrival": arrival}
    if n is not None:
        data["num_requests"] = n
    cfg = parse_workload_config(data)
    w = workload_columns(cfg, REPO, seed)
    ref = build_workload(cfg, REPO, seed)
    fast = trace == "azure_conv"  # (a path: its format is sniffed, the DataFrame path)
    assert (w._frame is None) == fast
    assert len(w) == len(ref) and w.columns == list(ref.columns) and w.attrs == ref.attrs
    for c in ref.columns:
        assert w.column(c).dtype == ref[c].dtype and np.array_equal(w.column(c), ref[c].to_numpy())
    assert w.frame.equals(ref) and list(w.frame.dtypes) == list(ref.dtypes)
    assert w["prompt_len"].equals(ref["prompt_len"]) and w.iloc[:3].equals(ref.iloc[:3])  # (asked of the DataFrame)
    again = pickle.loads(pickle.dumps(w))  # (a sweep's worker processes get it pickled)
    assert again.columns == w.columns and again.frame.equals(ref)


def test_workload_columns_fall_back_to_build_workload():
    """Transforms the numpy path does not do give build_workload's DataFrame (and its errors)."""
    for extra in ({"rate_scale": 2.0}, {"max_output_len": 100}, {"window_s": [0, 100]}, {"slo": {"ttft_s": 1.0}}):
        cfg = parse_workload_config({"trace": "azure_conv", **extra})
        w = workload_columns(cfg, REPO, 0)
        assert w._frame is not None and w.frame.equals(build_workload(cfg, REPO, 0)), extra
    cfg = parse_workload_config({"trace": "azure_conv", "arrival": {"kind": "poisson", "rate_req_s": 1e-300}})
    with pytest.raises(ConfigError) as e:  # arrivals beyond MAX_ARRIVAL_S: build_workload names the key
        workload_columns(cfg, REPO, 0, config_source="e.yaml")
    assert str(e.value) == str(pytest.raises(ConfigError, build_workload, cfg, REPO, 0, config_source="e.yaml").value)


_TYPES = [pa.int32(), pa.int64(), pa.float64(), pa.bool_(), pa.string()]


@st.composite
def _columns(draw):
    t = draw(st.sampled_from(_TYPES))
    n = draw(st.integers(0, 40))
    if t == pa.string():
        vals = draw(st.lists(st.one_of(st.none(), st.sampled_from(["", "finished", "rejected", "kv_pool", "é"])),
                             min_size=n, max_size=n))
        return t, vals
    if t == pa.bool_():
        return t, np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool)
    if t == pa.float64():
        return t, np.array(draw(st.lists(st.floats(allow_nan=True), min_size=n, max_size=n)), dtype=np.float64)
    return t, np.array(draw(st.lists(st.integers(-2**31, 2**31 - 1), min_size=n, max_size=n)), dtype=np.int64)


@settings(max_examples=200, deadline=None)
@given(_columns(), st.integers(0, 5), st.sampled_from(["", "finished", "kv_pool", "é"]))
def test_arrow_conversions_without_pandas_are_pyarrows(col, cut, word):
    """sim/schemas.py arrow_array / numpy_of and metrics._equals / string_counts (from the
    buffers) equal pyarrow's pa.array / to_numpy / compute on sliced and chunked columns."""
    import pyarrow.compute as pc

    t, vals = col
    a = arrow_array(vals, t)
    b = pa.array(vals, type=t)
    assert a.type == b.type and a.null_count == b.null_count and a.validate(full=True) is None
    assert all(u == v or (u != u and v != v) for u, v in zip(a.to_pylist(), b.to_pylist())) and len(a) == len(b)
    cut = min(cut, len(a))
    for x in (a, a.slice(cut), pa.chunked_array([a, a.slice(cut)], type=t)):
        if t == pa.string():
            ref = pc.equal(x, word).to_numpy(zero_copy_only=False)
            ref = np.array([bool(v) if v is not None else False for v in ref.tolist()], dtype=bool)
            assert np.array_equal(_equals(x, word), ref)
            mask = np.arange(len(x)) % 3 != 1
            vc = pc.value_counts(x.filter(pa.array(mask)) if len(x) else x)
            want = {v: int(c) for v, c in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist())
                    if v is not None}
            got = string_counts(x, mask)
            assert got == want and (isinstance(x, pa.ChunkedArray) or list(got) == list(want))
        else:
            ref = x.to_numpy() if isinstance(x, pa.ChunkedArray) else x.to_numpy(zero_copy_only=False)
            got = numpy_of(x)
            assert got.dtype == ref.dtype and np.array_equal(got, ref, equal_nan=t == pa.float64())
