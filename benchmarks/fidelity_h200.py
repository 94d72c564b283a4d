"""Fidelity on the H200: the calibrated simulator against GPU runs made on an H200, each
run replayed (same requests) with the profile fitted to the designed grid in the same
device call. The H100 table (benchmarks/fidelity.py, fidelity.md) stays as the second
machine kind; this page is the H200's.

    # install a device call's fidelity_gpu.tar.gz (gpu_fidelity.py --steps 1,2 on an H200):
    python benchmarks/fidelity_h200.py --install PATH/fidelity_gpu.tar.gz [--name CALL]
    # the table (benchmarks/out/, or benchmarks/results/ with --write-results):
    python benchmarks/fidelity_h200.py [--write-results]

An install packs the call's raw files into ONE archive (benchmarks/results/archives/CALL),
its members under h200/CALL/ (runs/, calibration/, log.txt) so they never replace the H100
table's, and refits the call's profiles with this checkout's fitting code into
profiles/h200-<model>.yaml (the shipped H200 profiles). Several calls: every run of every
installed H200 call is replayed with the profile of the call that calibrated its model (the
latest call with a grid for it).
"""

from __future__ import annotations

import argparse
import sys
import tarfile
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from fidelity import STATS, errors, label, own_iterations, replay  # noqa: E402
from results_io import RESULTS as STORE  # noqa: E402
from results_io import add_write_results  # noqa: E402

PREFIX = "h200"


def install(tarball: Path, name: str | None = None) -> list[Path]:
    from gpu_fidelity import _store, _tree, call_info, call_name, refit_profile

    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(tarball) as tf:
            tf.extractall(tmp, filter="data")
        src = Path(tmp) / "fidelity_gpu"
        info = call_info(src, tarball)
        if info.get("hardware") != "h200-sxm":
            raise SystemExit(f"{tarball}: a call on {info.get('hardware') or info.get('device')}, not an H200")
        name = name or call_name(info)
        base = f"{PREFIX}/{name}"
        files: dict[str, Path] = {}
        for run in sorted((src / "runs").iterdir()) if (src / "runs").is_dir() else []:
            files.update(_tree(run, f"{base}/runs/{run.name}") if run.is_dir() else {f"{base}/runs/{run.name}": run})
        profs = sorted((src / "profiles").glob("*.yaml")) if (src / "profiles").is_dir() else []
        for prof in profs:
            for f in sorted((src / "profiles").glob(f"{prof.stem}.grid*.*")):
                files[f"{base}/calibration/{f.name}"] = f
        if (src / "log.txt").exists():
            files[f"{base}/log.txt"] = src / "log.txt"
        written = _store(files, set(), name, info, f"python benchmarks/fidelity_h200.py --install {tarball.name}",
                         REPO)
        for prof in profs:
            grid = f"{base}/calibration/{prof.stem}.grid.csv"
            written.append(refit_profile(yaml.safe_load(prof.read_text()), STORE.path(grid),
                                         REPO / "profiles" / prof.name, REPO,
                                         source=f"benchmarks/results/{grid}", made_path=prof))
    return written


# batch-size buckets of the pure decode table (upper bounds, inclusive)
DECODE_BUCKETS = (8, 16, 32, 48, 64, 96, 128, 192, 256)


def _bucket_labels() -> list[str]:
    lo = [1] + [b + 1 for b in DECODE_BUCKETS[:-1]]
    return [f"{a}-{b}" for a, b in zip(lo, DECODE_BUCKETS)]


def _bucket_of(n):
    import numpy as np

    return np.searchsorted(np.asarray(DECODE_BUCKETS), np.asarray(n), side="left")


def decode_by_batch(run: Path, model: str, profile: Path) -> dict[str, tuple[float, float]]:
    """Pure decode iterations of a GPU run priced by the calibrated model on their own
    shapes: per batch-size bucket, (MAPE, share of the run's busy time)."""
    import numpy as np
    import pandas as pd

    from servesim.sim.calibrate import load_profile, rows_from_iterations, shapes_from_grid
    from servesim.sim.cost_model import RooflineCostModel
    from servesim.sim.specs import load_hardware, load_model

    cfg = yaml.safe_load((run / "config.yaml").read_text())["config"]
    m, hw = load_model(model), load_hardware(cfg["hardware"])
    cm = RooflineCostModel(m, hw, load_profile(profile, m, hw)[0], cuda_graphs=True)
    it = pd.read_parquet(run / "iterations.parquet")
    total = float(it.duration_s.sum())
    dec = it[(it.num_ctx_requests == 0) & (it.num_gen_requests > 0)]
    shapes, times, _ = shapes_from_grid(rows_from_iterations(model, dec))
    err = np.abs(np.array([cm.price(s) for s in shapes]) / times - 1)
    b = _bucket_of(dec.num_gen_requests.to_numpy())
    return {lab: (float(err[b == i].mean()), float(times[b == i].sum() / total))
            for i, lab in enumerate(_bucket_labels()) if (b == i).any()}


def grid_decode_points(profile: Path) -> dict[str, int]:
    """The decode points of the grid a profile was fitted to, per batch-size bucket."""
    import numpy as np

    from servesim.sim.calibrate import read_grid

    doc = yaml.safe_load(profile.read_text())
    src = (doc.get("provenance") or {}).get("source", "")
    grid = STORE.path(src.removeprefix("benchmarks/results/"))
    n = [int(r["n_decode"]) for r in read_grid(grid, doc["model"]) if r["kind"] == "decode"]
    b = _bucket_of(n)
    return {lab: int((b == i).sum()) for i, lab in enumerate(_bucket_labels())}


def calls() -> list[str]:
    return sorted(c for c, man in STORE.manifests().items() if any(m.startswith(f"{PREFIX}/{c}/") for m in man["members"]))


def table(write_results: bool) -> Path:
    rows = []
    own = []
    by_batch: list = []
    grids: dict[str, Path] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for call in calls():
            runs_dir = STORE.path(f"{PREFIX}/{call}/runs")
            if not runs_dir.is_dir():
                continue
            for run in sorted(p for p in runs_dir.iterdir() if (p / "requests.parquet").exists()):
                cfg = yaml.safe_load((run / "config.yaml").read_text())["config"]
                model, hw = cfg["model"], cfg["hardware"]
                prof = REPO / "profiles" / f"{hw.split('-')[0]}-{model}.yaml"
                own.append((run.name, own_iterations(run, model, prof)))
                by_batch.append((run.name, decode_by_batch(run, model, prof)))
                grids[model] = prof
                for kind in ("roofline", "calibrated"):
                    sim = replay(run, kind, tmp, prof)
                    errs, its = errors(run, sim, tmp / f"cmp-{call}-{run.name}-{kind}")
                    rows.append((call, run.name, kind, [errs.get(s) for s in STATS], its["mape"]))
    head = "| call | run | cost model | " + " | ".join(label(m, s) for m, s in STATS) + " | mean abs | iteration MAPE |"
    lines = [head, "|" + "---|" * (len(STATS) + 5)]
    for call, run, kind, errs, mape in rows:
        vals = [e for e in errs if e is not None]
        mean = sum(abs(e) for e in vals) / len(vals) if vals else float("nan")
        cells = " | ".join("-" if e is None else f"{100 * e:+.1f}%" for e in errs)
        lines.append(f"| {call} | {run} | {kind} | {cells} | {100 * mean:.1f}% | {100 * mape:.1f}% |")
    own_lines = ["| run | " + " | ".join(sorted({k for _, d in own for k in d})) + " |"]
    kinds = sorted({k for _, d in own for k in d})
    own_lines.append("|" + "---|" * (len(kinds) + 1))
    for run, d in own:
        own_lines.append(f"| {run} | " + " | ".join(
            f"{100 * d[k]['mape']:.1f}% ({d[k]['iterations']} its, {100 * d[k]['time_share']:.0f}% of time)"
            if k in d else "-" for k in kinds) + " |")
    labs = _bucket_labels()
    batch_lines = ["| run | " + " | ".join(f"batch {x}" for x in labs) + " |", "|" + "---|" * (len(labs) + 1)]
    for run, d in by_batch:
        batch_lines.append(f"| {run} | " + " | ".join(
            f"{100 * d[x][0]:.1f}% ({100 * d[x][1]:.0f}%)" if x in d else "-" for x in labs) + " |")
    for model, prof in sorted(grids.items()):
        pts = grid_decode_points(prof)
        batch_lines.append(f"| grid points, {model} | " + " | ".join(str(pts[x]) for x in labs) + " |")
    text = ("# Fidelity on the H200\n\n"
            "Command: `python benchmarks/fidelity_h200.py --write-results` (replays every installed H200 run on "
            "the simulator; the GPU half: `python benchmarks/gpu_fidelity.py --out $OUT --steps 1,2` on one "
            "H200, installed with `python benchmarks/fidelity_h200.py --install fidelity_gpu.tar.gz`). Each cell: "
            "(sim - GPU) / GPU for the same requests; `calibrated` uses profiles/h200-<model>.yaml, fitted in "
            "the same device call to the designed grid; `roofline` the uncalibrated model.\n\n"
            + "\n".join(lines) + "\n\nThe calibrated model priced on each GPU run's own iteration shapes "
            "(MAPE by iteration kind):\n\n" + "\n".join(own_lines) + "\n"
            "\nPure decode iterations by batch size, priced on the run's own shapes: MAPE (share of the run's "
            "busy time); the last rows, the decode points of the calibration grid each profile was fitted to:\n\n"
            + "\n".join(batch_lines) + "\n")
    out = STORE.out_dir(write_results) / "fidelity_h200.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--install", type=Path, metavar="TARBALL")
    ap.add_argument("--name")
    add_write_results(ap)
    args = ap.parse_args()
    if args.install:
        for p in install(args.install, args.name):
            print(f"wrote {p}")
        return
    table(args.write_results)


if __name__ == "__main__":
    main()
