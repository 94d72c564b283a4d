"""Where a step's time goes, from the GPU runs' own records (no GPU needed): per iteration
kind and batch size, the median step and its parts as the executor times them.

    python benchmarks/step_anatomy.py [--write-results]     # -> step_anatomy.md

Every GPU-backend iteration records its wall time (``duration_s``), the executor's whole
``execute()`` call (``host_exec_s``; ``exec_s`` in a grid's iterations) and the input
packing up to the launch (``host_prep_s`` / ``prep_s``). So a step splits into

* outside: duration - exec, the engine's scheduling and bookkeeping (Python),
* prep: packing the step's inputs (ids, positions, KV slots, block tables) and copying
  them to the GPU,
* exec - prep: the launch (a graph replay, piecewise pieces and eager attention, or an
  eager forward), the GPU's work, the sampler, the wait and the collection of the tokens.
  The records cannot split this part between the host and the GPU (no GPU-side timer).

The host part the fit's scheduler terms see is outside + prep (`sim/calibrate.py`
`fit_host`). The last table: the host part of decode steps by how many steps after an idle
gap of over 5 ms they ran (the CPU's clocks and caches coming back), in the grid's served
and cached-prefix runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from results_io import RESULTS as STORE  # noqa: E402
from results_io import add_write_results  # noqa: E402

# the H200 calls whose runs and grids the table reads: (call, [runs], grid call)
RUNS = (("20261202-1830-h200-sxm", ("8b-online-low", "8b-online-high", "8b-offline")),
        ("20261202-1857-h200-sxm", ("1b-online-low", "1b-online-high", "1b-offline")))
GRIDS = (("20261202-1830-h200-sxm", "llama-3.1-8b"), ("20261202-1830-h200-sxm", "llama-3.2-1b"))
BATCH = (0, 1, 4, 8, 16, 32, 48, 64, 96, 128, 256)
IDLE_GAP_S, WARM_AFTER = 5e-3, 16


def kind(it: pd.DataFrame) -> pd.Series:
    """decode-graph / decode-eager / mixed / mixed-piecewise / prefill / prefill-piecewise
    (sim/calibrate.py's kinds: an iteration with chunks and the graph flag ran piecewise)."""
    ctx, gen, g = it.num_ctx_requests > 0, it.num_gen_requests > 0, it.graph.astype(bool)
    out = np.where(~ctx, np.where(g, "decode-graph", "decode-eager"),
                   np.where(gen, "mixed", "prefill") + np.where(g, "-piecewise", ""))
    return pd.Series(out, index=it.index)


def parts(it: pd.DataFrame, exec_col: str, prep_col: str) -> pd.DataFrame:
    d = pd.DataFrame({"kind": kind(it), "batch": it.num_gen_requests, "step": it.duration_s,
                      "outside": it.duration_s - it[exec_col], "prep": it[prep_col],
                      "rest": it[exec_col] - it[prep_col]})
    d["bucket"] = pd.cut(d.batch, BATCH, right=True, include_lowest=True)
    return d


def steps_since_gap(it: pd.DataFrame) -> np.ndarray:
    start = it.start_s.to_numpy(float)
    end = start + it.duration_s.to_numpy(float)
    gap = np.ones(len(start), dtype=bool)
    gap[1:] = start[1:] - end[:-1] > IDLE_GAP_S
    idx = np.arange(len(start))
    return idx - np.maximum.accumulate(np.where(gap, idx, 0))


def anatomy_rows(d: pd.DataFrame, label: str) -> list[str]:
    rows = []
    for (k, b), g in d.groupby(["kind", "bucket"], observed=True, sort=True):
        if len(g) < 5:
            continue
        m = g[["step", "outside", "prep", "rest"]].median() * 1e3
        rows.append(f"| {label} | {k} | {b.left + 1:.0f}-{b.right:.0f} | {len(g)} | {m.step:.3f} | {m.outside:.3f} | "
                    f"{m.prep:.3f} | {m.rest:.3f} | {100 * (m.outside + m.prep) / m.step:.0f}% |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_write_results(ap)
    args = ap.parse_args()
    head = ["| run | kind | batch | steps | step ms | outside ms | prep ms | exec - prep ms | host share |",
            "|---|---|---|---|---|---|---|---|---|"]
    lines = list(head)
    for call, runs in RUNS:
        for run in runs:
            it = pd.read_parquet(STORE.path(f"h200/{call}/runs/{run}/iterations.parquet"))
            lines += anatomy_rows(parts(it, "host_exec_s", "host_prep_s"), run)
    grid_lines = list(head)
    cold_lines = ["| grid | runs | steps after a gap | decode steps | host (outside + prep) ms | exec - prep ms |",
                  "|---|---|---|---|---|---|"]
    for call, model in GRIDS:
        it = pd.read_parquet(STORE.path(f"h200/{call}/calibration/h200-{model}.grid.iterations.parquet"))
        served = it[it.workload.str.startswith("served")]
        grid_lines += anatomy_rows(parts(served, "exec_s", "prep_s"), f"{model} grid, served")
        for what, sel in (("served", it.workload.str.startswith("served")),
                          ("cached prefix", it.workload.str.contains("cached"))):
            runs = [g.assign(since=steps_since_gap(g)) for _, g in it[sel].groupby("workload", sort=False)]
            r = pd.concat(runs)
            r = r[(r.num_ctx_requests == 0) & (r.num_gen_requests <= 4)]
            for lo, hi in ((0, 1), (2, 4), (5, WARM_AFTER - 1), (WARM_AFTER, 1 << 30)):
                g = r[(r.since >= lo) & (r.since <= hi)]
                if len(g) < 3:
                    continue
                host = (g.duration_s - g.exec_s + g.prep_s).median() * 1e3
                rest = (g.exec_s - g.prep_s).median() * 1e3
                span = f"{lo}-{hi}" if hi < 1 << 30 else f">= {lo}"
                cold_lines.append(f"| {model} | {what} | {span} | {len(g)} | {host:.3f} | {rest:.3f} |")
    text = ("# Where a step's time goes (H200, from the GPU runs' records)\n\n"
            "Command: `python benchmarks/step_anatomy.py --write-results` (reads the archived H200 calls "
            f"{', '.join(c for c, _ in RUNS)}; no GPU). Medians per iteration kind and batch size: the step, "
            "outside the executor (scheduling, bookkeeping), the input packing (prep), and the rest of the "
            "executor's call (launch + GPU work + sampler + wait + collection; the records cannot split it "
            "between host and GPU). Host share: (outside + prep) / step.\n\n"
            "## Fidelity runs\n\n" + "\n".join(lines) + "\n\n## The calibration grid's served runs\n\n"
            + "\n".join(grid_lines) + "\n\n## Host part after an idle gap (decode steps of 1-4 requests)\n\n"
            f"Steps counted from the last gap of over {IDLE_GAP_S * 1e3:g} ms between iterations (or the run's "
            "start).\n\n" + "\n".join(cold_lines) + "\n")
    out = STORE.out_dir(args.write_results) / "step_anatomy.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
