"""S12: outputs fail before the work and are never half-written; Ctrl-C says what it
interrupted and leaves no run that looks finished; what a person sees on long work
(progress by finished requests, a write phase, plain lines when piped); plots that do not
mislead (KV panel, legend, identical variants) and Perfetto slices that do not overlap."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from servesim.sim import rundir
from servesim.sim.cli import main

HERE = Path(__file__).parent
REF = HERE / "data" / "compare" / "reference"

TINY = """\
name: {name}
model: llama-3.2-1b
hardware: h100-sxm
seed: 3
workload:
  trace: azure_conv
  num_requests: 40
  rate_scale: 20
scheduler: {{max_batch_size: 16, max_num_tokens: 4096}}
output: {{plots: {plots}, timeline: {plots}}}
variants:
  - name: ifb
  - name: static
    scheduler: {{capacity: static_batch}}
"""


def tiny(tmp_path: Path, name: str = "tiny", plots: bool = False) -> Path:
    p = tmp_path / f"{name.replace('/', '_')}.yaml"
    p.write_text(TINY.format(name=name, plots=str(plots).lower()))
    return p


def cli(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "servesim.sim.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env={**os.environ, **(env or {})})


def refused(p, *words: str) -> None:
    """Exit 2, a message naming every word, no traceback (p: CompletedProcess or (rc, err))."""
    rc, err = (p.returncode, p.stderr) if isinstance(p, subprocess.CompletedProcess) else p
    assert rc == 2, err
    assert "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)


# ------------------------------------------------------------------ outputs before the work


@pytest.mark.parametrize("case", ["file", "under_file", "proc"])
def test_run_out_not_writable_fails_before_simulating(tmp_path, capsys, case):
    exp = tiny(tmp_path)
    (tmp_path / "f").write_text("x")
    out = {"file": tmp_path / "f", "under_file": tmp_path / "f" / "sub", "proc": Path("/proc/servesim-s12/x")}[case]
    rc = main(["run", str(exp), "--out", str(out)])
    err = capsys.readouterr().err
    refused((rc, err), "--out", str(out))
    assert "simulating" not in err  # refused before any variant ran
    assert (tmp_path / "f").read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
def test_run_out_read_only_folder_fails_before_simulating(tmp_path, capsys):
    exp = tiny(tmp_path)
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        rc = main(["run", str(exp), "--out", str(out)])
    finally:
        out.chmod(0o755)
    err = capsys.readouterr().err
    refused((rc, err), "--out", str(out))
    assert "simulating" not in err


def test_default_runs_folder_not_writable(tmp_path):
    """The default runs/<name> in a working directory where it cannot be made."""
    exp = tiny(tmp_path)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "runs").write_text("a file where the runs folder goes")
    p = cli("run", exp, cwd=cwd)
    refused(p, "runs/tiny", "--out")
    assert "simulating" not in p.stderr
    p = cli("run", exp, cwd="/proc")  # nobody makes folders in /proc, root neither
    refused(p, "runs/tiny", "--out")


def test_compare_out_not_writable(tmp_path):
    (tmp_path / "f").write_text("x")
    for out in (tmp_path / "f", tmp_path / "f" / "sub", Path("/proc/servesim-s12")):
        p = cli("compare", REF, REF, "--out", out)
        refused(p, "--out", str(out))
    assert not (REF / "compare.json").exists()


def test_experiment_name_cannot_escape_the_runs_folder(tmp_path):
    for name in ("../../escape", "a/b", "..", ".hidden"):
        exp = tiny(tmp_path, name)
        refused(cli("validate", exp), "name", repr(name))
        refused(cli("run", exp, cwd=tmp_path), "name", repr(name))
    assert not (tmp_path.parent / "escape").exists() and not (tmp_path / "runs").exists()


def test_only_naming_nothing_is_an_error(tmp_path, capsys):
    exp = tiny(tmp_path)
    for only in (",", "", " , "):
        rc = main(["run", str(exp), "--out", str(tmp_path / "o"), "--only", only])
        refused((rc, capsys.readouterr().err), "--only")
    assert not (tmp_path / "o").exists()


def test_experiment_path_is_a_directory(tmp_path):
    for cmd in ("run", "validate"):
        refused(cli(cmd, tmp_path), str(tmp_path))


def test_calibrate_grid_not_utf8(tmp_path, capsys):
    grid = tmp_path / "grid.csv"
    grid.write_bytes(b"model,kind\n\xff\xfe\x00latin1 \xe9\n")
    rc = main(["calibrate", "--model", "llama-3.2-1b", "--from-grid", str(grid), "--out", str(tmp_path / "p.yaml")])
    refused((rc, capsys.readouterr().err), str(grid), "UTF-8")


def test_calibrate_gpu_without_cuda_refuses_at_once(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    rc = main(["calibrate", "--model", "llama-3.2-1b", "--backend", "gpu", "--out", str(tmp_path / "p.yaml")])
    refused((rc, capsys.readouterr().err), "--backend", "CUDA")
    assert not list(tmp_path.iterdir())  # nothing measured, nothing written


# ------------------------------------------------------------------ unfinished runs


def test_partial_run_refused_by_compare_and_replay(tmp_path, capsys):
    exp = tiny(tmp_path)
    out = tmp_path / "o"
    assert main(["run", str(exp), "--out", str(out), "--only", "ifb"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["comparison.csv", "experiment.json", "ifb"]
    part = rundir.partial_dir(out, "ifb")
    shutil.copytree(out / "ifb", part)  # what a killed run leaves: every file, but still .partial
    capsys.readouterr()
    assert main(["compare", str(out / "ifb"), str(part), "--out", str(tmp_path / "c")]) == 2
    refused((2, capsys.readouterr().err), str(part), "unfinished run", "'ifb'")
    for replay in (part, part / "requests.parquet"):
        rep = tmp_path / "rep.yaml"
        rep.write_text(f"name: rep\nmodel: llama-3.2-1b\nworkload: {{replay: {replay}}}\n"
                       "output: {plots: false, timeline: false}\n")
        refused(cli("run", rep, "--out", tmp_path / "r"), "workload.replay", "unfinished run")
    # a run folder without its files (as an interrupted run used to leave)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(out / "ifb" / "requests.parquet", bare)
    shutil.copy(out / "ifb" / "iterations.parquet", bare)
    rep.write_text(f"name: rep\nmodel: llama-3.2-1b\nworkload: {{replay: {bare}}}\n")
    refused(cli("validate", rep), "workload.replay", "summary.json is missing")
    assert main(["compare", str(out / "ifb"), str(bare), "--out", str(tmp_path / "c")]) == 2
    refused((2, capsys.readouterr().err), "config.yaml is missing")
    # the finished run is accepted, by both
    assert main(["compare", str(out / "ifb"), str(out / "ifb"), "--out", str(tmp_path / "c")]) == 0
    rep.write_text(f"name: rep\nmodel: llama-3.2-1b\nworkload: {{replay: {out / 'ifb'}}}\n")
    assert cli("validate", rep).returncode == 0


SIG = """\
name: sig
model: llama-3.2-1b
hardware: h100-sxm
seed: 1
workload:
  synthetic:
    num_requests: 40000
    arrival: {kind: offline}
    prompt_len: {kind: uniform, low: 50, high: 400}
    output_len: {kind: uniform, low: 10, high: 300}
scheduler: {max_batch_size: 32, max_num_tokens: 2048}
output: {plots: false, timeline: false}
variants:
  - name: first
  - name: second
"""


def test_sigint_says_what_it_interrupted_and_leaves_no_finished_looking_run(tmp_path):
    """Ctrl-C during a run big enough to take several seconds, sent once its progress shows
    (plain lines on stderr: it is a pipe here): exit 130, the variant named, no folder of it
    (finished-looking or .partial), and `sim compare` refuses it. The offline workload (every
    request at t=0) moves by finished requests."""
    exp = tmp_path / "sig.yaml"
    exp.write_text(SIG)
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "servesim.sim.cli", "run", str(exp), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "SERVESIM_PROGRESS_S": "0"})
    seen = []
    try:
        for line in proc.stderr:  # each plain progress line, as it comes
            seen.append(line)
            if line.startswith("sim run: first (1/2): ") and "requests," in line:
                break
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = "".join(seen) + rest
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    done, total = seen[-1].split(": ")[2].split(" requests")[0].split("/")
    assert 0 < int(done.replace(",", "")) < int(total.replace(",", "")) == 40000  # moved, offline
    line = next(ln for ln in err.splitlines() if ln.startswith("interrupted"))
    assert "variant 'first' (1/2" in line, err
    assert "not run: second" in err and "comparison.csv" in err
    assert sorted(p.name for p in out.iterdir()) == ["experiment.json"]
    idx = json.loads((out / "experiment.json").read_text())
    assert idx["status"] == "interrupted" and idx["interrupted"]["variant"] == "first" and idx["runs"] == {}
    refused(cli("compare", out / "first", out / "first", "--out", tmp_path / "c"), str(out / "first"))


def test_interrupt_while_writing_leaves_no_variant_folder(tmp_path, capsys, monkeypatch):
    from servesim.sim import runner

    exp = tiny(tmp_path)
    out = tmp_path / "o"
    real = runner.write_run

    def interrupted(result, out_dir, experiment, variant, phase=None):
        def ph(f):
            phase(f)
            if variant == "static" and f == "summary.json":
                raise KeyboardInterrupt
        real(result, out_dir, experiment, variant, ph)

    monkeypatch.setattr(runner, "write_run", interrupted)
    assert main(["run", str(exp), "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "while writing variant 'static' (2/2)" in err and "finished and written: ifb" in err
    assert sorted(p.name for p in out.iterdir()) == ["experiment.json", "ifb"]
    assert set(json.loads((out / "experiment.json").read_text())["runs"]) == {"ifb"}
    assert rundir.unfinished_problems(out / "ifb") == []


def test_rerun_with_only_warns_about_folders_of_another_configuration(tmp_path, capsys):
    exp = tiny(tmp_path)
    out = tmp_path / "o"
    assert main(["run", str(exp), "--out", str(out)]) == 0
    first = (out / "static" / "requests.parquet").read_bytes()
    capsys.readouterr()
    # same configuration: the other variant's folder is consistent, nothing to say
    assert main(["run", str(exp), "--out", str(out), "--only", "ifb"]) == 0
    assert "did not write" not in capsys.readouterr().err
    idx = json.loads((out / "experiment.json").read_text())
    assert set(idx["runs"]) == {"ifb", "static"} and idx["variants"] == ["ifb"]
    # another configuration (--set): static/ is from the earlier one; an unknown folder too
    (out / "old").mkdir()
    (out / "old" / "summary.json").write_text("{}")
    assert main(["run", str(exp), "--out", str(out), "--only", "ifb", "--set", "seed=4"]) == 0
    warn = next(ln for ln in capsys.readouterr().err.splitlines() if "did not write" in ln)
    assert "static: written by another configuration" in warn and "old: not in experiment.json's index" in warn
    assert "ifb:" not in warn  # rewritten now: not stale
    assert (out / "static" / "requests.parquet").read_bytes() == first  # left as it was
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------ what a person sees


def test_piped_progress_lines_and_write_phase(tmp_path):
    exp = tiny(tmp_path, plots=True)
    p = cli("run", exp, "--out", tmp_path / "o")
    assert p.returncode == 0, p.stderr
    err = p.stderr
    assert "sim run: ifb (1/2): simulating 40 requests" in err
    assert "sim run: ifb (1/2): 40/40 requests" in err and "done" in err
    assert "ifb (1/2): writing requests.parquet" in err and "writing latency_cdf.png" in err
    assert "TTFT p50" in p.stdout  # the table stays on stdout


def test_progress_callback_counts_finished_requests(tmp_path):
    from servesim.sim.config import load_experiment
    from servesim.sim.runner import resolve, simulate

    exp_file = tmp_path / "sig.yaml"
    exp_file.write_text(SIG.replace("40000", "6000"))
    exp = load_experiment(exp_file)
    calls = []
    setup = resolve(exp.variants[0].config, exp.base_dir)
    simulate(setup, progress=lambda now, finished: calls.append((now, finished)))
    assert calls, "no progress call"
    done = [f for _, f in calls]
    assert done == sorted(done) and 0 < done[0] < 6000  # moves although every request arrives at 0


def test_timeline_kv_panel_holds_between_iterations_and_legend_has_arrivals(tmp_path):
    import matplotlib.pyplot as plt

    from servesim.sim.plots import _step_means, timeline_figure

    # one replica: 10 blocks used during [0, 1), then idle until an iteration at [9, 10)
    # using 4: the bins in the idle stretch keep 10, the batch is 0 there
    rep = np.array([0, 0])
    start, end = np.array([0.0, 9.0]), np.array([1.0, 10.0])
    edges = np.linspace(0, 10, 11)
    kv = _step_means(rep, start, end, np.array([10, 4]), edges, hold=True)
    assert np.allclose(kv, [10.0] * 9 + [4.0])
    batch = _step_means(rep, start, end, np.array([3, 2]), edges, hold=False)
    assert np.allclose(batch, [3.0] + [0.0] * 8 + [2.0])
    # two replicas: averaged; a bin straddling a change is time-weighted
    kv2 = _step_means(np.array([0, 1]), np.array([0.0, 0.5]), np.array([1.0, 1.5]), np.array([10, 20]),
                      np.array([0.0, 1.0, 2.0]), hold=True)
    assert np.allclose(kv2, [(10 + 10) / 2, (10 + 20) / 2])
    # the plot itself, from a real run's tables
    exp = tiny(tmp_path)
    out = tmp_path / "o"
    assert main(["run", str(exp), "--out", str(out), "--only", "ifb"]) == 0
    req = pq.read_table(out / "ifb" / "requests.parquet")
    it = pq.read_table(out / "ifb" / "iterations.parquet")
    fig = timeline_figure(req, it, 1000, "t")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any("arrivals" in x for x in labels) and any("output tokens" in x for x in labels)
    plt.close(fig)


def test_latency_cdfs_note_identical_variants(tmp_path):
    from servesim.sim.plots import latency_cdf_figure

    req = pq.read_table(REF / "requests.parquet")
    other = pq.read_table(HERE / "data" / "compare" / "roofline" / "requests.parquet")
    import matplotlib.pyplot as plt

    fig = latency_cdf_figure({"a": req, "b": other, "c": req}, "t")
    for ax in fig.axes[:2]:
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels == ["a", "b", "c (identical to a)"]
    plt.close(fig)


def test_perfetto_slices_do_not_overlap(tmp_path):
    from servesim.sim.timeline import write_chrome_trace

    # back-to-back iterations whose start and duration round separately the wrong way
    rng = np.random.default_rng(0)
    dur = rng.uniform(1e-4, 5e-2, 3000)
    start = np.concatenate([[0.0], np.cumsum(dur)[:-1]])
    n = len(dur)
    z = np.zeros(n, dtype=np.int64)
    it = pa.table({"replica": z, "iteration": np.arange(n), "start_s": start, "duration_s": dur,
                   "num_ctx_requests": z, "num_gen_requests": z + 1, "ctx_tokens": z, "gen_tokens": z + 1,
                   "padded_tokens": z, "kv_blocks_used": z, "graph": np.ones(n, dtype=bool)})
    path = tmp_path / "timeline.json"
    write_chrome_trace(it, path)
    sl = [e for e in json.loads(path.read_text())["traceEvents"] if e["ph"] == "X"]
    assert len(sl) == n
    for a, b in zip(sl, sl[1:]):  # in the decimal text Perfetto reads
        assert Decimal(repr(a["ts"])) + Decimal(repr(a["dur"])) <= Decimal(repr(b["ts"])), (a, b)

