"""End-to-end: the CLI on small experiments, validation errors, determinism."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from servesim.sim.cli import main

HERE = Path(__file__).parent
REPO = HERE.parent

SMALL = """\
name: small
model: llama-3.2-1b
hardware: h100-sxm
seed: 3
workload:
  trace: azure_conv
  num_requests: 300
  rate_scale: 20
  slo: {{ttft_s: 1.0, tpot_s: 0.05}}
scheduler: {{max_batch_size: 32, max_num_tokens: 4096}}
output: {{plots: {plots}}}
variants:
  - name: static
    scheduler: {{capacity: static_batch}}
  - name: ifb
  - name: ifb-maxutil
    scheduler: {{capacity: max_utilization}}
    kv_cache: {{max_tokens: 40000}}
"""


def write_small(tmp_path: Path, plots: bool = False) -> Path:
    p = tmp_path / "small.yaml"
    p.write_text(SMALL.format(plots=str(plots).lower()))
    return p


def test_run_writes_every_output(tmp_path, capsys):
    exp = write_small(tmp_path, plots=True)
    out = tmp_path / "out"
    assert main(["run", str(exp), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ifb-maxutil" in printed and "TTFT p50" in printed
    for v in ("static", "ifb", "ifb-maxutil"):
        d = out / v
        for f in ("requests.parquet", "iterations.parquet", "summary.json", "config.yaml", "timeline.png",
                  "timeline.json"):
            assert (d / f).exists(), f"{v}/{f}"
        s = json.loads((d / "summary.json").read_text())
        for k in ("num_requests", "num_iterations", "duration_s", "ttft_s", "tpot_s", "itl_s", "e2e_s",
                  "throughput_req_s", "throughput_out_tok_s", "goodput_req_s", "kv_util_mean",
                  "prefix_hit_rate", "prefix_hit_rate_all_requests", "backend", "wall_s", "energy_per_token_j"):
            assert k in s, k
        assert s["backend"] == "sim" and s["num_requests"] == 300
        for k in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
            assert set(s[k]) == {"mean", "p50", "p90", "p99"}
            assert s[k]["p50"] <= s[k]["p90"] <= s[k]["p99"]
        req = pq.read_table(d / "requests.parquet")
        assert req.num_rows == 300
        toks = req.column("token_times").to_pylist()
        outs = req.column("output_len").to_pylist()
        status = req.column("status").to_pylist()
        assert all(len(t) == o for t, o, st in zip(toks, outs, status) if st == "finished")
    assert (out / "comparison.csv").exists() and (out / "latency_cdf.png").exists()
    trace = json.loads((out / "ifb" / "timeline.json").read_text())
    it = pq.read_table(out / "ifb" / "iterations.parquet")
    slices = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(slices) == it.num_rows == trace["otherData"]["iterations_written"]
    assert {e["name"] for e in slices} <= {"context", "mixed", "decode"}
    rows = (out / "comparison.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("variant,")
    # the resolved config makes every default explicit
    cfg = (out / "ifb" / "config.yaml").read_text()
    for key in ("max_num_tokens: 4096", "tokens_per_block: 32", "capacity: guaranteed_no_evict",
                "free_gpu_memory_fraction", "code_version", "cuda_graphs: true"):
        assert key in cfg, key


def test_same_seed_same_bytes(tmp_path):
    exp = write_small(tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["run", str(exp), "--out", str(a)]) == 0
    assert main(["run", str(exp), "--out", str(b)]) == 0
    for v in ("static", "ifb", "ifb-maxutil"):
        assert (a / v / "requests.parquet").read_bytes() == (b / v / "requests.parquet").read_bytes()
        assert (a / v / "iterations.parquet").read_bytes() == (b / v / "iterations.parquet").read_bytes()


def test_set_overrides_every_variant(tmp_path):
    exp = write_small(tmp_path)
    out = tmp_path / "o"
    assert main(["run", str(exp), "--out", str(out), "--set", "workload.num_requests=50",
                 "--set", "scheduler.max_batch_size=8"]) == 0
    s = json.loads((out / "ifb" / "summary.json").read_text())
    assert s["num_requests"] == 50
    it = pq.read_table(out / "ifb" / "iterations.parquet")
    n = it.column("num_ctx_requests").to_numpy() + it.column("num_gen_requests").to_numpy()
    assert n.max() <= 8


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "servesim.sim.cli", *args], capture_output=True,
                          text=True, cwd=REPO)


def test_sim_run_process_ends_with_its_output_complete(tmp_path):
    """`python -m servesim.sim.cli run` ends without the interpreter's teardown (cli.exit_now):
    its exit status, everything it printed to the pipes and its files are all there."""
    exp = tmp_path / "e.yaml"
    exp.write_text("name: e\nmodel: llama-3.1-8b\nhardware: h100-sxm\nworkload:\n  synthetic:\n"
                   "    num_requests: 20\n    arrival: {kind: poisson, rate_req_s: 5}\n"
                   "    prompt_len: {kind: constant, value: 64}\n    output_len: {kind: constant, value: 8}\n"
                   "output: {plots: false}\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # (stdout block-buffered: a pipe's)
    p = subprocess.run([sys.executable, "-m", "servesim.sim.cli", "run", str(exp), "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=REPO, env=env)
    assert p.returncode == 0, p.stderr
    assert "comparison.csv" in p.stdout and "20 requests" in p.stdout  # (the last lines printed)
    assert "writing comparison.csv" in p.stderr
    for name in ("requests.parquet", "iterations.parquet", "summary.json", "config.yaml"):
        assert (tmp_path / "out" / "base" / name).is_file(), name
    assert json.loads((tmp_path / "out" / "base" / "summary.json").read_text())["num_finished"] == 20
    assert pq.read_table(tmp_path / "out" / "base" / "requests.parquet").num_rows == 20
    p = run_cli("run", str(exp), "--out", str(tmp_path / "out"), "--set", "scheduler.max_batch_size=0")
    assert p.returncode == 2 and "scheduler.max_batch_size" in p.stderr


def test_sim_run_asks_numpy_for_single_threaded_blas(monkeypatch):
    """`sim run` before NumPy is imported: OPENBLAS_NUM_THREADS=1 unless set; other commands,
    a value already set, or NumPy already imported: left alone."""
    from servesim.sim import cli

    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    cli._single_threaded_blas(["run", "e.yaml"])  # (NumPy is imported here: too late)
    assert "OPENBLAS_NUM_THREADS" not in os.environ
    monkeypatch.delitem(sys.modules, "numpy")
    cli._single_threaded_blas(["validate", "e.yaml"])
    assert "OPENBLAS_NUM_THREADS" not in os.environ
    cli._single_threaded_blas(["run", "e.yaml"])
    assert os.environ["OPENBLAS_NUM_THREADS"] == "1"
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "4")
    cli._single_threaded_blas(["run", "e.yaml"])
    assert os.environ["OPENBLAS_NUM_THREADS"] == "4"


def test_validate_reports_every_problem_with_key_paths():
    p = run_cli("validate", str(HERE / "data" / "broken.yaml"))
    assert p.returncode == 2
    err = p.stderr
    assert "Traceback" not in err
    assert "broken.yaml" in err
    assert "workload.rate_scal" in err and "unknown key" in err
    assert "workload.arrival.rate_req_s" in err
    assert "scheduler.max_batch_size" in err
    assert "variants[0].scheduler.capacity" in err
    assert "variants[1].scheduler.max_num_tokens" in err


def test_bad_set_and_missing_file():
    p = run_cli("run", "no/such.yaml")
    assert p.returncode == 2 and "no such experiment file" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("validate", "experiments/ifb_vs_static.yaml", "--set", "scheduler.max_num_tokens=0")
    assert p.returncode == 2 and "--set scheduler.max_num_tokens" in p.stderr


def test_model_that_does_not_fit(tmp_path):
    exp = tmp_path / "big.yaml"
    exp.write_text("name: big\nmodel: llama-2-70b\nhardware: h100-sxm\nworkload: {trace: azure_conv}\n")
    p = run_cli("validate", str(exp))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "GB" in p.stderr and "llama-2-70b" in p.stderr.lower()


def test_missing_and_malformed_trace(tmp_path):
    exp = tmp_path / "t.yaml"
    exp.write_text("name: t\nworkload: {trace: nothere.csv}\n")
    p = run_cli("validate", str(exp))
    assert p.returncode == 2 and "nothere.csv" in p.stderr and "Traceback" not in p.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,10,5\n"
                   "2023-11-16 18:15:47.0,abc,5\n")
    exp.write_text("name: t\nworkload: {trace: bad.csv}\n")
    p = run_cli("validate", str(exp))
    assert p.returncode == 2 and "line 3" in p.stderr and "Traceback" not in p.stderr


def test_shipped_experiments_validate():
    files = sorted(str(p) for p in (REPO / "experiments").glob("*.yaml"))
    assert files
    p = run_cli("validate", *files)
    assert p.returncode == 0, p.stderr


S2_BAD = """\
name: s2bad
model: llama-3.1-8b
workload: {trace: azure_conv}
scheduler: {enable_chunked_context: true, chunk_size: 100}
kv_cache:
  enable_block_reuse: true
  host_cache_size_gb: 5000
  retention:
    token_ranges:
      - {start: 0, end: 100, priority: 120}
"""


def test_s2_bad_input(tmp_path):
    exp = tmp_path / "s2bad.yaml"
    exp.write_text(S2_BAD)
    p = run_cli("validate", str(exp))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "kv_cache.retention.token_ranges[0].priority" in p.stderr
    # once the priority is fixed: overlapping ranges
    exp.write_text(S2_BAD.replace("priority: 120}", "priority: 90}\n      - {start: 50, end: 200, priority: 60}"))
    p = run_cli("validate", str(exp))
    assert p.returncode == 2 and "overlap" in p.stderr and "kv_cache.retention" in p.stderr
    exp.write_text(S2_BAD.replace("priority: 120}", "priority: 90}"))
    p = run_cli("validate", str(exp))
    assert p.returncode == 2 and "chunk_size" in p.stderr and "multiple of" in p.stderr
    exp.write_text(S2_BAD.replace("priority: 120}", "priority: 90}").replace("chunk_size: 100", "chunk_size: 128"))
    p = run_cli("validate", str(exp))
    assert p.returncode == 2 and "kv_cache.host_cache_size_gb" in p.stderr and "host memory" in p.stderr


def test_block_hashes_disagreeing_with_block_size(tmp_path):
    t = tmp_path / "t.csv"
    t.write_text("# hash_block_size=16\nrequest_id,arrival_s,prompt_len,output_len,block_hashes\n"
                 "0,0.0,40,5,1 2 3\n1,0.5,40,5,1 2\n")
    exp = tmp_path / "e.yaml"
    exp.write_text("name: e\nworkload: {trace: t.csv}\nkv_cache: {enable_block_reuse: true}\n")
    p = run_cli("validate", str(exp))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "t.csv" in p.stderr and "block_hashes" in p.stderr
