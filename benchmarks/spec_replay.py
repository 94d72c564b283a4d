"""Replay a gpu_spec_decoding.py call's GPU runs on the simulator with calibration profiles
(anywhere, no GPU): the speedups of speculative decoding measured on the GPU beside the
calibrated simulator's, for the same requests and the same accepted drafts.

    python benchmarks/spec_replay.py benchmarks/results/spec_gpu/call2_runs.tar.gz [more.tar.gz] \\
        --profile profiles/h200-llama-3.1-8b.yaml --draft-profile profiles/h200-llama-3.2-1b.yaml \\
        [--write-results]

Writes spec_replay.md into benchmarks/out/ (benchmarks/results/ with --write-results).
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from gpu_spec_decoding import sim_replay  # noqa: E402
from results_io import RESULTS as STORE  # noqa: E402
from results_io import add_write_results  # noqa: E402


def _step_error(run: Path, sim_iterations, batch: int) -> tuple[float, float | None]:
    """sim / GPU - 1 of the median duration of the run's drafting iterations: decode-only
    ones at the full batch, and those beside context chunks (None: none) -- the same
    iterations on both (the replay schedules the same requests and accepts the same drafts)."""
    import numpy as np
    import pyarrow.parquet as pq

    gpu = pq.read_table(run / "iterations.parquet").to_pydict()
    sim = sim_iterations.to_pydict()
    ctx = np.asarray(gpu["num_ctx_requests"])
    drafting = np.asarray(gpu["draft_tokens_proposed"]) > 0
    dec = (ctx == 0) & (np.asarray(gpu["num_gen_requests"]) == batch) & drafting
    mixed = (ctx > 0) & drafting
    g, s = np.asarray(gpu["duration_s"]), np.asarray(sim["duration_s"])
    if len(s) != len(g):
        raise RuntimeError(f"{run.name}: the replay ran {len(s)} iterations, the GPU {len(g)}")
    return (float(np.median(s[dec]) / np.median(g[dec]) - 1),
            float(np.median(s[mixed]) / np.median(g[mixed]) - 1) if mixed.any() else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tarballs", nargs="+", type=Path)
    ap.add_argument("--profile", help="the target's calibration profile (default: the runs' own cost model, "
                    "the roofline)")
    ap.add_argument("--draft-profile", help="the drafter's calibration profile")
    add_write_results(ap)
    args = ap.parse_args()
    rows, plain, steps_err = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, tb in enumerate(args.tarballs):
            with tarfile.open(tb) as tf:
                tf.extractall(Path(tmp) / str(i), filter="data")
            for run in sorted((Path(tmp) / str(i) / "runs").iterdir()):
                cfg = yaml.safe_load((run / "config.yaml").read_text())["config"]
                gpu = json.loads((run / "summary.json").read_text())
                res = sim_replay(cfg, run, args.profile, args.draft_profile)
                sim = res["summary"]
                if cfg.get("speculative"):
                    steps_err[run.name] = _step_error(run, res["iterations"], cfg["scheduler"]["max_batch_size"])
                batch = cfg["scheduler"]["max_batch_size"]
                rec = {"name": run.name, "batch": batch, "spec": cfg.get("speculative"),
                       "gpu_tpot": gpu["tpot_s"]["p50"], "sim_tpot": sim["tpot_s"]["p50"],
                       "gpu_tok": gpu["throughput_out_tok_s"], "sim_tok": sim["throughput_out_tok_s"]}
                if not rec["spec"]:
                    plain[(i, batch)] = rec
                else:
                    rec["call"] = i
                    rows.append(rec)
    lines = ["# Speculative decoding: GPU against the calibrated simulator\n",
             f"Command: `python benchmarks/spec_replay.py {' '.join(str(t) for t in args.tarballs)} --profile "
             f"{args.profile} --draft-profile {args.draft_profile}`. The GPU runs of benchmarks/gpu_spec_decoding.py "
             "(one H200; Llama-3.1-8B target, Llama-3.2-1B drafter, controlled acceptance) replayed on the simulator "
             "with the H200 calibration profiles of both models (fitted in another device call to the designed grid, "
             "never to these runs). Speedup = plain / speculative TPOT p50 and speculative / plain tok/s, each "
             "against plain decoding at the same batch in the same call.\n",
             "The simulator prices a drafting iteration as the GPU backend runs it (sim/speculation.py): the "
             "drafter's k decode steps through its own CUDA graphs (also beside context chunks), each costing its "
             "GPU time; the verification as a context pass of 1 + k tokens per request over its KV, every position "
             "sampled, through the verification's piecewise graphs (decode-only iterations) or eagerly (with context "
             "chunks); the verification's launch overlapping the drafter's GPU work.\n",
             "| run | batch | GPU TPOT ms plain -> spec | sim TPOT ms plain -> spec | GPU TPOT speedup | sim | diff | "
             "GPU tput speedup | sim | diff |", "|---|---|---|---|---|---|---|---|---|---|"]
    diffs = []
    for r in rows:
        # the plain run of the same call (tarball) and batch: GPUs of two calls differ by up to 8%
        p = plain.get((r["call"], r["batch"]))
        if p is None:
            continue
        gt, st = p["gpu_tpot"] / r["gpu_tpot"], p["sim_tpot"] / r["sim_tpot"]
        gr, sr = r["gpu_tok"] / p["gpu_tok"], r["sim_tok"] / p["sim_tok"]
        diffs += [st / gt - 1, sr / gr - 1]
        lines.append(f"| {r['name']} | {r['batch']} | {1e3 * p['gpu_tpot']:.2f} -> {1e3 * r['gpu_tpot']:.2f} | "
                     f"{1e3 * p['sim_tpot']:.2f} -> {1e3 * r['sim_tpot']:.2f} | {gt:.2f}x | {st:.2f}x | "
                     f"{100 * (st / gt - 1):+.1f}% | {gr:.2f}x | {sr:.2f}x | {100 * (sr / gr - 1):+.1f}% |")
    within = sum(abs(d) <= 0.05 for d in diffs)
    lines.append(f"\nMean |sim/GPU - 1| of the speedups: {100 * sum(map(abs, diffs)) / len(diffs):.1f}%; "
                 f"{within} of {len(diffs)} within 5%.\n")
    steps = sorted(steps_err.items())
    lines.append("Drafting iterations, median duration (the simulator against the GPU): decode-only at the full "
                 "batch / beside context chunks: " + "; ".join(
                     f"{n}: {100 * d:+.1f}% / " + ("-" if m is None else f"{100 * m:+.1f}%") for n, (d, m) in steps)
                 + ".\n")
    lines.append(f"Plain decoding, absolute (the {'calibrated ' if args.profile else ''}simulator against the GPU): " + "; ".join(
        f"{args.tarballs[i].name} batch {b}: TPOT {100 * (p['sim_tpot'] / p['gpu_tpot'] - 1):+.1f}%"
        for (i, b), p in sorted(plain.items())) + ".\n")
    text = "\n".join(lines)
    out = STORE.out_dir(args.write_results) / "spec_replay.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
