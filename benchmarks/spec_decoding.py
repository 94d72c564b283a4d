"""Speculative decoding in the simulator: speedup against plain decoding by batch size,
draft length and acceptance (Llama-3.1-8B target, Llama-3.2-1B drafter or n-gram lookup,
one H200, offline with every batch slot busy). Writes spec_decoding.md and .png into
benchmarks/out/ (benchmarks/results/ with --write-results).

    python benchmarks/spec_decoding.py [--profile P --draft-profile D] [--write-results]   # ~1 minute on 2 cores

--profile / --draft-profile: calibration profiles of the target and the drafter (default:
the roofline cost model of both).

Speedup is plain / speculative TPOT p50 and speculative / plain output tokens/s, from the
same requests on the same simulated GPU; the crossover is the batch where the throughput
speedup falls to 1 (linear interpolation in log batch).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from results_io import RESULTS as STORE  # noqa: E402
from results_io import add_write_results  # noqa: E402

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
DRAFTER = {"proposer": "draft_model", "draft_model": "llama-3.2-1b"}
CASES = {  # label -> speculative settings
    "draft 1B, k=4, a=0.8": {**DRAFTER, "max_draft_len": 4, "acceptance": 0.8},
    "draft 1B, k=2, a=0.8": {**DRAFTER, "max_draft_len": 2, "acceptance": 0.8},
    "draft 1B, k=4, a=0.5": {**DRAFTER, "max_draft_len": 4, "acceptance": 0.5},
    "draft 1B, k=4, a=0.9": {**DRAFTER, "max_draft_len": 4, "acceptance": 0.9},
    "ngram, k=4, a=0.5": {"proposer": "ngram", "max_draft_len": 4, "acceptance": 0.5},
}


def run(batch: int, spec: dict | None, model: str, hardware: str, output_len: int, profile: str | None = None,
        draft_profile: str | None = None) -> dict:
    from servesim.sim.config import RunConfig
    from servesim.sim.runner import resolve, simulate

    n = max(8, 3 * batch)
    cfg = RunConfig.model_validate({
        "model": model, "hardware": hardware,
        "workload": {"synthetic": {"num_requests": n, "prompt_len": 512, "output_len": output_len,
                                   "arrival": {"kind": "offline"}}},
        "scheduler": {"max_batch_size": batch, "max_num_tokens": 16384},
        "speculative": ({**spec, "draft_profile": str(Path(draft_profile).resolve())}
                        if spec and draft_profile and spec["proposer"] == "draft_model" else spec),
        **({"cost_model": {"kind": "calibrated", "profile": str(Path(profile).resolve())}} if profile else {}),
        "output": {"plots": False, "timeline": False}})
    res = simulate(resolve(cfg, REPO))
    s = res.summary
    return {"tpot": s["tpot_s"]["p50"], "tok_s": s["throughput_out_tok_s"], "wall": s["wall_s"],
            "iters": s["num_iterations"], "acc": s["spec_acceptance_rate"], "tps": s["spec_tokens_per_step"]}


def crossover(batches, speedup) -> float | None:
    """First batch where the speedup falls below 1 (interpolated in log batch)."""
    for (b0, s0), (b1, s1) in zip(zip(batches, speedup), zip(batches[1:], speedup[1:])):
        if s0 >= 1 > s1:
            f = (s0 - 1) / (s0 - s1)
            return float(np.exp(np.log(b0) + f * (np.log(b1) - np.log(b0))))
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--hardware", default="h200-sxm")
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--profile", help="the target's calibration profile (default: roofline)")
    ap.add_argument("--draft-profile", help="the drafter's calibration profile")
    add_write_results(ap)
    args = ap.parse_args()
    dest = STORE.out_dir(args.write_results)
    batches = [int(b) for b in args.batches.split(",")]
    t0 = time.perf_counter()
    prof = (args.profile, args.draft_profile)
    plain = {b: run(b, None, args.model, args.hardware, args.output_len, *prof) for b in batches}
    rows = {}
    for label, spec in CASES.items():
        rows[label] = {b: run(b, spec, args.model, args.hardware, args.output_len, *prof) for b in batches}
        print(f"{label}: done", file=sys.stderr)
    wall = time.perf_counter() - t0
    flags = (f" --profile {args.profile}" if args.profile else "") + (
        f" --draft-profile {args.draft_profile}" if args.draft_profile else "")
    kind = ("calibrated cost models: " + ", ".join(p for p in prof if p)) if args.profile else "roofline cost model"
    lines = ["# Speculative decoding (simulated)\n",
             f"Command: `python benchmarks/spec_decoding.py{flags}` ({args.model} on {args.hardware}, {kind}; "
             f"offline, prompt 512, output {args.output_len}, 3 x batch requests; {wall:.0f} s on "
             f"this machine). Speedup = plain TPOT p50 / speculative TPOT p50 (throughput ratio in "
             "brackets); acceptance is per draft position, given the ones before it.\n",
             "| batch | plain TPOT ms | " + " | ".join(CASES) + " |",
             "|---|---|" + "---|" * len(CASES)]
    speed = {label: [] for label in CASES}
    for b in batches:
        cells = []
        for label in CASES:
            r = rows[label][b]
            s = plain[b]["tpot"] / r["tpot"]
            t = r["tok_s"] / plain[b]["tok_s"]
            speed[label].append(t)
            cells.append(f"{s:.2f}x ({t:.2f}x)")
        lines.append(f"| {b} | {plain[b]['tpot'] * 1e3:.2f} | " + " | ".join(cells) + " |")
    lines.append("")
    def where(label):
        sp = speed[label]
        if sp[0] < 1:
            return "never above 1"
        c = crossover(batches, sp)
        return f"{c:.0f}" if c else f"above 1 up to {batches[-1]}"

    lines.append("Where the throughput speedup crosses 1 (batch): " + "; ".join(
        f"{label}: {where(label)}" for label in CASES) + ".\n")
    lines.append("Measured acceptance (accepted / proposed drafts) and tokens per request-step at batch 1: " + "; ".join(
        f"{label}: {rows[label][batches[0]]['acc']:.3f}, {rows[label][batches[0]]['tps']:.2f}" for label in CASES)
        + ".\n")
    lines.append("Simulator wall time per run (s, speculative runs step every iteration; plain runs advance "
                 "decode stretches in closed form): plain " + ", ".join(
                     f"b{b} {plain[b]['wall']:.2f}" for b in batches) + "; draft k=4 a=0.8 " + ", ".join(
                     f"b{b} {rows[next(iter(CASES))][b]['wall']:.2f}" for b in batches) + ".\n")
    text = "\n".join(lines)
    print(text)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for label in CASES:
        ax.plot(batches, speed[label], marker="o", label=label)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (requests decoding)")
    ax.set_ylabel("throughput speedup over plain decoding")
    ax.set_title(f"Speculative decoding, {args.model} on {args.hardware} (simulated)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    dest.mkdir(parents=True, exist_ok=True)
    fig.savefig(dest / "spec_decoding.png", dpi=120)
    (dest / "spec_decoding.md").write_text(text + "\n![speedup by batch](spec_decoding.png)\n")
    print(f"-> {dest / 'spec_decoding.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
