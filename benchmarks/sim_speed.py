"""How fast the simulator runs: the whole Azure conversation trace and 2x / 4x of it.

Setup as in Vidur's (MLSys'24) published run on this trace: Llama-2-7B on one H100,
in-flight batching, Poisson arrivals at 6.45 req/s, the trace's own prompt/output lengths
(tiled for 2x and 4x). Each size runs as a fresh `sim run` process, so the wall time
includes Python start-up, imports, loading the trace, simulating, and writing
requests.parquet / iterations.parquet / summary.json (plots off). Peak memory is the
child's max RSS.

Python's bytecode cache: where PYTHONDONTWRITEBYTECODE is set (this project's shared
machine sets it), every process compiles servesim's modules from source (~0.1-0.2 s of
each run). The whole trace is measured both ways: as the environment is, and with the
cache Python keeps by default (in a scratch folder, PYTHONPYCACHEPREFIX; one run first to fill it).

    python benchmarks/sim_speed.py            # prints the table, writes benchmarks/out/sim_speed.md
    python benchmarks/sim_speed.py --write-results   # ... into benchmarks/results/sim_speed.md (tracked)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from results_io import RESULTS, add_write_results  # noqa: E402

VIDUR_WALL_S = 52.0  # Vidur, same trace and setup, 2-core machine (after ~18 min of training)

EXPERIMENT = """\
name: sim_speed_x{mult}
model: llama-2-7b
hardware: h100-sxm
workload:
  trace: {trace}
  arrival: {{kind: poisson, rate_req_s: {rate}}}
scheduler: {{capacity: guaranteed_no_evict, max_batch_size: 256, max_num_tokens: 8192}}
output: {{plots: false, timeline: false}}
{extra}"""
# the row with speculative decoding on (S5): n-gram prompt lookup as experiments/spec_decoding.yaml
# runs it (needs no draft model of the target's vocabulary); iterations with drafts are
# stepped one by one (no closed-form decode stretches), so this row is far slower
SPEC = "speculative: {proposer: ngram, max_draft_len: 4, acceptance: 0.5}\n"
SPEC_LABEL = "1x, speculative decoding (ngram, k 4, acceptance 0.5)"


def tiled_trace(mult: int, out: Path) -> Path:
    from servesim.traces.readers import read_trace

    df = read_trace(REPO / "traces" / "data" / "AzureLLMInferenceTrace_conv.csv")
    parts = [df[["prompt_len", "output_len"]]] * mult
    t = pd.concat(parts, ignore_index=True)
    t.insert(0, "arrival_s", np.zeros(len(t)))  # replaced by the Poisson arrivals
    t.insert(0, "request_id", np.arange(len(t), dtype=np.int64))
    path = out / f"azure_conv_x{mult}.parquet"
    t.to_parquet(path, index=False)
    return path


def run_one(mult: int, work: Path, rate: float, repeats: int, bytecode: bool = False,
            baseline: Path | None = None, spec: bool = False) -> list[dict]:
    """The `sim run` process of the `mult`x trace, `repeats` times: its row. With
    `baseline` (another source tree of servesim, e.g. `git archive` of an older commit),
    that tree's runs alternate with this checkout's (the same moments of a shared
    machine's load) and its row comes first."""
    trace = tiled_trace(mult, work) if mult > 1 else "azure_conv"
    tag = f"x{mult}" + ("_spec" if spec else "")
    exp = work / f"{tag}.yaml"
    exp.write_text(EXPERIMENT.format(mult=mult, trace=trace, rate=rate, extra=SPEC if spec else ""))
    trees = ([("baseline", Path(baseline).resolve())] if baseline is not None else []) + [("this", REPO)]
    cmds = {}
    for label, tree in trees:
        out = work / f"run_{tag}_{label}"
        env = {**os.environ, "COLUMNS": "200"}
        if tree != REPO:  # the package imported from that tree (servesim/__init__.py maps its folders)
            env["PYTHONPATH"] = str(tree)
        if bytecode:  # a cache of its own (the source tree stays as it is, and the other row uncached)
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PYTHONPYCACHEPREFIX"] = str(work / f"pycache_{label}")
        cmd = [sys.executable, "-m", "servesim.sim.cli", "run", str(exp), "--out", str(out)]
        if bytecode:  # fill the cache first (not counted)
            subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree)
        cmds[label] = (cmd, env, tree, out)
    walls: dict[str, list[float]] = {label: [] for label, _ in trees}
    cpus: dict[str, list[float]] = {label: [] for label, _ in trees}  # user + system seconds
    rss: dict[str, int] = {label: 0 for label, _ in trees}
    for _ in range(repeats):  # a shared 2-core machine is noisy: report the median
        for label, (cmd, env, tree, out) in cmds.items():
            log = work / f"{tag}_{label}.log"
            with log.open("w") as fh:
                t0 = time.perf_counter()
                proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=tree)
                _, status, ru = os.wait4(proc.pid, 0)  # (its own peak RSS, not the largest child's so far)
                walls[label].append(time.perf_counter() - t0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                raise SystemExit(f"sim run failed for x{mult} ({label}):\n{log.read_text()}")
            rss[label] = max(rss[label], ru.ru_maxrss)
            cpus[label].append(ru.ru_utime + ru.ru_stime)
    rows = []
    for label, (cmd, env, tree, out) in cmds.items():
        wall = float(np.median(walls[label]))
        summ = json.loads((out / "base" / "summary.json").read_text())
        rows.append({
            "requests": summ["num_requests"],
            "iterations": summ["num_iterations"],
            "wall_s": wall,
            "wall_min_s": min(walls[label]),
            "cpu_s": float(np.median(cpus[label])),
            "sim_s": summ["wall_s"],
            "req_per_wall_s": summ["num_requests"] / wall,
            "iter_per_wall_s": summ["num_iterations"] / wall,
            "peak_rss_mb": rss[label] / 1024,
            "simulated_s": summ["duration_s"],
            "tpot_p50_ms": summ["tpot_s"]["p50"] * 1e3,
            "bytecode": "cached" if bytecode else ("off" if os.environ.get("PYTHONDONTWRITEBYTECODE") else "cached"),
            "code": label,
            "spec": spec,
            "repeats": repeats,
            "summary": summ,
        })
    if len(rows) == 2:  # the same run: the same results (wall time apart)
        a, b = ({k: v for k, v in r["summary"].items() if k != "wall_s"} for r in rows)
        if a != b:
            raise SystemExit(f"x{mult}: the baseline tree's summary differs from this checkout's")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mults", default="1,2,4")
    ap.add_argument("--rate", type=float, default=6.45)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--spec-repeats", type=int, default=1,
                    help="runs of the whole trace with speculative decoding on (its row; 0: none)")
    ap.add_argument("--no-bytecode-row", action="store_true",
                    help="measure the whole trace only as the environment is (no bytecode-cached row)")
    ap.add_argument("--write", help="the table's file (default: sim_speed.md in benchmarks/out/, or in "
                                    "benchmarks/results/ with --write-results; '' for none)")
    ap.add_argument("--baseline", type=Path,
                    help="another source tree of servesim (e.g. `git archive BASE | tar -x -C DIR`): its runs of "
                         "the whole trace alternate with this checkout's, a row each (a before/after under the "
                         "same load)")
    ap.add_argument("--note", default="", help="a sentence for the table's header (the machine's load)")
    ap.add_argument("--baseline-name", default="baseline", help="what the table calls the baseline (its commit)")
    add_write_results(ap)
    args = ap.parse_args()
    if args.write is None:
        args.write = str(RESULTS.out_dir(args.write_results) / "sim_speed.md")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in [int(x) for x in args.mults.split(",")]:
            base = args.baseline if m == 1 else None  # (the whole trace: the row the target is about)
            for r in run_one(m, Path(tmp), args.rate, args.repeats, baseline=base):
                r["mult"] = m
                rows.append(r)
                print(f"x{m} ({r['code']}): {r['wall_s']:.2f} s", file=sys.stderr)
            if m == 1 and os.environ.get("PYTHONDONTWRITEBYTECODE") and not args.no_bytecode_row:
                for r in run_one(m, Path(tmp), args.rate, args.repeats, bytecode=True, baseline=base):
                    r["mult"] = m
                    rows.append(r)
                    print(f"x{m} ({r['code']}, bytecode cached): {r['wall_s']:.2f} s", file=sys.stderr)
        if args.spec_repeats:
            for r in run_one(1, Path(tmp), args.rate, args.spec_repeats, spec=True):
                r["mult"] = 1
                rows.append(r)
                print(f"x1 with speculative decoding ({r['code']}): {r['wall_s']:.2f} s", file=sys.stderr)
    head = ("| trace | code | Python bytecode | requests | iterations | wall s (process, median) | min | CPU s (median) | "
            "of which simulate+records s | requests / wall s | iterations / wall s | peak RSS MB | vs Vidur 52 s |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        vs = f"{VIDUR_WALL_S / r['wall_s']:.0f}x faster" if r["mult"] == 1 and not r["spec"] else "-"
        bc = "cached" if r["bytecode"] == "cached" else "compiled each run"
        code = args.baseline_name if r["code"] == "baseline" else "this commit"
        trace = SPEC_LABEL if r["spec"] else f"{r['mult']}x"
        if r["repeats"] != args.repeats:
            code += f" ({r['repeats']} run{'s' if r['repeats'] > 1 else ''})"
        lines.append(f"| {trace} | {code} | {bc} | {r['requests']:,} | {r['iterations']:,} | {r['wall_s']:.2f} | "
                     f"{r['wall_min_s']:.2f} | {r['cpu_s']:.2f} | "
                     f"{r['sim_s']:.2f} | {r['req_per_wall_s']:,.0f} | {r['iter_per_wall_s']:,.0f} | "
                     f"{r['peak_rss_mb']:.0f} | {vs} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        p = Path(args.write)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(
            "# Simulator speed\n\n"
            f"Command: `python benchmarks/sim_speed.py` ({os.cpu_count()} CPUs, "
            f"{time.strftime('%Y-%m-%d')}). Llama-2-7B, H100-SXM, in-flight batching "
            f"(guaranteed_no_evict, max_batch_size 256), Poisson {args.rate} req/s, Azure conversation "
            "trace lengths (tiled for 2x/4x). Wall time is the whole `sim run` process: start-up, "
            "imports, trace loading, simulation, writing the Parquet outputs (plots off; records "
            "streamed, sim/stream.py); median and minimum of "
            f"{args.repeats} runs each; CPU s: the process's user + system time (less sensitive than the "
            "wall time to other work on the machine, not to it sharing the cores' caches). Python bytecode: 'compiled each run' is this machine's "
            "environment (PYTHONDONTWRITEBYTECODE=1: servesim's modules compiled from source by every "
            "process), 'cached' Python's default bytecode cache (here in a scratch folder, "
            "PYTHONPYCACHEPREFIX; filled by one run first; what a `pip install` gives: it compiles the "
            "package's bytecode at install time)."
            + (f" Baseline rows: {args.baseline_name}, its runs alternating with this commit's (the same "
               "moments of the machine's load)." if args.baseline else "")
            + (f" The speculative-decoding row: the whole trace with {SPEC.strip()} (S5; drafted "
               "iterations are stepped one by one, no closed-form decode stretches)." if args.spec_repeats else "")
            + (f" {args.note}" if args.note else "") + "\n\n"
            + table + "\n")


if __name__ == "__main__":
    main()
