"""GEMM time by row count for the decoder-layer linears of Llama-3.2-1B and Llama-3.1-8B:
the measured curves the calibrated cost model prices linears with (`gemm_sweep`, the
same function `sim calibrate --backend gpu` runs), beside the roofline line
max(FLOPs / 790 TFLOP/s, bytes / 3.0 TB/s). Writes gemm_curves.md (selected row counts),
gemm_curves.csv (every row count) and gemm_curves.png.

    python benchmarks/gemm_curves.py --out $OUT          # on the GPU
    python benchmarks/gemm_curves.py --out DIR --smoke   # CPU, a few row counts
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHOWN = (1, 16, 64, 128, 256, 384, 400, 448, 512, 768, 1024, 2048, 4096, 8192)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from servesim.gpu_backend.profiler import GEMM_TOKENS, gemm_sweep
    from servesim.sim.cost_model import RooflineCostModel
    from servesim.sim.specs import load_hardware, load_model
    from servesim.sim.types import IterationShape

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_device import hardware_here

    hw = load_hardware(hardware_here())  # the roofline of the card the GEMMs ran on
    tokens = (1, 16) if args.smoke else tuple(sorted(set(GEMM_TOKENS) | set(SHOWN)))
    frames = []
    names = ("llama-3.2-1b",) if args.smoke else ("llama-3.2-1b", "llama-3.1-8b")  # smoke: the small one
    for name in names:
        m = load_model(name)
        t0 = time.perf_counter()
        d = pd.DataFrame(gemm_sweep(m, tokens=tokens, reps=1 if args.smoke else 5))
        print(f"{name}: {len(d)} GEMMs timed in {time.perf_counter() - t0:.1f} s", flush=True)
        d.insert(0, "model", name)
        frames.append(d)
    d = pd.concat(frames, ignore_index=True)
    # the pure roofline's price of one layer's GEMM: its term of an iteration of t tokens over the layers
    roof = {}
    for name in names:
        m = load_model(name)
        cm = RooflineCostModel(m, hw)
        for t in sorted(set(d.tokens)):
            b = cm.breakdown(IterationShape(ctx_new_tokens=(int(t),), ctx_prior_tokens=(0,), n_ctx_sampling=1))
            roof.update({(name, lin, t): b[lin] / m.num_layers for lin in set(d.linear)})
    d["roofline_s"] = [roof[k] for k in zip(d.model, d.linear, d.tokens)]
    d["over_roofline"] = d.seconds / d.roofline_s
    d.to_csv(args.out / "gemm_curves.csv", index=False)
    lines = ["| model | linear [k x n] | " + " | ".join(f"{t} rows" for t in SHOWN if t in tokens) + " |",
             "|---|---|" + "---|" * sum(t in tokens for t in SHOWN)]
    for (model, lin), g in d.groupby(["model", "linear"], sort=False):
        g = g.set_index("tokens")
        cells = [f"{g.seconds[t] * 1e6:.1f} us ({g.over_roofline[t]:.2f}x)" for t in SHOWN if t in g.index]
        lines.append(f"| {model} | {lin} [{g.k.iloc[0]} x {g.n.iloc[0]}] | " + " | ".join(cells) + " |")
    (args.out / "gemm_curves.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, (model, g) in zip(axes, d.groupby("model", sort=False)):
        for lin, h in g.groupby("linear", sort=False):
            line, = ax.plot(h.tokens, h.seconds * 1e6, label=f"{lin} measured", lw=1.2)
            ax.plot(h.tokens, h.roofline_s * 1e6, ls="--", lw=0.8, color=line.get_color())
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("rows (tokens in the iteration)")
        ax.set_ylabel("us per GEMM")
        ax.set_title(f"{model}: measured (solid) vs roofline (dashed)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "gemm_curves.png", dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
