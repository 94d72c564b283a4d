"""What one piece of the calibration does to the fidelity table: refit the shipped grids
without it, replay the table's GPU runs with the refitted profiles, print the summary.

    python benchmarks/fidelity_ablation.py                      # as shipped
    python benchmarks/fidelity_ablation.py --drop-run "128x1024+384" --from power
    python benchmarks/fidelity_ablation.py --no-process         # one host speed for every grid process
    python benchmarks/fidelity_ablation.py --machine2           # machine A's grids and runs instead

``--drop-run LABEL --from time|power|both``: the grid run's rows out of the time fit, its
energy and iterations out of the power fit, or both. Nothing under benchmarks/results is
changed (the refits go to a temporary folder; the grids and runs come from the calls'
archives, benchmarks/results_io.py). ~70 s.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from results_io import RESULTS as STORE  # noqa: E402

MODELS = ("llama-3.2-1b", "llama-3.1-8b")


def _fidelity():
    spec = importlib.util.spec_from_file_location("fidelity", REPO / "benchmarks" / "fidelity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def refit(cal: Path, out: Path, drop: str | None, where: str, no_process: bool,
          hardware: str = "h100-sxm") -> dict[str, Path]:
    from servesim.sim.calibrate import calibrate
    from servesim.sim.specs import load_hardware, load_model

    profiles = {}
    for m in MODELS:
        src = cal / f"h100-{m}.grid.csv"
        grid = out / src.name
        hw = load_hardware(hardware)  # the card the grid was measured on (its shipped profile's)
        rows = list(csv.DictReader(open(src, newline="")))
        if drop and where in ("time", "both"):
            rows = [r for r in rows if r["run"] != drop]
        if no_process:
            rows = [{k: v for k, v in r.items() if k != "process"} for r in rows]
        _write(grid, rows)
        shutil.copy(src.with_suffix(".gemm.csv"), grid.with_suffix(".gemm.csv"))
        power = list(csv.DictReader(open(src.with_suffix(".power.csv"), newline="")))
        its = pd.read_parquet(src.with_suffix(".iterations.parquet"))
        if drop and where in ("power", "both"):
            power = [r for r in power if r["workload"] != drop]
            its = its[its.workload != drop]
        _write(grid.with_suffix(".power.csv"), power)
        its.to_parquet(grid.with_suffix(".iterations.parquet"), index=False)
        profiles[m] = out / f"h100-{m}.yaml"
        calibrate(load_model(m), hw, grid, profiles[m])
    return profiles


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--drop-run", help="a grid run's label (its `run` column)")
    ap.add_argument("--from", dest="where", choices=("time", "power", "both"), default="both")
    ap.add_argument("--no-process", action="store_true")
    ap.add_argument("--machine2", action="store_true")
    args = ap.parse_args()
    fid = _fidelity()
    cal = STORE.path("calibration_machine2" if args.machine2 else "calibration")
    runs_dir = STORE.path("gpu_runs_machine2" if args.machine2 else "gpu_runs")
    shipped = STORE.tables / "calibration_machine2" if args.machine2 else REPO / "profiles"
    hardware = {yaml.safe_load(p.read_text())["hardware"] for p in shipped.glob("h100-*.yaml")}.pop()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        profiles = refit(cal, tmp, args.drop_run, args.where, args.no_process, hardware)
        res = []
        for run in sorted(p for p in runs_dir.iterdir() if (p / "requests.parquet").exists()):
            model = yaml.safe_load((run / "config.yaml").read_text())["config"]["model"]
            errs, its = fid.errors(run, fid.replay(run, "ablation", tmp, profiles[model]), tmp / f"cmp-{run.name}")
            e = [errs.get(s) for s in fid.STATS]
            res.append((e, its["mape"]))
            print(f"{run.name}: " + " ".join("-" if x is None else f"{x:+.1%}" for x in e) + f"  MAPE {its['mape']:.1%}",
                  flush=True)
    allv = [x for e, _ in res for x in e]
    p50 = [x for e, _ in res for s, x in zip(fid.STATS, e) if s in fid.P50S]
    p99 = [x for e, _ in res for s, x in zip(fid.STATS, e) if s in fid.P99S]
    print(f"mean abs.: all cells {fid.mean_abs(allv):.1%}, p50s + throughput {fid.mean_abs(p50):.1%}, "
          f"p99s {fid.mean_abs(p99):.1%}, energy/token {fid.mean_abs([e[-1] for e, _ in res]):.1%}, "
          f"iteration MAPE {fid.mean_abs([m for _, m in res]):.1%}")


if __name__ == "__main__":
    main()
