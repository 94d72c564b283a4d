"""Feature fidelity: does the simulator predict what a feature *does*, not only one fixed
configuration?

experiments/fidelity_features.yaml runs two features off and on over the same requests,
for Llama-3.2-1B and Llama-3.1-8B: the overlap scheduler (the Azure conversation trace at
the higher load of experiments/fidelity.yaml) and KV-cache prefix reuse (multi-turn
conversations). benchmarks/gpu_fidelity.py (steps 1 and 7-9) runs them on a GPU together
with a calibration in the same device call; each call's results sit in
benchmarks/results/features/<machine>/ (profiles/, pairs/, pairs_repeat/: the profiles tracked,
the runs and grids in the calls' archives, benchmarks/results/archives/, unpacked on first
use). Here every GPU run is replayed on the simulator with its own machine's calibrated
profile and with the uncalibrated roofline, and two tables are written to
benchmarks/out/feature_fidelity.md (benchmarks/results/ with --write-results), with a plot,
feature_fidelity.png:

* the calibrated sim's relative error per run (feature off and on), as in fidelity.md;
* each feature's *effect* -- (on / off) - 1 of TTFT, TPOT, E2E and throughput -- on the GPU
  and as the simulator predicts it, and their difference in percentage points.

Neither workload is used to calibrate (the calibration grid is designed, see
gpu_backend/profiler.py).

    python benchmarks/feature_fidelity.py [--write-results] [--machines h100-g,h200-i]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity import errors, label, mean_abs, replay  # noqa: E402
from gpu_fidelity import MODELS, OVERLAP_PAIR, REUSE_PAIR  # noqa: E402  (the pairs the device call runs)
from results_io import RESULTS as STORE  # noqa: E402
from results_io import add_write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
FEATURES = RESULTS / "features"  # each machine's profiles (tracked); its runs: STORE.path("features/NAME")


class Machine(NamedTuple):
    """One machine instance's feature runs: its name, the folder of its profiles (tracked)
    and the folder of its runs (pairs/, pairs_repeat/: unpacked from its calls' archives)."""
    name: str
    profiles: Path
    runs: Path


def machines(names: list[str] | None = None) -> list[Machine]:
    """The machine instances with feature runs (every one the archives or the tracked tree
    know, or ``names``), their runs unpacked."""
    if names is None:
        known = {m.split("/")[1] for man in STORE.manifests().values() for m in man["members"]
                 if m.startswith("features/") and m.count("/") >= 2}
        known |= {p.name for p in FEATURES.iterdir() if p.is_dir()} if FEATURES.is_dir() else set()
        names = sorted(known)
    return [Machine(n, FEATURES / n / "profiles", STORE.path(f"features/{n}")) for n in names]
# (feature, variant off, variant on), variant names after the model's "8b-" / "1b-"
PAIRS = (("overlap scheduler", *OVERLAP_PAIR), ("prefix reuse", *REUSE_PAIR))
STATS = [("ttft_s", "p50"), ("ttft_s", "p99"), ("tpot_s", "p50"), ("tpot_s", "p99"), ("itl_s", "p50"),
         ("e2e_s", "p50"), ("e2e_s", "p99"), ("throughput_out_tok_s", "value"), ("energy_per_token_j", "value")]
EFFECTS = [("ttft_s", "p50"), ("tpot_s", "p50"), ("e2e_s", "p50"), ("e2e_s", "p99"), ("throughput_out_tok_s", "value")]


def pairs(machine: Machine) -> list[tuple[str, str, str, Path, Path]]:
    """(feature, model key, runs folder, run off, run on) of every complete pair a machine has."""
    out = []
    for sub in ("pairs", "pairs_repeat"):
        for feature, off, on in PAIRS:
            for m in MODELS:
                a, b = machine.runs / sub / f"{m}-{off}", machine.runs / sub / f"{m}-{on}"
                if (a / "requests.parquet").exists() and (b / "requests.parquet").exists():
                    out.append((feature, m, sub, a, b))
    return out


def gpu_name(machine: Machine) -> str:
    for prof in sorted(machine.profiles.glob("*.yaml")):
        return str(yaml.safe_load(prof.read_text()).get("provenance", {}).get("gpu", "?"))
    return "?"


def change(off: float | None, on: float | None) -> float | None:
    """on / off - 1, None where either is missing (or off is 0)."""
    return None if not off or on is None else on / off - 1


def effect(values: dict, k: tuple[str, str]) -> float | None:
    """A feature's effect on the GPU's metric `k` (gpu_vals of a record)."""
    return change(values.get(("off",) + k), values.get(("on",) + k))


_MEASURED: dict[tuple, list[dict]] = {}  # measure()'s records by machines, for a second call in one process


def measure(machines: list[Machine], tmp: Path) -> list[dict]:
    """One record per pair: its errors per variant and kind, and the effect on GPU and sim
    (computed once per process for the same machines: the replays are deterministic)."""
    key = tuple(machines)
    if key in _MEASURED:
        return _MEASURED[key]
    recs = _MEASURED[key] = []
    for mach in machines:
        for feature, m, sub, a, b in pairs(mach):
            profs = sorted(mach.profiles.glob(f"*-{MODELS[m]}.yaml"))  # h100-..., h200-...
            if not profs:
                print(f"{mach.name}: no profile of {MODELS[m]}, {a.name} skipped", file=sys.stderr)
                continue
            prof = profs[0]
            rec = {"machine": mach.name, "gpu": gpu_name(mach), "feature": feature, "model": m, "folder": sub,
                   "err": {}, "gpu_vals": {}, "sim_vals": {}}
            for side, run in (("off", a), ("on", b)):
                for kind in ("calibrated", "roofline"):
                    out = tmp / mach.name / sub / kind
                    out.mkdir(parents=True, exist_ok=True)
                    sim = replay(run, kind, out, prof)
                    vals, its = errors(run, sim, out / f"cmp-{run.name}", values=True)
                    for k in STATS:
                        g, s = vals.get(k, (None, None))
                        rec["err"][(side, kind) + k] = change(g, s)
                        rec["gpu_vals"][(side,) + k] = g
                        rec["sim_vals"][(kind, side) + k] = s
                    rec["err"][(side, kind, "mape")] = its.get("mape")
            recs.append(rec)
            print(f"{mach.name} {sub} {m} {feature}: done", file=sys.stderr)
    return recs


def gpu_effect_noise(machines: list[Machine], tmp: Path) -> list[tuple[str, str, str, dict, dict]]:
    """(machine, model, feature, effects of the first pair, of the second) for every pair a
    machine ran twice (pairs/ and pairs_repeat/): how much the GPU's own measurement of an
    effect moves between two runs of the same requests on the same machine."""
    out = []
    for mach in machines:
        done = {(f, m): (a, b) for f, m, sub, a, b in pairs(mach) if sub == "pairs"}
        for f, m, sub, a, b in pairs(mach):
            if sub != "pairs_repeat" or (f, m) not in done:
                continue
            eff = []
            for i, (off, on) in enumerate((done[(f, m)], (a, b))):
                vals, _ = errors(off, on, tmp / f"noise-{mach.name}-{m}-{i}-{on.name}", values=True)
                eff.append({k: change(*v) for k, v in vals.items()})
            out.append((mach.name, m, f, eff[0], eff[1]))
    return out


def sim_effect(rec: dict, kind: str, k: tuple[str, str]) -> float | None:
    """The effect the simulator with cost model `kind` predicts on metric `k`."""
    return change(rec["sim_vals"].get((kind, "off") + k), rec["sim_vals"].get((kind, "on") + k))


def render(recs: list[dict], noise: list | None = None) -> str:
    firsts = {(r["machine"], r["model"], r["feature"]) for r in recs if r["folder"] == "pairs"}
    for r in recs:  # a machine's second run of a pair is labelled as such
        r["label"] = r["machine"] + (", run 2" if r["folder"] == "pairs_repeat" and
                                     (r["machine"], r["model"], r["feature"]) in firsts else "")
    lines = ["# Feature fidelity: the simulator against the GPU, each feature off and on", "",
             "Made by `python benchmarks/feature_fidelity.py` from the GPU runs under "
             "benchmarks/results/features/<machine>/ (`python benchmarks/gpu_fidelity.py --out $OUT --models M "
             "--steps 1,8,9` on the device, then `--install-features TARBALL NAME`). Each machine instance's runs "
             "are replayed with the profile calibrated in the same device call; the workloads "
             "(experiments/fidelity_features.yaml) are never used to fit.", ""]
    mach = sorted({(r["machine"], r["gpu"]) for r in recs})
    lines += ["Machine instances: " + ", ".join(f"{m} ({g})" for m, g in mach) + ".", ""]
    lines += ["## The calibrated sim's error, feature off and on", "",
              "| machine | model | feature | variant | " + " | ".join(label(*k) for k in STATS) +
              " | iteration MAPE |", "|" + "---|" * (len(STATS) + 5)]
    for r in recs:
        for side in ("off", "on"):
            cells = " | ".join("-" if r["err"].get((side, "calibrated") + k) is None else
                               f"{r['err'][(side, 'calibrated') + k]:+.1%}" for k in STATS)
            mape = r["err"].get((side, "calibrated", "mape"))
            mape_s = "-" if mape is None or side == "on" and r["feature"] == "overlap scheduler" else f"{mape:.1%}"
            lines.append(f"| {r['label']} | {r['model']} | {r['feature']} | {side} | {cells} | {mape_s} |")
    lines += ["", "Iteration MAPE is left out with the overlap scheduler on: the GPU's iterations overlap in "
              "time there (each one's duration runs to its tokens' emission), so they are not the sim's "
              "back-to-back iterations.", ""]
    # summary: mean abs error by feature and side, calibrated vs roofline
    lines += ["| feature | model | variant | mean abs. error, calibrated (all cells) | p50s + throughput | "
              "roofline (all cells) |", "|---|---|---|---|---|---|"]
    p50 = {("ttft_s", "p50"), ("tpot_s", "p50"), ("e2e_s", "p50"), ("throughput_out_tok_s", "value")}
    for feature, *_ in PAIRS:
        for m in MODELS:
            for side in ("off", "on"):
                mine = [r for r in recs if r["feature"] == feature and r["model"] == m]
                if not mine:
                    continue
                cal = [r["err"].get((side, "calibrated") + k) for r in mine for k in STATS]
                cal50 = [r["err"].get((side, "calibrated") + k) for r in mine for k in STATS if k in p50]
                roof = [r["err"].get((side, "roofline") + k) for r in mine for k in STATS]
                lines.append(f"| {feature} | {m} | {side} | {mean_abs(cal):.1%} | {mean_abs(cal50):.1%} | "
                             f"{mean_abs(roof):.1%} |")
    lines += ["", "## Each feature's effect: (on / off) - 1, GPU vs simulator", "",
              "Cells: GPU / calibrated sim / roofline sim; the difference column is |GPU - calibrated| in "
              "percentage points, averaged over the row.", "",
              "| machine | model | feature | " + " | ".join(label(*k) for k in EFFECTS) + " | mean diff. (pp) |",
              "|" + "---|" * (len(EFFECTS) + 4)]
    diffs_all: dict[tuple[str, str], list[float]] = {}
    for r in recs:
        cells, diffs = [], []
        for k in EFFECTS:
            g = effect(r["gpu_vals"], k)
            c, f = sim_effect(r, "calibrated", k), sim_effect(r, "roofline", k)
            cells.append("-" if g is None else f"{g:+.1%} / {c:+.1%} / {f:+.1%}")
            if g is not None and c is not None:
                diffs.append(abs(g - c))
        diffs_all.setdefault((r["feature"], r["model"]), []).extend(diffs)
        lines.append(f"| {r['label']} | {r['model']} | {r['feature']} | " + " | ".join(cells) +
                     f" | {100 * mean_abs(diffs):.1f} |")
    lines += ["", "| feature | model | mean abs. difference, GPU effect vs calibrated sim effect (pp) |", "|---|---|---|"]
    for (feature, m), d in sorted(diffs_all.items()):
        lines.append(f"| {feature} | {m} | {100 * mean_abs(d):.1f} |")
    if noise:
        lines += ["", "## The GPU's own noise in an effect", "",
                  "The same pair run twice on one machine instance, one run after the other: the effect each "
                  "time (first / second) and their difference in percentage points -- the floor under the "
                  "differences above.", "",
                  "| machine | model | feature | " + " | ".join(label(*k) for k in EFFECTS) + " | mean diff. (pp) |",
                  "|" + "---|" * (len(EFFECTS) + 4)]
        for mach, m, f, e1, e2 in noise:
            cells, d = [], []
            for k in EFFECTS:
                a, b = e1.get(k), e2.get(k)
                cells.append("-" if a is None or b is None else f"{a:+.1%} / {b:+.1%}")
                if a is not None and b is not None:
                    d.append(abs(a - b))
            lines.append(f"| {mach} | {m} | {f} | " + " | ".join(cells) + f" | {100 * mean_abs(d):.1f} |")
    return "\n".join(lines) + "\n"


def plot(recs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(PAIRS), figsize=(6.5 * len(PAIRS), 5.6), squeeze=False)
    for ax, (feature, *_) in zip(axes[0], PAIRS):
        mine = [r for r in recs if r["feature"] == feature]
        x = np.arange(len(EFFECTS))
        w = 0.8 / max(len(mine), 1)
        for i, r in enumerate(mine):
            g = [100 * (effect(r["gpu_vals"], k) or 0) for k in EFFECTS]
            c = [100 * (sim_effect(r, "calibrated", k) or 0) for k in EFFECTS]
            name = f"{r.get('label', r['machine'])} {r['model']}"
            bars = ax.bar(x - 0.4 + (i + 0.5) * w, g, w * 0.9, alpha=0.55, label=f"{name} GPU")
            ax.scatter(x - 0.4 + (i + 0.5) * w, c, marker="_", s=160, color=bars.patches[0].get_facecolor()[:3],
                       linewidths=2.5, label=f"{name} sim")
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks(x, [label(*k) for k in EFFECTS], fontsize=8)
        ax.set_ylabel("effect of turning it on, %")
        ax.set_title(f"{feature}: GPU (bars) vs calibrated sim (dashes)", fontsize=10)
        ax.legend(fontsize=6, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None, out_md: Path | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_write_results(ap)
    ap.add_argument("--machines", help="comma-separated machine names (default: every one)")
    args = ap.parse_args(argv)
    if out_md is None:
        out_md = STORE.out_dir(args.write_results) / "feature_fidelity.md"
    mach = [m for m in machines(args.machines.split(",") if args.machines else None) if pairs(m)]
    if not mach:
        print(f"no feature runs under {FEATURES} or in benchmarks/results/archives/: run benchmarks/gpu_fidelity.py "
              "--steps 1,7,8,9 on a GPU and install them with --install-features", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        recs = measure(mach, Path(tmp))
        noise = gpu_effect_noise(mach, Path(tmp))
    text = render(recs, noise)
    keep = "## Reading the table"  # the tracked page's hand-written analysis below the tables survives a rerun
    page = RESULTS / "feature_fidelity.md"
    if page.exists() and keep in (old := page.read_text()):
        text += "\n" + old[old.index(keep):]
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(text)
    plot(recs, out_md.with_suffix(".png"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
