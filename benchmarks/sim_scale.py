"""How the simulator's wall time and memory grow with the number of requests.

The workload of issue S8's measurement: Llama-3.1-8B on one H100-SXM, in-flight batching,
Poisson arrivals at 20 req/s, lognormal prompts (mean 500 tokens, sigma 0.5) and outputs
(mean 200, sigma 0.5). Each size runs as its own `sim run` process (records streamed to
Parquet as the run goes, sim/stream.py); its wall time is the whole process and its
peak memory the child's max RSS (resource.getrusage(RUSAGE_CHILDREN) after it exits; one
child per measurement: a fresh `python` runs this script's --one for each size).

    python benchmarks/sim_scale.py                    # 100k, 1M, 4M: the table, in benchmarks/out/sim_scale.md
    python benchmarks/sim_scale.py --write-results    # ... into benchmarks/results/sim_scale.md (tracked)
    python benchmarks/sim_scale.py --sizes 20000,100000   # other sizes
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from results_io import RESULTS, add_write_results  # noqa: E402

EXPERIMENT = """\
name: sim_scale_{n}
model: llama-3.1-8b
hardware: h100-sxm
seed: 0
workload:
  synthetic:
    num_requests: {n}
    arrival: {{kind: poisson, rate_req_s: {rate}}}
    prompt_len: {{kind: lognormal, mean: 500, sigma: 0.5}}
    output_len: {{kind: lognormal, mean: 200, sigma: 0.5}}
scheduler: {{capacity: guaranteed_no_evict, max_batch_size: 256, max_num_tokens: 8192}}
output: {{plots: false, timeline: false}}
"""


def one(n: int, rate: float, work: Path) -> dict:
    """One size in a child process of its own: (wall s, peak RSS MB, the run's summary)."""
    exp = work / f"n{n}.yaml"
    exp.write_text(EXPERIMENT.format(n=n, rate=rate))
    out = work / f"run_{n}"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "servesim.sim.cli", "run", str(exp), "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "COLUMNS": "200"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"sim run failed for {n:,} requests:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    summ = json.loads((out / "base" / "summary.json").read_text())
    sizes = {f: (out / "base" / f).stat().st_size / 1e6 for f in ("requests.parquet", "iterations.parquet")}
    return {"requests": summ["num_requests"], "iterations": summ["num_iterations"], "wall_s": wall,
            "sim_s": summ["wall_s"], "peak_rss_mb": rss_mb, "simulated_s": summ["duration_s"],
            "ttft_p99_s": summ["ttft_s"]["p99"], "itl_p99_ms": summ["itl_s"]["p99"] * 1e3,
            "requests_mb": sizes["requests.parquet"], "iterations_mb": sizes["iterations.parquet"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100000,1000000,4000000")
    ap.add_argument("--rate", type=float, default=20.0)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one size, print JSON
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--write", help="the table's file (default: sim_scale.md in benchmarks/out/, or in "
                                    "benchmarks/results/ with --write-results; '' for none)")
    add_write_results(ap)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, args.rate, Path(args.work))))
        return
    if args.write is None:
        args.write = str(RESULTS.out_dir(args.write_results) / "sim_scale.md")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(x) for x in args.sizes.split(",")]:
            # a fresh measuring process per size: RUSAGE_CHILDREN's max is over all children
            proc = subprocess.run([sys.executable, __file__, "--one", str(n), "--rate", str(args.rate),
                                   "--work", tmp], capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr or proc.stdout)
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(f"{n:,}: {r['wall_s']:.1f} s, {r['peak_rss_mb']:.0f} MB", file=sys.stderr)
            for f in Path(tmp).glob(f"run_{n}"):  # the next size's disk
                subprocess.run(["rm", "-rf", str(f)])
    head = ("| requests | iterations | wall s (process) | of which simulate + records s | requests / wall s | "
            "peak RSS MB | RSS KB / request | requests.parquet MB | iterations.parquet MB | simulated s | "
            "TTFT p99 s | ITL p99 ms |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['requests']:,} | {r['iterations']:,} | {r['wall_s']:.1f} | {r['sim_s']:.1f} | "
                     f"{r['requests'] / r['wall_s']:,.0f} | {r['peak_rss_mb']:,.0f} | "
                     f"{r['peak_rss_mb'] * 1024 / r['requests']:.2f} | {r['requests_mb']:,.0f} | "
                     f"{r['iterations_mb']:,.0f} | {r['simulated_s']:,.0f} | {r['ttft_p99_s']:.3f} | "
                     f"{r['itl_p99_ms']:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        p = Path(args.write)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(
            "# Simulator scale: wall time and memory against the number of requests\n\n"
            f"Command: `nice python benchmarks/sim_scale.py --write-results` ({os.cpu_count()} CPUs, shared; "
            f"{time.strftime('%Y-%m-%d')}). Llama-3.1-8B, H100-SXM, in-flight batching (guaranteed_no_evict, "
            f"max_batch_size 256, max_num_tokens 8192), Poisson {args.rate:g} req/s, lognormal prompts "
            "(mean 500, sigma 0.5) and outputs (mean 200, sigma 0.5). One `sim run` process per size: "
            "wall time of the whole process, peak RSS of that process (getrusage of the child). Records "
            "stream to Parquet as the run goes (sim/stream.py); the summary is made in batches of the "
            "written rows (sim/stream_summary.py), its percentiles exact (gathered up to 4Mi values, "
            "else selected in passes over the written columns).\n\n"
            "Before streaming (issue S8): 1M requests took 110 s and 13.2 GB peak RSS (~13 KB per request, "
            "linear; 200k: ~4.6 GB).\n\n" + table + "\n")


if __name__ == "__main__":
    main()
