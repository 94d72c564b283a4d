"""benchmarks/fidelity_h200.py: the table against the mean of repeated GPU runs with the
GPU's noise beside it, the long-prompt table, the cross-machine rows and the S11 must-show
verdicts (computed, never written in)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tarfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

REPO = Path(__file__).parents[1]


def _load(name: str):
    import importlib.util
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


FID = _load("fidelity")
H200 = _load("fidelity_h200")
pos = st.floats(0.01, 1e4, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(st.lists(pos, min_size=1, max_size=6), pos, pos)
def test_mean_and_noise(gpu, sim, scale):
    vals = [{("m", "p50"): (a, sim)} for a in gpu]
    err, noise = FID.mean_and_noise(vals)
    mean = sum(gpu) / len(gpu)
    assert abs(err[("m", "p50")] - (sim / mean - 1)) <= 1e-9 * (1 + sim / mean)
    if len(gpu) == 1:
        assert noise == {}
        return
    n = noise[("m", "p50")]
    assert n >= 0 and (n < 1e-12) == (max(gpu) - min(gpu) < 1e-12 * max(gpu))
    # the noise is relative: the same runs in other units have the same noise
    _, noise2 = FID.mean_and_noise([{("m", "p50"): (a * scale, sim)} for a in gpu])
    assert abs(noise2[("m", "p50")] - n) <= 1e-9 * (1 + n)
    if len(gpu) == 2:
        a, b = gpu
        assert abs(n - (abs(a / b - 1) + abs(b / a - 1)) / 2) <= 1e-9 * (1 + n)


@given(st.one_of(st.none(), st.just(float("nan")), st.floats(0, 1)), st.floats(0.001, 0.5))
def test_verdict_is_the_comparison(value, target):
    v = H200.verdict(value, target)
    if value is None or value != value:
        assert v.startswith("FAIL")
    else:
        assert v.startswith("PASS") == (value <= target)


def _sim_run(args: list[str], out: Path) -> None:
    from servesim.sim.cli import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["run", *args, "--out", str(out), "--set", "output.plots=false",
                     "--set", "output.timeline=false"]) == 0


def _tarball(tmp: Path, name: str, host: str, runs: dict[str, Path]) -> Path:
    src = tmp / name / "fidelity_gpu"
    for sub, run in runs.items():
        shutil.copytree(run, src / sub / run.name)
    (src / "call.json").write_text(json.dumps({"command": "python benchmarks/gpu_fidelity.py --steps 2,5,10",
                                               "date": "2026-12-03 10:00", "device": "NVIDIA H200",
                                               "hardware": "h200-sxm", "host": {"hostname": host,
                                                                                "gpu_uuid": f"GPU-{host}"}}))
    tb = tmp / name / "fidelity_gpu.tar.gz"
    with tarfile.open(tb, "w:gz") as tf:
        tf.add(src, arcname="fidelity_gpu")
    return tb


def test_table_on_simulated_calls(tmp_path, monkeypatch):
    """Two 'device calls' on two hosts whose runs are simulator runs with the shipped H200
    8B profile (the fidelity online-high workload twice, the long-prompt run twice): replayed
    with that profile they are reproduced exactly, so every 8B line, the long-prompt lines and
    the cross-machine line pass, the noise is zero, and the 1B (no runs) fails."""
    results_io = _load("results_io")
    prof = REPO / "profiles" / "h200-llama-3.1-8b.yaml"
    cal = ["--set", "cost_model.kind=calibrated", "--set", f"cost_model.profile={prof}", "--set", "hardware=h200-sxm"]
    _sim_run(["experiments/fidelity.yaml", "--only", "8b-online-high", "--set", "workload.num_requests=40", *cal],
             tmp_path / "fid")
    _sim_run(["experiments/fidelity_long.yaml", "--set", "workload.num_requests=24", *cal], tmp_path / "long")
    store = results_io.Results(tmp_path / "repo")
    monkeypatch.setattr(H200, "STORE", store)
    monkeypatch.setattr(H200, "REPO", tmp_path / "repo")
    fid, long = tmp_path / "fid" / "8b-online-high", tmp_path / "long" / "8b-mooncake-long"
    for name, host, sets in (("call-a", "host-a", ("runs", "runs_repeat", "runs_long", "runs_long_repeat")),
                             ("call-b", "host-b", ("runs", "runs_repeat", "runs_long")),
                             ("call-c", "host-a", ("runs_third",))):  # host a again: one machine with call-a
        tb = _tarball(tmp_path, name, host, {s: long if "long" in s else fid for s in sets})
        written = H200.install(tb, name)
        assert store.manifests()[name]["host"]["hostname"] == host and written[0].name == f"{name}.tar.xz"
        if name != "call-c":
            H200._copy_profile(prof, store.tables / H200.PROFILES_AT / name / prof.name)  # as a call's refit
    assert H200.machines() == {"call-a+call-c": ["call-a", "call-c"], "call-b": ["call-b"]}
    assert store.path("h200/call-a/runs_long_repeat/8b-mooncake-long/requests.parquet").exists()
    # the grid the profile names (its decode points are tabled) from this checkout's archives
    grid = yaml_source(prof)
    store.pack("grids", {grid: results_io.RESULTS.require(grid)}, {"command": "test"})
    with contextlib.redirect_stdout(io.StringIO()):
        page = H200.table(False).read_text()
    must = page[page.index("## S11 must-show"):page.index("## Against one GPU run")]
    lines = [x for x in must.splitlines() if x.startswith("- ")]
    assert all("PASS" in x and "FAIL" not in x for x in lines if "llama-3.1-8b" in x or "long prompts" in x), must
    assert sum("long prompts" in x for x in lines) == 3 and any(x.startswith("- cross-machine, llama-3.1-8b")
                                                                 and "PASS" in x for x in lines), must
    assert any(x.startswith("- llama-3.2-1b") and "FAIL" in x for x in lines)
    assert "| call-b | 8b-online-high | 2 | +0.0% (±0.0%) |" in page  # two runs on machine b, three on a
    assert "| call-a+call-c | 8b-online-high | 3 | +0.0% (±0.0%) |" in page
    assert "| call-a+call-c | 8b-mooncake-long | 2 | mean (± GPU noise) |" in page
    assert "| call-a+call-c (host-a / GPU-host-a) | call-b (host-b / GPU-host-b) | different |" in page


def yaml_source(prof: Path) -> str:
    import yaml

    return yaml.safe_load(prof.read_text())["provenance"]["source"].removeprefix("benchmarks/results/")


def test_h200_calibration_call_ships_fp8_gemm_curves(tmp_path, monkeypatch):
    """gpu_fidelity.py's calibration (step 1) on a card with fp8 tensor cores sweeps the fp8
    GEMMs beside bf16's, and `fidelity_h200.py --install` keeps them: the call's archive holds
    the grid's .gemm-fp8.csv and the shipped profile (the small servesim-profile/3 form, its
    residuals in the sidecar) carries `gemm_times_by_precision.fp8` for every linear at the
    sweep's row counts -- so `model_precision: fp8` on the shipped H200 profile is priced with
    measured fp8 curves. The CPU smoke (tiny model) stands for the device call."""
    import subprocess
    import sys

    import yaml

    gf = _load("gpu_fidelity")
    assert gf.calibration_gemm_precisions("h200-sxm") == ("fp8",)
    assert gf.calibration_gemm_precisions("a100-80gb-sxm") == ()  # no fp8 tensor cores: bf16 only
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "benchmarks/gpu_fidelity.py", "--smoke", "--smoke-hardware", "h200-sxm",
                        "--out", str(out), "--models", "8b", "--steps", "1"], cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0 and "failed" not in p.stdout, (p.stdout + p.stderr)[-3000:]
    assert "--gemm-precisions fp8" in p.stdout
    results_io = _load("results_io")
    store = results_io.Results(tmp_path / "repo")
    monkeypatch.setattr(H200, "STORE", store)
    monkeypatch.setattr(H200, "REPO", tmp_path / "repo")
    # the profile shipped before the call names the decode-attention kernel table it was fitted with
    before = REPO / "profiles" / "h200-llama-3.1-8b.yaml"
    kv_table = yaml.safe_load(before.read_text())["provenance"]["kv_attention"]
    H200._copy_profile(before, tmp_path / "repo" / "profiles" / before.name)
    written = H200.install(out / "fidelity_gpu.tar.gz", "call-fp8")
    members = store.manifests()["call-fp8"]["members"]
    assert "h200/call-fp8/calibration/h200-llama-3.1-8b.grid.gemm-fp8.csv" in members
    shipped = tmp_path / "repo" / "profiles" / "h200-llama-3.1-8b.yaml"
    assert shipped in written
    doc = yaml.safe_load(shipped.read_text())
    assert doc["schema"] == "servesim-profile/3" and (shipped.parent / doc["fit"]["residuals"]["file"]).is_file()
    bf16, fp8 = doc["roofline"]["gemm_times"], doc["roofline"]["gemm_times_by_precision"]["fp8"]
    assert set(fp8) == set(bf16) == {"qkv", "o", "gate_up", "down"}
    for k, c in fp8.items():
        assert c["tokens"] == bf16[k]["tokens"] and (c["k"], c["n"]) == (bf16[k]["k"], bf16[k]["n"])
        assert len(c["seconds"]) == len(c["tokens"]) and all(s > 0 for s in c["seconds"])
    assert set(doc["provenance"]["gemm_sweep_s"]) == {"bf16", "fp8"}  # the device seconds each sweep took
    # a call without a kernel table of its own keeps the shipped profile's (the fp8 KV cache's price)
    assert doc["provenance"]["kv_attention"] == kv_table
