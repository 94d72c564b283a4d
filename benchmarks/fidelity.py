"""Simulator fidelity: replay real GPU runs on the simulator, roofline and calibrated.

For every GPU run under benchmarks/results/gpu_runs/ (made by benchmarks/gpu_bench.py on
an H100), the same requests are replayed on the simulator (`workload: {replay: RUN}`,
every other setting taken from the GPU run's resolved config) with the roofline cost model
and with the calibrated profile of that model (profiles/h100-<model>.yaml, fitted on the
separate decode/prefill grid -- never on these workloads), and `sim compare` gives the
errors. Writes benchmarks/results/fidelity.md.

    python benchmarks/fidelity.py
"""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "benchmarks" / "results" / "gpu_runs"
STATS = [("ttft_s", "p50"), ("ttft_s", "p90"), ("ttft_s", "p99"), ("tpot_s", "p50"), ("tpot_s", "p99"),
         ("itl_s", "p50"), ("itl_s", "p99"), ("e2e_s", "p50"), ("e2e_s", "p99"),
         ("throughput_out_tok_s", "value")]


def replay(run: Path, kind: str, out: Path) -> Path:
    from servesim.sim.cli import main

    cfg = yaml.safe_load((run / "config.yaml").read_text())["config"]
    cfg["workload"] = {"replay": str(run)}
    cfg["output"] = {"plots": False}
    if kind == "calibrated":
        cfg["cost_model"] = {"kind": "calibrated", "profile": str(REPO / "profiles" / f"h100-{cfg['model']}.yaml")}
    exp = out / f"{run.name}-{kind}.yaml"
    exp.write_text(yaml.safe_dump({"name": f"{run.name}-{kind}", **cfg}))
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["run", str(exp), "--out", str(out / f"{run.name}-{kind}")]) == 0
    return out / f"{run.name}-{kind}" / "base"


def main() -> None:
    from servesim.sim.compare import compare_runs

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for run in sorted(p for p in RUNS.iterdir() if (p / "requests.parquet").exists()):
            for kind in ("roofline", "calibrated"):
                sim_run = replay(run, kind, tmp)
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    c = compare_runs(run, sim_run, tmp / f"cmp-{run.name}-{kind}", quiet=True)
                errs = {(m["metric"], m["stat"]): m["rel_err"] for m in c["metrics"]}
                rows.append((run.name, kind, [errs.get(s) for s in STATS], c["iterations"]["mape"]))
    head = "| GPU run (Llama-3.1-8B, H100) | sim cost model | " + " | ".join(
        f"{m.replace('_s', '').replace('_out_tok', ' tok/s').upper()} {s if s != 'value' else ''}" for m, s in STATS
    ) + " | iteration MAPE |"
    lines = [head, "|" + "---|" * (len(STATS) + 3)]
    for name, kind, errs, mape in rows:
        cells = " | ".join("-" if e is None else f"{e:+.0%}" for e in errs)
        lines.append(f"| {name} | {kind} | {cells} | {mape:.0%} |")
    for kind in ("roofline", "calibrated"):
        vals = [abs(e) for n, k, errs, _ in rows if k == kind for e in errs if e is not None]
        lines.append(f"| **mean abs. error** | {kind} | {sum(vals) / len(vals):.0%} over all cells |" +
                     " |" * (len(STATS)))
    table = "\n".join(lines)
    print(table)
    page = REPO / "benchmarks" / "results" / "fidelity.md"
    marker = "\n## Reading the table"
    old = page.read_text() if page.exists() else ""
    analysis = old[old.index(marker):] if marker in old else ""  # hand-written analysis: kept
    page.write_text(
        "# Simulator fidelity against the GPU\n\n"
        "Command: `python benchmarks/fidelity.py`. Each cell is the simulator's relative error "
        "(sim - GPU) / GPU on the same requests (`sim compare GPU_RUN SIM_RUN`). GPU runs: "
        "benchmarks/results/gpu_runs/ (400 Azure-conversation requests each, Llama-3.1-8B, random "
        "weights, bf16, one H100, made by benchmarks/gpu_bench.py). Calibrated = "
        "profiles/h100-llama-3.1-8b.yaml, fitted to the separate grid of designed workloads "
        "(benchmarks/results/calibration_h100_engine_llama-3.1-8b.csv), never to these workloads.\n\n" + table + "\n" + analysis)


if __name__ == "__main__":
    sys.exit(main())
