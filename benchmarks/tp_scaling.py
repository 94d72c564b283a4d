"""Tensor / pipeline-parallel scaling of Llama-3.1-70B (experiments/tp_scaling.yaml) beside
TensorRT-LLM's published figures, as a Markdown table.

    python benchmarks/tp_scaling.py                 # simulate the experiment (seconds), print the table
    python benchmarks/tp_scaling.py --run runs/tp_scaling   # tabulate a run made earlier

Per-GPU efficiency is a layout's output tokens/s per GPU over the same hardware and
precision's smallest layout's (TP1 where 70B fits one GPU, else TP2).

Published figures (NVIDIA, TensorRT-LLM "Performance Overview", ISL/OSL 128/128, total
output tokens/s, trtllm-bench offline throughput): Llama 3.3 70B FP8 -- same architecture
and vocabulary as Llama 3.1 70B -- on one H200 (TP1) 3,803 and on two H100s (TP2) 6,378
(docs/source/performance/perf-overview.md, v1.0 table); the only TP sweep of a 70B model
there is FP4 on B200: TP1/2/4/8 11,253 / 17,868 / 24,945 / 27,471 (v0.19.0 page), and the
only PP sweep FP4 on RTX 6000 Pro Blackwell (PCIe): TP1 x PP1/2/4/8 3,264 / 6,172 /
9,641 / 11,881. Other GPUs and precision than ours: compare their efficiencies, not their
tokens/s.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PUBLISHED = {"h200-fp8-tp1": 3803, "h100-fp8-tp2": 6378}
B200_FP4_TP = {1: 11253.28, 2: 17867.66, 4: 24944.50, 8: 27471.49}
RTX_FP4_PP = {1: 3264, 2: 6172, 4: 9641, 8: 11881}


def simulate(only: list[str] | None, out: Path) -> Path:
    from servesim.sim.cli import main

    args = ["run", str(REPO / "experiments/tp_scaling.yaml"), "--out", str(out)]
    if only:
        from servesim.sim.config import load_experiment

        names = [v.name for v in load_experiment(REPO / "experiments/tp_scaling.yaml").variants]
        missing = sorted(set(only) - set(names))
        if missing:
            sys.exit(f"no such variants: {', '.join(missing)}")
    if main(args) != 0:
        sys.exit("sim run failed")
    return out


def rows(run: Path, only: list[str] | None = None) -> list[dict]:
    import yaml

    out = []
    with open(run / "comparison.csv") as f:
        for r in csv.DictReader(f):
            if only and r["variant"] not in only:
                continue
            cfg = yaml.safe_load((run / r["variant"] / "config.yaml").read_text())["config"]
            cl = cfg["cluster"]
            tp, pp = cl["tensor_parallel"], cl.get("pipeline_parallel", 1)
            out.append({"variant": r["variant"], "hardware": cfg["hardware"], "precision": cfg["model_precision"]
                        or "bf16", "tp": tp, "pp": pp, "gpus": tp * pp, "tok_s": float(r["throughput_out_tok_s"]),
                        "tpot_ms": float(r["tpot_s_p50"]) * 1e3, "ttft_s": float(r["ttft_s_p50"])})
    base: dict[tuple, float] = {}
    for r in sorted(out, key=lambda r: r["gpus"]):
        base.setdefault((r["hardware"], r["precision"]), r["tok_s"] / r["gpus"])
    for r in out:
        r["per_gpu"] = r["tok_s"] / r["gpus"]
        r["eff"] = r["per_gpu"] / base[(r["hardware"], r["precision"])]
    return out


def table(rs: list[dict]) -> str:
    lines = ["| layout | GPUs | out tok/s | per GPU | per-GPU efficiency | TPOT p50 ms | TTFT p50 s | published |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rs:
        pub = PUBLISHED.get(r["variant"])
        note = f"TRT-LLM {pub:,} ({r['tok_s'] / pub - 1:+.0%})" if pub else ""
        lines.append(f"| {r['variant']} | {r['gpus']} | {r['tok_s']:,.0f} | {r['per_gpu']:,.0f} | {r['eff']:.2f} | "
                     f"{r['tpot_ms']:.1f} | {r['ttft_s']:.2f} | {note} |")
    lines.append("")
    lines.append("TensorRT-LLM's published per-GPU efficiencies (other GPUs, FP4): B200 TP "
                 + " / ".join(f"{t}: {B200_FP4_TP[t] / t / B200_FP4_TP[1]:.2f}" for t in B200_FP4_TP)
                 + "; RTX 6000 Pro PP " + " / ".join(f"{p}: {RTX_FP4_PP[p] / p / RTX_FP4_PP[1]:.2f}" for p in RTX_FP4_PP))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="a run directory of experiments/tp_scaling.yaml (default: simulate it)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/out/tp_scaling")
    ap.add_argument("--only", nargs="*", help="variants to tabulate")
    a = ap.parse_args(argv)
    run = a.run if a.run is not None else simulate(a.only, a.out)
    print(table(rows(run, a.only)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
