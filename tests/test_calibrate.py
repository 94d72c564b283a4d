"""Calibration: fitting, profiles, bad profiles, and the GPU measuring path on a CPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

# the GPU-measuring path times Triton kernels (the decode attention sweep) on the CPU
os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from servesim.sim import calibrate
from servesim.sim.calibrate import SCHED, fit, load_profile, predict, read_grid, shapes_from_grid
from servesim.sim.cli import main
from servesim.sim.specs import load_hardware, load_model
from servesim.sim.types import ConfigError

REPO = Path(__file__).parents[1]
GRID = REPO / "benchmarks" / "results" / "calibration_h100.csv"
GRID_1B = "calibration/h100-llama-3.2-1b.grid.csv"  # in a GPU call's archive: committed(GRID_1B)


def committed(rel: str) -> Path:
    """A committed GPU call's file under benchmarks/results/, unpacked from its archive
    (benchmarks/results_io.py)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from results_io import RESULTS

    return RESULTS.require(rel)


def test_fit_recovers_known_parameters():
    """Synthetic measurements from known parameters are fitted back to them."""
    model, hw = load_model("llama-3.1-8b"), load_hardware("h100-sxm")
    rows = read_grid(GRID, "llama-3.1-8b")
    shapes, _, _ = shapes_from_grid(rows)
    true = dict(flops_efficiency=0.8, bandwidth_efficiency=0.85, attention_flops_efficiency=0.4,
                host_overhead_eager_s=0.012, host_overhead_graph_s=3e-4)
    times = predict(model, hw, true, shapes)
    synth = [dict(r, time_s=t) for r, t in zip(rows, times)]
    params, stats = fit(model, hw, synth)
    assert stats["mape"] < 0.01
    for k in ("flops_efficiency", "bandwidth_efficiency"):
        assert params[k] == pytest.approx(true[k], rel=0.05), k
    # an eager decode step's launch (this grid's eager rows are decode steps and mixed ones:
    # what splits it into the common part and the decode attention's is a prompt-only eager
    # point, PROMPT_POINTS, which this older grid lacks)
    eager = params["host_overhead_eager_s"] + params["host_overhead_eager_decode_s"]
    assert eager == pytest.approx(true["host_overhead_eager_s"], rel=0.05)


def test_fit_is_robust_to_host_hiccups(monkeypatch):
    """A few iterations a host hiccup made 1.5-3x slower (what the 1B grids hold) barely
    move the fit: the loss is pseudo-Huber in the log error, not squared."""
    model, hw = load_model("llama-3.2-1b"), load_hardware("h100-sxm")
    # (without the rows' measured host times, which would add a scheduler term the
    # synthetic times lack)
    rows = [{k: v for k, v in r.items() if k != "host_s"} for r in read_grid(committed(GRID_1B), "llama-3.2-1b")[::4]]
    shapes, _, _ = shapes_from_grid(rows)
    true = dict(flops_efficiency=0.8, bandwidth_efficiency=0.85, kv_bandwidth_efficiency=0.9,
                attention_flops_efficiency=0.45, host_overhead_eager_s=0.012, host_overhead_graph_s=1e-4,
                layer_latency_s=2e-5, host_overhead_piecewise_s=4e-3, host_overhead_piecewise_decode_s=1e-3,
                context_launch_overlap=0.8)
    times = predict(model, hw, true, shapes)
    rng = np.random.default_rng(0)
    hit = rng.random(len(times)) < 0.06
    noisy = np.where(hit, times * rng.uniform(1.5, 3.0, len(times)), times * rng.lognormal(0, 0.02, len(times)))
    params, _ = fit(model, hw, [dict(r, time_s=t) for r, t in zip(rows, noisy)])
    err = np.abs(predict(model, hw, params, shapes) / times - 1)
    assert np.median(err) < 0.01 and np.mean(err) < 0.015, (np.median(err), np.mean(err))
    # squared log errors (the loss before) are pulled ~6% off by the same hiccups
    monkeypatch.setattr(calibrate, "ROBUST_SCALE", 10.0)
    params, _ = fit(model, hw, [dict(r, time_s=t) for r, t in zip(rows, noisy)])
    assert np.mean(np.abs(predict(model, hw, params, shapes) / times - 1)) > 2 * np.mean(err)


def test_gpu_terms_fit_the_gpu_part_not_a_slow_hosts_time():
    """Grid points whose host part ran slow (the designed points' decode steps at 32-256
    requests took 0.5-0.75 ms of host on the H200, served runs' 0.3-0.4) do not move the GPU
    terms: those are fitted to each row's time - host_s, the scheduler terms to host_s. A
    fit to whole times prices every large decode of every run slow by the host's excess."""
    from servesim.sim.calibrate import SCHED

    model, hw = load_model("llama-3.2-1b"), load_hardware("h100-sxm")
    rows = [{k: v for k, v in r.items() if k != "process"} for r in read_grid(committed(GRID_1B), "llama-3.2-1b")[::4]]
    shapes, _, kinds = shapes_from_grid(rows)
    true = dict(flops_efficiency=0.8, bandwidth_efficiency=0.85, kv_bandwidth_efficiency=0.9,
                attention_flops_efficiency=0.45, host_overhead_eager_s=0.012, host_overhead_graph_s=1e-4,
                layer_latency_s=2e-5, host_overhead_piecewise_s=4e-3, host_overhead_piecewise_decode_s=1e-3,
                context_launch_overlap=0.8)
    gpu = predict(model, hw, true, shapes)  # no scheduler terms: the GPU part (and its launches)
    n = np.array([s.n_decode + len(s.ctx_new_tokens) for s in shapes])
    ctx = np.array([sum(s.ctx_new_tokens) for s in shapes])
    host = 3e-4 + 1.5e-6 * n + 1.7e-7 * ctx
    slow = (np.array(kinds) == "decode-graph") & (n >= 32)
    assert slow.sum() >= 20
    host = np.where(slow, host + 6e-4, host)  # these points' host ran slow
    params, _ = fit(model, hw, [dict(r, time_s=g + h, host_s=h) for r, g, h in zip(rows, gpu, host)])
    got = predict(model, hw, {**params, **dict.fromkeys(SCHED, 0.0)}, shapes)
    err = got / gpu - 1
    assert np.abs(err[slow]).mean() < 0.015 and np.abs(err).mean() < 0.015, (np.abs(err[slow]).mean(), np.abs(err).mean())
    # the scheduler terms (fitted to host_s, robustly) stay a typical step's
    assert params["scheduler_overhead_s"] == pytest.approx(3e-4, rel=0.15)


def test_calibrated_profile_beats_roofline_on_its_grid(tmp_path):
    out = tmp_path / "p.yaml"
    assert main(["calibrate", "--model", "llama-3.2-1b", "--from-grid", str(GRID), "--out", str(out)]) == 0
    doc = yaml.safe_load(out.read_text())
    assert doc["schema"] == "servesim-profile/3" and doc["model"] == "llama-3.2-1b"
    assert calibrate.load_residuals(out).shape == (doc["fit"]["points"], 3)  # the residuals beside it
    assert doc["fit"]["mape"] < doc["fit"]["roofline_mape"]
    assert "grid_sha256" in doc["provenance"]


def test_shipped_profiles_load_and_are_reproducible(calibration_fit):
    """Refitting the committed grid reproduces the shipped profile's predictions (and
    reports the host speed of each of the grid's three processes)."""
    for m in ("llama-3.2-1b", "llama-3.1-8b"):
        model, hw = load_model(m), load_hardware("h100-sxm")
        path = REPO / "profiles" / f"h100-{m}.yaml"
        shipped, _ = load_profile(path, model, hw)
        grid = committed(yaml.safe_load(path.read_text())["provenance"]["source"])  # the grid it was fitted to
        rc, out, printed = calibration_fit(m, grid)  # (a session's one fit of this grid)
        assert rc == 0
        again, _ = load_profile(out, model, hw)
        shapes, _, _ = shapes_from_grid(read_grid(grid, m))
        a = predict(model, hw, shipped.model_dump(exclude=set(SCHED)), shapes)
        b = predict(model, hw, again.model_dump(exclude=set(SCHED)), shapes)
        assert max(abs(a / b - 1)) < 0.01
        speeds = re.search(r"host speed of each grid process[^:]*: ([\d., ]+)", printed)
        assert speeds and len(speeds.group(1).split(",")) == 3


def test_bad_profiles(tmp_path):
    model, hw = load_model("llama-3.1-8b"), load_hardware("h100-sxm")
    with pytest.raises(ConfigError, match="made for model llama-3.2-1b"):
        load_profile(REPO / "profiles" / "h100-llama-3.2-1b.yaml", model, hw)
    with pytest.raises(ConfigError, match="made on h100-sxm"):
        load_profile(REPO / "profiles" / "h100-llama-3.1-8b.yaml", model, load_hardware("a100-80gb-sxm"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("schema: servesim-profile/0\nmodel: llama-3.1-8b\n")
    with pytest.raises(ConfigError, match="incompatible version"):
        load_profile(bad, model, hw)
    bad.write_text(": : :\n- [")
    with pytest.raises(ConfigError, match="corrupt"):
        load_profile(bad, model, hw)


def test_experiment_with_calibrated_cost_model(tmp_path):
    exp = tmp_path / "e.yaml"
    exp.write_text(f"name: e\nmodel: llama-3.1-8b\nworkload: {{trace: azure_conv, num_requests: 100}}\n"
                   f"cost_model: {{kind: calibrated, profile: {REPO / 'profiles/h100-llama-3.1-8b.yaml'}}}\n"
                   "output: {plots: false}\n")
    assert main(["run", str(exp), "--out", str(tmp_path / "o")]) == 0
    exp.write_text(exp.read_text().replace("llama-3.1-8b\nworkload", "llama-3.2-1b\nworkload"))
    p = subprocess.run([sys.executable, "-m", "servesim.sim.cli", "validate", str(exp)], capture_output=True,
                       text=True)
    assert p.returncode == 2 and "made for model llama-3.1-8b" in p.stderr and "Traceback" not in p.stderr


def test_replay_mismatch_and_round_trip(tmp_path):
    run = committed("gpu_runs/8b-offline")
    exp = tmp_path / "r.yaml"
    exp.write_text(f"name: r\nmodel: llama-3.1-8b\nworkload: {{replay: {run}}}\noutput: {{plots: false}}\n")
    assert main(["run", str(exp), "--out", str(tmp_path / "o")]) == 0
    assert main(["compare", str(run), str(tmp_path / "o" / "base"), "--out", str(tmp_path / "c")]) == 0
    cmp = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert cmp["run_a"]["backend"] == "gpu" and cmp["run_b"]["backend"] == "sim"
    exp.write_text(exp.read_text().replace("hardware", "x").replace("model: llama-3.1-8b", "model: llama-2-7b"))
    p = subprocess.run([sys.executable, "-m", "servesim.sim.cli", "validate", str(exp)], capture_output=True,
                       text=True)
    assert p.returncode == 2 and "replaying a run of llama-3.1-8b" in p.stderr


SWEEP_TOKENS = (1, 16, 48)


@pytest.fixture
def small_gemm_sweep(monkeypatch):
    """measure_grid's GEMM sweep at three row counts instead of GEMM_TOKENS' ~200: the
    same code (test_gemm_sweep_and_curves_in_the_profile checks its rows), without ~4.5 s
    of CPU matmuls per grid that the tests below never read."""
    from servesim.gpu_backend import profiler

    sweep = profiler.gemm_sweep
    monkeypatch.setattr(profiler, "gemm_sweep", lambda model, **kw: sweep(model, **{"tokens": SWEEP_TOKENS, **kw}))


def _check_gemm(env, model):
    from servesim.sim.cost_model import LINEARS

    assert [(r["linear"], r["tokens"]) for r in env["gemm"]] == [(k, t) for k in LINEARS for t in SWEEP_TOKENS]
    assert all(r["seconds"] > 0 and (r["k"], r["n"]) == model.linear_shapes(1)[r["linear"]] for r in env["gemm"])


def test_gpu_measuring_path_on_cpu(tmp_path, small_gemm_sweep):
    """sim calibrate --backend gpu's measuring code, on a tiny model on the CPU."""
    pytest.importorskip("torch")
    from servesim.gpu_backend.profiler import measure_grid

    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(dict(model_type="llama", hidden_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   intermediate_size=128, vocab_size=256, rms_norm_eps=1e-5,
                                   rope_theta=10000.0, max_position_embeddings=4096,
                                   tie_word_embeddings=False)))
    model = load_model(str(cfg))
    rows, env = measure_grid(model, model_ref=str(cfg), decode_points=[(4, 64, 12, True), (2, 32, 10, False),
                                                                       (6, (16, 48), (2, 9), True)],
                             prefill_points=[(1, 128), (2, 64)], mixed_points=[(4, 32, 6, 40)],
                             piecewise_points=[(4, 32, 6, 40)], served_points=[(12, 40.0, 48, 8)],
                             power_points=[], prefix_points=[(3, 64, 16, 4, 48)], prompt_points=[(4, 40)],
                             chunked_points=[(2, 120, 4, 40, False)], gemm_precisions=("fp8",),
                             long_kv_sizes=False)  # the long-context kernel sweep: test_long_context_kv, the gpu_fidelity smoke
    # the fp8 GEMM sweep asked for beside bf16's: the same linears and row counts
    assert [(r["linear"], r["tokens"]) for r in env["gemm_fp8"]] == [(r["linear"], r["tokens"]) for r in env["gemm"]]
    assert set(env["gemm_sweep_s"]) == {"bf16", "fp8"} and all(s >= 0 for s in env["gemm_sweep_s"].values())
    kinds = {r["kind"] for r in rows}
    # the point of unequal lengths: uniform prompts and outputs, so its batch empties a
    # request at a time (decode steps at several batch sizes, the KV lengths unequal)
    spread = [r for r in rows if r["run"] == "6x16-48+2-9" and r["kind"] == "decode"]
    assert len({r["n_decode"] for r in spread}) >= 3, spread
    # the cached-context point: its later requests' chunks run over the 64 cached prefix tokens
    cached = [r for r in rows if r["run"].startswith("3x(64 cached)")]
    assert any(r["ctx_prior"] == 64 and r["ctx_tokens"] == 16 for r in cached)
    assert kinds == {"decode", "prefill", "mixed"}
    # the piecewise point's mixed iterations ran at captured token counts
    pw = [r for r in rows if r["kind"] == "mixed" and r["graph"]]
    assert pw and all(r["padded"] >= r["ctx_tokens"] + r["n_decode"] for r in pw)
    assert any(r["kind"] == "mixed" and not r["graph"] for r in rows)
    assert all(r["time_s"] > 0 for r in rows)
    # the host's share of each step (scheduling, bookkeeping, input packing) is inside it
    assert all(0 <= r["host_s"] <= r["time_s"] for r in rows)
    # one energy record per grid run (every point above but the GEMM sweep's)
    assert {"idle_power_w", "power_runs"} <= set(env) and len(env["power_runs"]) == 11
    # a budget of one prompt, one output token: every iteration one prompt alone, back to back
    alone = [r for r in rows if r["run"] == "4x40+1 budget 40"]
    assert len(alone) == 4 - 2 and all(r["kind"] == "prefill" and r["ctx_tokens"] == 40 and r["n_chunks"] == 1
                                       for r in alone)
    # a 120-token prompt at a 40-token budget: later chunks attend to the earlier ones
    chunked = [r for r in rows if r["run"].startswith("2x120+4")]
    assert any(r["kind"] != "decode" and r["ctx_prior"] > 0 for r in chunked)
    # the served run: Poisson arrivals, unequal lengths, labelled rows
    served = [r for r in rows if r["run"].startswith("served")]
    assert served and len({r["kv_sum"] for r in served if r["kind"] == "decode"}) > 1
    dec = [r for r in rows if r["kind"] == "decode" and r["n_decode"] == 4]
    # every decoding request holds at least its prompt (>= 32 tokens) plus one
    assert dec and all(r["kv_sum"] >= r["n_decode"] * 33 for r in rows
                       if r["kind"] != "prefill" and not r["run"].startswith("served")
                       and r["run"] != "6x16-48+2-9")  # (constant prompts of >= 32 tokens)
    assert max(r["kv_sum"] for r in dec) >= 4 * 65  # the 4 x 64-token point's steps
    params, stats = fit(model, load_hardware("h100-sxm"), rows)
    assert stats["points"] == len(rows)
    _check_gemm(env, model)


def test_energy_model_and_power_fit():
    """Energy per token in every summary; the power fit recovers the model's parameters
    from run energies; a batch-1 decode step is all bytes, a long prefill all FLOPs; an
    iteration slower than its work (host-bound) draws less than one that is not."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from servesim.sim.power import energy, fit_power, iteration_power, roofline_work, run_power_terms

    model, hw = load_model("llama-3.1-8b"), load_hardware("h100-sxm")
    run = REPO / "tests" / "data" / "compare" / "roofline"
    it = pq.read_table(run / "iterations.parquet")
    t_f, t_b, t_kv = roofline_work(it, model, hw)
    assert np.all(t_f >= 0) and np.all(t_b >= 0) and np.all(t_kv >= 0) and t_kv.sum() > 0
    truth = {"idle_w": 90.0, "busy_w": 60.0, "memory_w": 320.0, "kv_w": 480.0, "compute_w": 520.0}
    dur = it.column("duration_s").to_numpy()
    p = iteration_power(dur, t_f, t_b, t_kv, truth, 700.0)
    assert np.all((p >= 150) & (p <= 700))
    # without kv_w (a profile from before the term) KV reads draw memory_w
    same = iteration_power(dur, t_f, t_b, t_kv, {**truth, "kv_w": None, "memory_w": 320.0}, 1e9)
    assert np.allclose(same, iteration_power(dur, t_f, t_b + t_kv, 0 * t_kv, truth, 1e9))
    one = pa.table({"ctx_tokens": [0, 8192], "gen_tokens": [1, 0], "padded_tokens": [0, 0],
                    "num_ctx_requests": [0, 1], "ctx_cached_tokens": [0, 0], "decode_kv_tokens": [1024, 0]})
    (f_dec, f_pre), (b_dec, b_pre), (kv_dec, kv_pre) = roofline_work(one, model, hw)
    assert f_dec < 0.02 * b_dec and f_pre > 20 * b_pre
    assert kv_dec == pytest.approx(1024 * model.kv_bytes_per_token / hw.achievable_hbm_bytes_per_s) and kv_pre == 0
    z = np.zeros(2)
    fast, slow = iteration_power(np.array([b_dec / 0.8, b_dec / 0.3]), np.array([f_dec] * 2), np.array([b_dec] * 2),
                                 z, truth, 700.0)
    assert slow < fast <= 700.0
    assert iteration_power(np.array([f_pre / 2]), np.array([f_pre]), np.array([b_pre]), z[:1], truth, 700.0)[0] == 700.0
    # synthetic runs: slices of the iterations, energy from known parameters; the KV
    # reads' share differs between slices, so all four powers are identifiable
    runs = []
    n = it.num_rows
    for a, b in ((0, n // 3), (n // 3, n), (0, n // 2), (n // 4, 3 * n // 4), (n // 5, n // 2), (n // 2, n)):
        sub = it.slice(a, b - a)
        span = float(sub.column("duration_s").to_numpy().sum()) * 1.3
        w = iteration_power(dur[a:b], t_f[a:b], t_b[a:b], t_kv[a:b], truth, 1e9)  # uncapped: the fit's model
        e = energy(sub, span, 1, truth["idle_w"], w)
        runs.append((e, span, *run_power_terms(sub, t_f[a:b], t_b[a:b], t_kv[a:b])))
    got = fit_power(runs, truth["idle_w"])
    for k in ("busy_w", "memory_w", "kv_w", "compute_w"):
        assert got[k] == pytest.approx(truth[k], rel=1e-3), k
    # no negative power: a fit that would want one drops that term
    neg = [(e - 0.5 * bt, span, busy, bt, kt, ft) for e, span, busy, bt, kt, ft in runs]
    assert min(fit_power(neg, truth["idle_w"]).values()) >= 0
    s = json.loads((run / "summary.json").read_text())
    if "energy_per_token_j" in s:
        assert s["energy_per_token_j"] > 0


def test_host_overhead_fit():
    from servesim.sim.calibrate import fit_host

    shapes = ((1, 0, 0), (16, 0, 0), (256, 0, 0), (0, 2, 4096), (8, 1, 256), (0, 1, 8192), (32, 1, 64))
    rows = [dict(n_decode=n, n_chunks=c, ctx_tokens=t, host_s=4e-4 + 3e-6 * (n + c) + 1.5e-7 * t) for n, c, t in shapes]
    rows.append(dict(n_decode=16, n_chunks=0, ctx_tokens=0, host_s=9e-3))  # one garbage collection
    h = fit_host(rows)
    assert h["scheduler_overhead_s"] == pytest.approx(4e-4, rel=0.1)
    assert h["scheduler_overhead_per_request_s"] == pytest.approx(3e-6, rel=0.05)
    assert h["scheduler_overhead_per_context_token_s"] == pytest.approx(1.5e-7, rel=0.05)
    assert fit_host([dict(n_decode=1, host_s="")]) is None

@settings(max_examples=25, deadline=None)
@given(speeds=st.lists(st.floats(0.5, 2.0), min_size=2, max_size=4), seed=st.integers(0, 2**16))
def test_host_fit_separates_process_speeds(speeds, seed):
    """Rows measured in processes of different host speed: fit_host recovers the typical
    process's terms (speeds' geometric mean 1) and each process's speed, wherever the
    grid's points happened to run, since every process also ran a part of the same served
    run."""
    from servesim.sim.calibrate import fit_host

    rng = np.random.default_rng(seed)
    s = np.asarray(speeds) / np.exp(np.mean(np.log(speeds)))
    a, b, c = 3e-4, 2.5e-6, 1.5e-7
    rows = []
    for p in range(len(s)):  # a part of the served run in every process: small batches, short chunks
        for _ in range(40):
            n, k, t = int(rng.integers(1, 40)), int(rng.integers(0, 2)), 0
            t = int(rng.integers(16, 700)) if k else 0
            rows.append(dict(n_decode=n, n_chunks=k, ctx_tokens=t, process=p, host_s=s[p] * (a + b * (n + k) + c * t)))
    for i, (n, k, t) in enumerate(((256, 0, 0), (128, 0, 0), (0, 2, 8192), (64, 1, 2048), (1, 0, 0))):
        p = int(rng.integers(0, len(s)))  # a grid point in one process
        rows += [dict(n_decode=n, n_chunks=k, ctx_tokens=t, process=p, host_s=s[p] * (a + b * (n + k) + c * t))] * 10
    terms, got = fit_host(rows, with_speeds=True)
    assert terms["scheduler_overhead_s"] == pytest.approx(a, rel=0.02)
    assert terms["scheduler_overhead_per_request_s"] == pytest.approx(b, rel=0.02)
    assert terms["scheduler_overhead_per_context_token_s"] == pytest.approx(c, rel=0.02)
    assert got == pytest.approx(s, rel=0.02)


def test_pricing_a_runs_own_iterations(tmp_path):
    """A sim run priced by its own cost model on its recorded shapes: no error on the
    iterations whose shape the record fixes exactly (decode-only; one context chunk)."""
    import pandas as pd

    from servesim.sim.calibrate import iteration_errors_by_kind, rows_from_iterations, shapes_from_grid
    from servesim.sim.cost_model import RooflineConfig, RooflineCostModel

    exp = tmp_path / "e.yaml"
    exp.write_text("name: e\nmodel: llama-3.1-8b\nworkload: {trace: azure_conv, num_requests: 150, rate_scale: 3}\n"
                   "scheduler: {max_num_tokens: 2048, enable_chunked_context: true}\noutput: {plots: false}\n"
                   "cost_model: {roofline: {flops_efficiency: 0.7, host_overhead_graph_s: 0.0002}}\n")
    assert main(["run", str(exp), "--out", str(tmp_path / "o")]) == 0
    it = pd.read_parquet(tmp_path / "o" / "base" / "iterations.parquet")
    model, hw = load_model("llama-3.1-8b"), load_hardware("h100-sxm")
    cfg = RooflineConfig(flops_efficiency=0.7, host_overhead_graph_s=0.0002)
    exact = it[it.num_ctx_requests <= 1]
    rows = rows_from_iterations("llama-3.1-8b", exact)
    shapes, times, kinds = shapes_from_grid(rows)
    cm = RooflineCostModel(model, hw, cfg, cuda_graphs=True)
    err = {k: [] for k in kinds}
    for k, s, t in zip(kinds, shapes, times):
        err[k].append(abs(cm.price(s) / t - 1))
    assert {"decode-graph", "mixed", "prefill"} <= set(err)
    assert max(err["decode-graph"]) < 1e-9
    # the record does not say whether a chunk ends its prompt: the shape samples every
    # chunk, overpricing a non-final one by one token's lm_head (~0.6% of a 2k chunk)
    assert max(err["mixed"] + err["prefill"]) < 0.01
    by = iteration_errors_by_kind(model, hw, cfg, exact)
    assert sum(v["time_share"] for v in by.values()) == pytest.approx(1.0)
    assert by["decode-graph"]["mape"] < 1e-9 and by["mixed"]["mape"] < 0.01


def test_power_cap_is_the_highest_sustained_grid_power(tmp_path):
    """The power cap a profile stores: the highest average power of its grid runs of >= 0.2 s
    (a short run's reading is too coarse), never below the board's limit; the sim caps
    iterations there, an experiment's power.max_w overrides it, and a profile without one
    falls back to the hardware file's max_power_w."""
    from servesim.sim.calibrate import fit_power_runs
    from servesim.sim.config import RunConfig
    from servesim.sim.runner import power_params, resolve

    model, hw = load_model("llama-3.1-8b"), load_hardware("h100-sxm")
    runs = [dict(workload=f"r{i}", energy_j=e, span_s=s, busy_s=s, bytes_s=b, kv_s=k, flops_s=f)
            for i, (e, s, b, k, f) in enumerate([(300.0, 0.4, 0.2, 0.01, 0.05), (760.0, 1.0, 0.1, 0.0, 0.9),
                                                  (200.0, 0.5, 0.4, 0.05, 0.01), (90.0, 0.1, 0.0, 0.0, 0.1),
                                                  (400.0, 0.8, 0.3, 0.2, 0.1)])]
    p = fit_power_runs(runs, 100.0, model=model, hw=hw)
    assert p["max_w"] == pytest.approx(760.0)  # the 900 W of the 0.1 s run does not count
    low = fit_power_runs([dict(r, energy_j=r["energy_j"] / 2) for r in runs], 100.0, model=model, hw=hw)
    assert low["max_w"] == hw.max_power_w  # nothing sustained above the board's limit

    doc = yaml.safe_load((REPO / "profiles" / "h100-llama-3.1-8b.yaml").read_text())
    doc["power"]["max_w"] = 777.0
    prof = tmp_path / "p.yaml"
    prof.write_text(yaml.safe_dump(doc))
    assert load_profile(prof, model, hw)[1]["max_w"] == 777.0
    raw = {"model": "llama-3.1-8b", "workload": {"trace": "azure_conv", "num_requests": 10},
           "cost_model": {"kind": "calibrated", "profile": str(prof)}}
    assert power_params(resolve(RunConfig.model_validate(raw), REPO))["max_w"] == 777.0
    raw["power"] = {"max_w": 650.0}
    assert power_params(resolve(RunConfig.model_validate(raw), REPO))["max_w"] == 650.0
    del doc["power"]["max_w"]
    prof.write_text(yaml.safe_dump(doc))
    raw.pop("power")
    assert power_params(resolve(RunConfig.model_validate(raw), REPO))["max_w"] == hw.max_power_w


def test_gemm_sweep_and_curves_in_the_profile(tmp_path, capsys):
    """`gemm_sweep` times every decoder-layer GEMM of the model's real shapes at each row
    count; a grid with a GEMM CSV beside it gives a profile whose linears are priced from
    the curves (RooflineConfig.gemm_times), and the profile loads."""
    import csv

    from servesim.gpu_backend.profiler import gemm_sweep
    from servesim.sim.calibrate import gemm_curves
    from servesim.sim.cost_model import LINEARS

    model = load_model("llama-3.2-1b")
    rows = gemm_sweep(model, device="cpu", tokens=(1, 16, 48), reps=1)
    shapes = model.linear_shapes(1)
    assert [(r["linear"], r["tokens"]) for r in rows] == [(k, t) for k in LINEARS for t in (1, 16, 48)]
    assert all(r["seconds"] > 0 and (r["k"], r["n"]) == shapes[r["linear"]] for r in rows)

    grid = tmp_path / "g.grid.csv"
    grid.write_bytes(GRID.read_bytes())
    toks = [1, 8, *range(16, 2049, 16)]
    sweep = [{"linear": k, "k": shapes[k][0], "n": shapes[k][1], "tokens": t,
              "seconds": 1e-12 * shapes[k][0] * shapes[k][1] * (4 + -(-t // 128))} for k in LINEARS for t in toks]
    with open(grid.with_suffix(".gemm.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(sweep[0]))
        w.writeheader()
        w.writerows(sweep)
    out = tmp_path / "p.yaml"
    assert main(["calibrate", "--model", "llama-3.2-1b", "--from-grid", str(grid), "--out", str(out)]) == 0
    assert "GEMM curves measured" in capsys.readouterr().out
    roof, _ = load_profile(out, model, load_hardware("h100-sxm"))
    assert set(roof.gemm_times) == set(LINEARS) and roof.gemm_times["down"].tokens == toks
    assert gemm_curves(sweep)["qkv"]["seconds"] == roof.gemm_times["qkv"].seconds


def test_fp8_gemm_sweep_and_its_curves_in_the_profile(tmp_path):
    """`gemm_sweep(precision="fp8")` times the fp8 linears' ``torch._scaled_mm`` at the
    model's shapes; a grid with a ``.gemm-fp8.csv`` beside it gives a profile whose
    ``gemm_times_by_precision.fp8`` are those curves (and loads); an unknown
    ``--gemm-precisions`` entry is refused (exit 2)."""
    import csv

    from servesim.gpu_backend.profiler import gemm_sweep
    from servesim.sim.calibrate import gemm_curves
    from servesim.sim.cost_model import LINEARS

    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps(dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=256,
                                    rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
                                    tie_word_embeddings=False)))
    small = load_model(str(tiny))
    rows = gemm_sweep(small, device="cpu", tokens=(1, 16), reps=1, precision="fp8")
    assert [(r["linear"], r["tokens"]) for r in rows] == [(k, t) for k in LINEARS for t in (1, 16)]
    assert all(r["seconds"] > 0 and (r["k"], r["n"]) == small.linear_shapes(1)[r["linear"]] for r in rows)
    with pytest.raises(ValueError, match="precision"):
        gemm_sweep(small, device="cpu", tokens=(1,), precision="int3")

    model = load_model("llama-3.2-1b")
    shapes = model.linear_shapes(1)
    grid = tmp_path / "g.grid.csv"
    grid.write_bytes(GRID.read_bytes())
    toks = [1, 8, *range(16, 2049, 16)]
    for suffix, per in ((".gemm.csv", 2e-12), (".gemm-fp8.csv", 1e-12)):
        sweep = [{"linear": k, "k": shapes[k][0], "n": shapes[k][1], "tokens": t,
                  "seconds": per * shapes[k][0] * shapes[k][1] * (4 + -(-t // 128))} for k in LINEARS for t in toks]
        with open(grid.with_suffix(suffix), "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(sweep[0]))
            w.writeheader()
            w.writerows(sweep)
    out = tmp_path / "p.yaml"
    assert main(["calibrate", "--model", "llama-3.2-1b", "--from-grid", str(grid), "--out", str(out)]) == 0
    roof, _ = load_profile(out, model, load_hardware("h100-sxm"))
    fp8 = roof.gemm_times_by_precision["fp8"]
    assert set(fp8) == set(LINEARS) and fp8["down"].tokens == toks
    assert gemm_curves(sweep)["qkv"]["seconds"] == fp8["qkv"].seconds
    assert fp8["qkv"].seconds[0] == pytest.approx(roof.gemm_times["qkv"].seconds[0] / 2)
    assert main(["calibrate", "--model", "llama-3.2-1b", "--from-grid", str(grid), "--out", str(out),
                 "--gemm-precisions", "int3"]) == 2


def test_grid_over_several_processes(tmp_path, small_gemm_sweep):
    """--processes K: the grid's runs are spread over K fresh processes (job i in process i
    mod K), the served run split into K parts of the same arrivals; every run comes back
    with its iterations, rows and energy record, under a label of its own."""
    from servesim.gpu_backend import profiler as prof

    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps(dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=256,
                                    rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
                                    tie_word_embeddings=False)))
    model = load_model(str(tiny))
    small = dict(decode_points=[(4, 64, 8, True), (8, 32, 8, False)], prefill_points=[(1, 64)],
                 mixed_points=[(4, 16, 4, 32)], piecewise_points=[(4, 16, 4, 32)], served_points=[(10, 50.0, 40, 8)],
                 power_points=[(4, 32, 12, True)], prefix_points=[(3, 64, 16, 4, 48)], prompt_points=[],
                 chunked_points=[])
    jobs = prof.grid_jobs(model, processes=3, **small)
    assert [j["prefix"] for j in jobs if j.get("prefix")] == [64]
    served = [j for j in jobs if j.get("served_rate")]
    assert [j["n"] for j in served] == [4, 3, 3] and len({j["part"] for j in served}) == 3
    assert len(prof.grid_jobs(model, processes=1, **small)) == len(jobs) - 2
    assert [j["keep"] for j in jobs if j["n"] == 4 and j["output"] == 12] == ["power"]
    # the default grid: a small model gets the high-load served run (one part per process) and
    # both chunked long-prompt runs, a large one the eager chunked run only; both the warm
    # one-at-a-time prompts
    one, eight = (prof.grid_jobs(load_model(m), processes=3) for m in ("llama-3.2-1b", "llama-3.1-8b"))
    def rates(js):
        return sorted({j["served_rate"] for j in js if j.get("served_rate")})

    def alone(js):  # a budget of one prompt, one output token, no piecewise graphs
        return [(j["n"], j["prompt"]) for j in js
                if j["output"] == 1 and j.get("max_num_tokens") == j["prompt"] and not j.get("piecewise")]

    def chunked(js):
        return [(j["prompt"], j["piecewise"]) for j in js
                if isinstance(j["prompt"], int) and j["prompt"] > j.get("max_num_tokens", 1 << 30)]

    assert rates(one) == [36.0, 58.0] and rates(eight) == [10.0]
    assert sum(j.get("served_rate") == 58.0 for j in one) == 3
    assert alone(one) == alone(eight) == [(40, 128), (24, 768)]
    assert chunked(one) == [(12288, False), (8192, True)] and chunked(eight) == [(12288, False)]
    rows, env = prof.measure_grid(model, str(tiny), processes=2, long_kv_sizes=False, **small)
    labels = [r["workload"] for r in env["power_runs"]]
    assert len(labels) == len(jobs) - 1 == len(set(labels)) and env["grid_processes"] == 2  # served: 2 parts
    # every run gave rows but the power model's, which gave its energy and iterations only
    assert {r["run"] for r in rows} == set(labels) - {"4x32+12"}
    assert "4x32+12" in set(env["grid_iterations"].workload)
    order = {w: i for i, w in enumerate(labels)}  # job i ran in process i mod 2
    assert all(r["process"] == order[r["run"]] % 2 for r in rows)
    assert set(env["grid_iterations"].workload) == set(labels)
    _check_gemm(env, model)
    p = subprocess.run([sys.executable, "-m", "servesim.sim.cli", "calibrate", "--model", "llama-3.2-1b",
                        "--backend", "gpu", "--processes", "0", "--out", str(tmp_path / "x.yaml")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "--processes 0" in p.stderr


def test_prompt_points_split_an_eager_launch_for_a_large_model():
    """With warm prompt-only eager rows (PROMPT_POINTS, now measured for every model) the
    fit splits an eager launch into its common part and the decode attention's
    (host_overhead_eager_decode_s) for the 8B as well: a speculative target's verification
    beside context chunks and every prompt-only step are priced with the common part only
    (and the context chunks' own, host_overhead_context_s). Without them the grid gives only
    an eager decode step's whole launch (test_fit_recovers_known_parameters)."""
    from servesim.gpu_backend import profiler as prof

    model, hw = load_model("llama-3.1-8b"), load_hardware("h100-sxm")
    assert any(j["output"] == 1 and j["keep"] == "skip" and j["max_num_tokens"] == j["prompt"]
               for j in prof.grid_jobs(model))  # the 8B's grid measures them
    rows = read_grid(GRID, "llama-3.1-8b")
    cold = [r["kind"] == "prefill" for r in rows]  # PREFILL_POINTS: each its run's first iteration
    for n, prompt in prof.PROMPT_POINTS:
        rows += [dict(model="llama-3.1-8b", kind="prefill", n_decode=0, kv_sum=0, ctx_tokens=prompt, ctx_prior=0,
                      graph=False, time_s=0.0, n_chunks=1, chunk_tokens=prompt)] * (n - prof.SKIP_FIRST)
    shapes, _, _ = shapes_from_grid(rows)
    true = dict(flops_efficiency=0.8, bandwidth_efficiency=0.85, attention_flops_efficiency=0.4,
                host_overhead_eager_s=0.008, host_overhead_eager_decode_s=0.012, host_overhead_graph_s=3e-4)
    # measured cold (1x2048 took 4x its warm time on an H200)
    times = predict(model, hw, true, shapes) * np.where(cold + [False] * (len(rows) - len(cold)), 3.0, 1.0)
    params, stats = fit(model, hw, [dict(r, time_s=t) for r, t in zip(rows, times)])
    # the launch of a context-only eager pass, and of an eager decode step
    ctx_only = params["host_overhead_eager_s"] + params["host_overhead_context_s"]
    assert ctx_only == pytest.approx(true["host_overhead_eager_s"], rel=0.05)
    eager = params["host_overhead_eager_s"] + params["host_overhead_eager_decode_s"]
    assert eager == pytest.approx(true["host_overhead_eager_s"] + true["host_overhead_eager_decode_s"], rel=0.05)


GRID_H200_1B = "h200/call29-h200-m-1b/calibration/h200-llama-3.2-1b.grid.csv"  # the served runs split in 3 parts


@settings(max_examples=25, deadline=None)
@given(parts=st.integers(1, 6), sizes=st.lists(st.integers(1, 2000), min_size=1, max_size=5))
def test_split_run_weighs_as_one_run(parts, sizes):
    """The parts of a grid run split over the grid's processes (the served run: `part_label`)
    weigh together what the run would unsplit: at most RUN_ROW_CAP rows' worth, as every
    other run; an unlabelled row counts 1."""
    from servesim.sim.calibrate import RUN_ROW_CAP, part_label, row_weights, whole_run

    rows = [dict(run=f"served 10 at 5/s{part_label(p, parts)}") for p in range(parts) for _ in range(sizes[0])]
    rows += [dict(run=f"{i}x64+8") for i, n in enumerate(sizes[1:]) for _ in range(n)] + [dict(run="")]
    w = row_weights(rows)
    by: dict[str, float] = {}
    for r, x in zip(rows, w):
        by[whole_run(r["run"])] = by.get(whole_run(r["run"]), 0.0) + x
    n_of = {"served 10 at 5/s": parts * sizes[0], **{f"{i}x64+8": n for i, n in enumerate(sizes[1:])}}
    for k, n in n_of.items():
        assert by[k] == pytest.approx(min(n, RUN_ROW_CAP)), k
    assert w[-1] == 1.0 and whole_run("8x256+96") == "8x256+96"


def test_fit_recovers_parameters_with_a_served_run_in_parts():
    """Synthetic rows from known parameters on an H200 1B grid (its served runs split over 3
    processes of different host speeds) are fitted back to them; and a served regime the
    model does not represent (its decode steps 12% slower than the model's, as the served
    runs' unequal KV lengths made the H200's) pulls the designed points' prices no more
    than one run's share: weighed as 3 runs (each part a run, the fit before), it moved
    the large decodes' prices further."""
    model, hw = load_model("llama-3.2-1b"), load_hardware("h200-sxm")
    rows = read_grid(committed(GRID_H200_1B), "llama-3.2-1b")[::3]
    shapes, _, kinds = shapes_from_grid(rows)
    true = dict(flops_efficiency=0.7, bandwidth_efficiency=0.5, kv_bandwidth_efficiency=0.65,
                attention_flops_efficiency=0.45, host_overhead_eager_s=0.009, host_overhead_graph_s=8e-5,
                layer_latency_s=2e-5, host_overhead_piecewise_s=2.7e-3, host_overhead_piecewise_decode_s=2e-3,
                context_launch_overlap=0.9)
    speeds = np.array([0.8, 1.25, 1.0])
    proc = calibrate._processes(rows)
    gpu = predict(model, hw, true, shapes, proc, speeds)  # the GPU part and its launches, at each process's speed
    n = np.array([s.n_decode + len(s.ctx_new_tokens) for s in shapes])
    host = speeds[proc] * (3e-4 + 2e-6 * n + 1.7e-7 * np.array([sum(s.ctx_new_tokens) for s in shapes]))
    synth = [dict(r, time_s=g + h, host_s=h) for r, g, h in zip(rows, gpu, host)]
    params, stats = fit(model, hw, synth)
    assert stats["mape"] < 0.01 and stats["process_host_speeds"] == pytest.approx(speeds, rel=0.02)
    for k in ("flops_efficiency", "kv_bandwidth_efficiency"):  # (a batch-1 step's constant terms trade off)
        assert params[k] == pytest.approx(true[k], rel=0.05), k
    assert params["scheduler_overhead_per_request_s"] == pytest.approx(2e-6, rel=0.05)

    served = np.array([r["run"].startswith("served") and k == "decode-graph" for r, k in zip(rows, kinds)])
    large = np.array([not r["run"].startswith("served") and k == "decode-graph" and s.n_decode >= 64
                      for r, k, s in zip(rows, kinds, shapes)])
    assert served.sum() > 1000 and large.sum() >= 20
    biased = [dict(r, time_s=float(r["time_s"]) + 0.12 * g * m) for r, g, m in zip(synth, gpu, served)]
    apart = [dict(r, run=r["run"].replace(" part ", " process ")) for r in biased]  # no longer one run's parts
    err = {}
    for name, grid in (("parts", biased), ("apart", apart)):
        p, _ = fit(model, hw, grid)
        got = predict(model, hw, {**p, **dict.fromkeys(SCHED, 0.0)}, shapes, proc, speeds)
        err[name] = float(np.mean(np.abs(got[large] / gpu[large] - 1)))
    assert err["parts"] < 0.75 * err["apart"], err  # (0.074 vs 0.118 when written)
