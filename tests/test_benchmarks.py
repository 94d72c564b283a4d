"""The benchmark scripts keep working (CPU smoke versions; the numbers come from real runs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

REPO = Path(__file__).parents[1]


def _load(name: str):
    """A benchmark script as a module (benchmarks/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def committed(rel: str) -> Path:
    """A committed GPU call's file or folder under benchmarks/results/, unpacked from its
    archive (benchmarks/results_io.py)."""
    return _load("results_io").RESULTS.require(rel)


def test_gpu_bench_smoke(tmp_path):
    pytest.importorskip("torch")
    p = subprocess.run([sys.executable, "benchmarks/gpu_bench.py", "--smoke", "--out", str(tmp_path),
                        "--sections", "1,2,3,4,8,9,10,7"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    page = (tmp_path / "gpu_bench.md").read_text()
    for section in ("## 1. Ceilings", "## 2. Kernels", "## 3. Model vs transformers", "## 4. Decode iterations",
                    "## 8. Profile", "| **all GEMMs** |", "## 9. Eager mixed iterations", "## 7. Offline throughput", "Compared on **16 requests**",
                    "## 10. Piecewise CUDA graphs", "| model | chunks | decodes | tokens | padded to |"):
        assert section in page
    assert "failed" not in page, page
    assert (tmp_path / "calibration.csv").exists()
    assert len((tmp_path / "piecewise_iterations.csv").read_text().splitlines()) == 1 + 4  # header + 2 x 2 points


def test_fidelity_script(tmp_path):
    """benchmarks/fidelity.py from the committed archives, into a scratch page (the tracked
    one is only read, for its hand-written analysis)."""
    mod = _load("fidelity")
    page = mod.main([], out_md=tmp_path / "fidelity.md")
    assert page == tmp_path / "fidelity.md"
    table = page.read_text()
    assert "| 8b-offline | calibrated |" in table and "| 1b-online-high | roofline |" in table
    assert "mean abs. error" in table and "GPU runs of the same requests on the table's machine" in table
    assert "calibrated, machine instance A" in table and "| 8b-online-high | the mean of 3 runs |" in table
    assert "## Reading the table" in table  # the hand-written analysis survives a rerun
    # the committed page is what the committed runs give with this code, byte for byte
    assert table == (REPO / "benchmarks" / "results" / "fidelity.md").read_text(), (
        "benchmarks/results/fidelity.md is not what this code gives on the committed GPU runs: a change of the "
        "simulator's results on purpose -> python benchmarks/fidelity.py --write-results (and the analysis); "
        f"else a regression. This code's page: {page}")


def test_gpu_fidelity_smoke_and_install(tmp_path):
    """The device call's script on a tiny model on the CPU, then --install into a scratch repo."""
    pytest.importorskip("torch")
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "benchmarks/gpu_fidelity.py", "--smoke", "--out", str(out), "--models", "8b",
                        "--steps", "1,2,4,8"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "failed" not in p.stdout, p.stdout[-3000:]
    mod = _load("gpu_fidelity")
    repo = tmp_path / "repo"
    written = mod.install(out / "fidelity_gpu.tar.gz", repo, name="call-a")
    store = _load("results_io").Results(repo)
    res = store.tables
    # the call's raw files: one archive with its manifest (command, device, every member's sha256)
    man = store.manifests()["call-a"]
    assert res / "archives" / "call-a.tar.xz" in written and man["command"].startswith("python benchmarks/gpu_fidelity.py")
    assert man["device"] and all(len(m["sha256"]) == 64 for m in man["members"].values())
    assert {"8b-online-low", "8b-online-high", "8b-offline"} <= {d.name for d in store.path("gpu_runs").iterdir()}
    assert store.path("gpu_runs_repeat/8b-online-high/requests.parquet").exists()
    prof = repo / "profiles" / "h100-llama-3.1-8b.yaml"
    assert prof in written and store.path("calibration/h100-llama-3.1-8b.grid.csv").exists()
    import yaml

    assert yaml.safe_load(prof.read_text())["provenance"]["source"] == \
        "benchmarks/results/calibration/h100-llama-3.1-8b.grid.csv"
    # the feature runs (step 8) with the call's calibration, into one machine's folder
    mod.install_features(out / "fidelity_gpu.tar.gz", "cpu-x", repo, call="call-b")
    mach = store.path("features/cpu-x")
    assert {"8b-multiturn-noreuse", "8b-multiturn-reuse"} <= {d.name for d in (mach / "pairs").iterdir()}
    assert (res / "features" / "cpu-x" / "profiles" / "h100-llama-3.1-8b.yaml").exists() and (mach / "log.txt").exists()
    # the same call installed again under another name: its runs and grids leave the first archive
    mod.install(out / "fidelity_gpu.tar.gz", repo, name="call-c")
    store = _load("results_io").Results(repo)
    assert "call-a" not in store.manifests() or not any(m.startswith(("gpu_runs", "calibration/"))
                                                         for m in store.manifests()["call-a"]["members"])
    assert store.path("gpu_runs/8b-offline/requests.parquet").exists() and store.verify() == []


def test_feature_fidelity_on_committed_runs(tmp_path):
    """benchmarks/feature_fidelity.py on one committed machine's runs (an H100's 8B: the
    overlap scheduler and prefix reuse, each off and on): the simulator predicts each
    feature's effect in the GPU's direction and size."""
    mod = _load("feature_fidelity")
    out = tmp_path / "ff.md"
    assert mod.main(["--machines", "h100-g"], out_md=out) == 0
    text = out.read_text()
    assert "| h100-g | 8b | prefix reuse | on |" in text and "| h100-g | 8b | overlap scheduler | off |" in text
    assert out.with_suffix(".png").stat().st_size > 10_000
    with __import__("tempfile").TemporaryDirectory() as tmp:
        recs = mod.measure(mod.machines(["h100-g"]), Path(tmp))
    by = {r["feature"]: r for r in recs}
    reuse, overlap = by["prefix reuse"], by["overlap scheduler"]
    ttft, tpot = ("ttft_s", "p50"), ("tpot_s", "p50")
    # reuse cuts TTFT by about two thirds on the GPU; the sim within 5 points of it
    g, c = mod.effect(reuse["gpu_vals"], ttft), mod.sim_effect(reuse, "calibrated", ttft)
    assert g < -0.5 and abs(g - c) < 0.05
    # the overlap scheduler trades TTFT (decided a step ahead) for TPOT (host hidden)
    for k, sign in ((ttft, 1), (tpot, -1)):
        g, c = mod.effect(overlap["gpu_vals"], k), mod.sim_effect(overlap, "calibrated", k)
        assert g * sign > 0.05 and c * sign > 0.05 and abs(g - c) < 0.05


def test_gemm_curves_smoke(tmp_path):
    p = subprocess.run([sys.executable, "benchmarks/gemm_curves.py", "--smoke", "--out", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    import pandas as pd

    d = pd.read_csv(tmp_path / "gemm_curves.csv")
    assert set(d.linear) == {"qkv", "o", "gate_up", "down"} and set(d.tokens) == {1, 16}
    assert (d.seconds > 0).all() and (tmp_path / "gemm_curves.png").stat().st_size > 0


def test_fidelity_ablation_refits_without_a_run(tmp_path):
    """benchmarks/fidelity_ablation.py's refit: the dropped grid run leaves the power fit
    (its energy, its iterations) and nothing else; without a drop the shipped profile's
    power runs come back."""
    import yaml

    mod = _load("fidelity_ablation")
    cal = committed("calibration")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    kept = mod.refit(cal, tmp_path / "a", None, "both", False)
    dropped = mod.refit(cal, tmp_path / "b", "128x1024+384", "power", False)
    for m in mod.MODELS:
        def power_runs(p):
            return {r["workload"] for r in yaml.safe_load(p.read_text())["power"]["fit"]["residuals"]}

        assert "128x1024+384" in power_runs(kept[m]) and "128x1024+384" not in power_runs(dropped[m])
        assert power_runs(kept[m]) - power_runs(dropped[m]) == {"128x1024+384"}
        a, b = (yaml.safe_load(p[m].read_text())["fit"]["points"] for p in (kept, dropped))
        assert a == b  # the time fit's rows are the same


_IDENTICAL_RUNS: dict = {}


def _two_runs(tmp_root: Path) -> tuple[Path, Path]:
    """The same small experiment run twice (made once per session)."""
    if "dirs" not in _IDENTICAL_RUNS:
        from servesim.sim import cli

        exp = tmp_root / "e.yaml"
        exp.write_text("name: e\nmodel: llama-3.2-1b\nhardware: h100-sxm\n"
                       "workload: {trace: azure_conv, num_requests: 60, arrival: {kind: poisson, rate_req_s: 20}}\n"
                       "output: {plots: false, timeline: false}\n")
        dirs = (tmp_root / "a", tmp_root / "b")
        for d in dirs:
            assert cli.main(["run", str(exp), "--out", str(d)]) == 0
        _IDENTICAL_RUNS["dirs"] = dirs
    return _IDENTICAL_RUNS["dirs"]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_outputs_identical_flags_one_ulp_and_ignores_wall_time(tmp_path_factory, data):
    """benchmarks/outputs_identical.py (the before/after check of speed changes): two runs
    of one config are identical (wall_s apart); one float of any numeric column moved by
    one ulp, or one summary number, is a difference."""
    import json
    import shutil

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    mod = _load("outputs_identical")
    root = _IDENTICAL_RUNS.get("root") or _IDENTICAL_RUNS.setdefault("root", tmp_path_factory.mktemp("identical"))
    a, b = _two_runs(root)
    assert mod.compare_runs(a, b) == []
    import tempfile

    c = Path(tempfile.mkdtemp(dir=root)) / "c"
    shutil.copytree(b, c)
    which = data.draw(st.sampled_from(["requests.parquet", "iterations.parquet", "summary.json"]))
    path = c / "base" / which
    if which == "summary.json":
        s = json.loads(path.read_text())
        s["wall_s"] += 1.0  # not a function of config and seed: ignored
        path.write_text(json.dumps(s, indent=2) + "\n")
        assert mod.compare_runs(a, c) == []
        key = data.draw(st.sampled_from([k for k, v in s.items() if isinstance(v, float) and k != "wall_s"]))
        s[key] = float(np.nextafter(s[key], np.inf))
        path.write_text(json.dumps(s, indent=2) + "\n")
    else:
        t = pq.read_table(path)
        cols = [f.name for f in t.schema if pa.types.is_floating(f.type) or pa.types.is_integer(f.type)]
        name = data.draw(st.sampled_from(cols))
        row = data.draw(st.integers(0, t.num_rows - 1))
        x = t.column(name).to_numpy().copy()
        if x.dtype.kind == "f":  # (a NaN, e.g. no SLO, made a number: nextafter(NaN) is NaN)
            x[row] = 0.0 if np.isnan(x[row]) else np.nextafter(x[row], np.inf)
        else:
            x[row] += 1
        i = t.schema.get_field_index(name)
        t = t.set_column(i, t.schema.field(i), pa.array(x, type=t.schema.field(i).type))
        pq.write_table(t, path)
    problems = mod.compare_runs(a, c)
    assert problems and all(p.startswith(f"base/{which}") for p in problems), problems
