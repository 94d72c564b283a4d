"""The GPU half of the fidelity benchmark, in one device call: calibrate, then run the
fidelity workloads, then calibrate again and repeat runs (for the noise floor).

    # on the GPU machine (the command is in benchmarks/results/fidelity.md)
    python benchmarks/gpu_fidelity.py --out $OUT --budget-s 540
    # anywhere: the same steps on a tiny model on the CPU (CI runs this)
    python benchmarks/gpu_fidelity.py --smoke --out /tmp/gpu_fidelity

Steps, most important first; each is skipped when the time budget left is too small:
 1. `sim calibrate --backend gpu` for each model (the designed grid through the real
    engine; grid CSV, per-run energies, profile);
 2. `sim run experiments/fidelity.yaml --backend gpu` (the fidelity workloads: Azure
    conversation trace at two loads, an offline batch, per model);
 3. a second calibration of each model (calibration repeatability);
 4. a repeat of the online-high runs (run-to-run noise on the GPU);
 5, 6. every fidelity run again, twice (runs_repeat/, runs_third/: the table against the
    mean of three GPU runs of each workload). Not in the default steps.
 7, 8, 9. experiments/fidelity_features.yaml: the overlap scheduler off and on (7), prefix
    reuse off and on (8), the overlap pair again (9; features/, features_repeat/:
    benchmarks/feature_fidelity.py's table). Not in the default steps.
Everything is packed into OUT/fidelity_gpu.tar.gz after every step (the device tool
returns at most 8 files). Back on any machine,

    python benchmarks/gpu_fidelity.py --install PATH/fidelity_gpu.tar.gz
    python benchmarks/gpu_fidelity.py --refit     # after a change to the fitting code
    python benchmarks/gpu_fidelity.py --install-features PATH/fidelity_gpu.tar.gz NAME  # steps 1, 7-9

puts it in place -- runs in benchmarks/results/gpu_runs{,_repeat}/, grids in
benchmarks/results/calibration/, profiles in profiles/ (the second calibration in
benchmarks/results/calibration_repeat/) -- and `benchmarks/fidelity.py` replays the runs
on the simulator and writes the error table. A call of the feature steps goes, with its
calibration, to benchmarks/results/features/NAME/ (`benchmarks/feature_fidelity.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing (servesim/__init__.py)

MODELS = {"8b": "llama-3.1-8b", "1b": "llama-3.2-1b"}
# experiments/fidelity_features.yaml's pairs (variant names after the model's "8b-" / "1b-")
OVERLAP_PAIR = ("online-high", "online-high-overlap")
REUSE_PAIR = ("multiturn-noreuse", "multiturn-reuse")
TINY = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=128, vocab_size=256, rms_norm_eps=1e-5, rope_theta=10000.0,
            max_position_embeddings=4096, tie_word_embeddings=False)


def cli(args: list[str], log, fresh: bool = True) -> int:
    """`sim ARGS`, in a process of its own (``fresh``: what a user's command gets, and no
    state -- a model's allocations, the Python heap, compiled kernels of another model --
    carried from one step into the next) or in this one (the smoke run, whose grid points
    are set on the module)."""
    t0 = time.perf_counter()
    if fresh:
        import subprocess

        p = subprocess.run([sys.executable, "-m", "servesim.sim.cli", *args], cwd=REPO, capture_output=True,
                           text=True, env={**os.environ, "COLUMNS": "160",  # a checkout: importable from REPO
                                           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
        rc, out = p.returncode, p.stdout + (p.stderr[-2000:] if p.returncode else "")
    else:
        from servesim.sim.cli import main

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = main(args)
        out = buf.getvalue()
    log(f"$ sim {' '.join(args)}  ({time.perf_counter() - t0:.0f} s, exit {rc})\n{out[-4000:]}")
    return rc


def install(tarball: Path, repo: Path = REPO, calibration_dirs: tuple[str, str] | None = None) -> list[Path]:
    """Unpack a device call's fidelity_gpu.tar.gz into the repository's layout.

    Profiles are refitted here from their grids with this checkout's `sim calibrate`
    (keeping the GPU call's provenance: GPU, driver, versions, date), so the shipped
    profiles always match the code that reads them. `calibration_dirs` (profiles, repeat)
    puts the calibrations elsewhere than profiles/ + calibration_repeat/ (another machine's,
    kept for comparison); such a call's repeat runs (step 4) still go to gpu_runs_repeat/,
    its fidelity runs are not installed, and its log goes to gpu_fidelity_log_<A>.txt. GPU
    runs replace those of the same name only: a call with one model's runs keeps the other's."""
    import shutil

    res = repo / "benchmarks" / "results"
    written: list[Path] = []
    if calibration_dirs is None:
        targets = (("profiles", repo / "profiles", res / "calibration"),
                   ("profiles_repeat", res / "calibration_repeat", res / "calibration_repeat"))
    else:
        targets = (("profiles", res / calibration_dirs[0], res / calibration_dirs[0]),
                   ("profiles_repeat", res / calibration_dirs[1], res / calibration_dirs[1]))
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(tarball) as tf:
            tf.extractall(tmp, filter="data")
        src = Path(tmp) / "fidelity_gpu"
        # another machine's call (calibration_dirs) brings its repeat runs, not the table's runs
        # run by run: a call with one model's runs leaves the other model's in place
        for sub, dest in (("runs", res / "gpu_runs"), ("runs_repeat", res / "gpu_runs_repeat")):
            if calibration_dirs is None or sub == "runs_repeat":
                for run in sorted((src / sub).iterdir()) if (src / sub).is_dir() else []:
                    dest.mkdir(parents=True, exist_ok=True)
                    if run.is_dir():
                        shutil.rmtree(dest / run.name, ignore_errors=True)
                        shutil.copytree(run, dest / run.name)
                    else:  # the call's comparison table and experiment record
                        shutil.copy(run, dest / run.name)
                    written.append(dest / run.name)
        for sub, prof_dir, grid_dir in targets:
            written += install_profiles(src / sub, prof_dir, grid_dir, repo)
        if (src / "log.txt").exists():
            log = res / ("gpu_fidelity_log.txt" if calibration_dirs is None else
                         f"gpu_fidelity_log_{calibration_dirs[0].removeprefix('calibration_')}.txt")
            if calibration_dirs is not None:  # a second call installed into the same dirs keeps the first's log
                k = 2
                while log.exists():
                    log = log.with_name(f"{log.stem.rsplit('_call', 1)[0]}_call{k}.txt")
                    k += 1
            shutil.copy(src / "log.txt", log)
            written.append(log)
    return written


def install_features(tarball: Path, name: str, repo: Path = REPO) -> list[Path]:
    """Unpack a device call's feature runs (steps 7-9) with that call's calibration (step 1)
    into benchmarks/results/features/NAME/: profiles/ (refitted here, provenance kept, with
    their grids), pairs/ (steps 7, 8), pairs_repeat/ (step 9), log.txt -- one machine
    instance, one folder, so each run is replayed with its own machine's calibration."""
    import shutil

    dest = repo / "benchmarks" / "results" / "features" / name
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(tarball) as tf:
            tf.extractall(tmp, filter="data")
        src = Path(tmp) / "fidelity_gpu"
        if not any((src / s).is_dir() for s in ("features", "features_repeat")):
            raise SystemExit(f"{tarball}: no feature runs (steps 7-9) in it")
        for sub, to in (("features", "pairs"), ("features_repeat", "pairs_repeat")):
            for run in sorted((src / sub).iterdir()) if (src / sub).is_dir() else []:
                if run.is_dir():
                    (dest / to).mkdir(parents=True, exist_ok=True)
                    shutil.rmtree(dest / to / run.name, ignore_errors=True)
                    shutil.copytree(run, dest / to / run.name)
                    written.append(dest / to / run.name)
        written += install_profiles(src / "profiles", dest / "profiles", dest / "profiles", repo)
        if (src / "log.txt").exists():
            shutil.copy(src / "log.txt", dest / "log.txt")
            written.append(dest / "log.txt")
    return written


def install_profiles(src: Path, prof_dir: Path, grid_dir: Path, repo: Path = REPO) -> list[Path]:
    """Each profile of a call's folder `src`, refitted by this checkout into `prof_dir`,
    with its grid files (grid, power runs, iterations) copied into `grid_dir`."""
    import shutil

    import yaml

    written: list[Path] = []
    for prof in sorted(src.glob("*.yaml")) if src.is_dir() else []:
        grid_dir.mkdir(parents=True, exist_ok=True)
        prof_dir.mkdir(parents=True, exist_ok=True)
        for f in src.glob(f"{prof.stem}.grid*.*"):
            shutil.copy(f, grid_dir / f.name)
            written.append(grid_dir / f.name)
        written.append(refit_profile(yaml.safe_load(prof.read_text()), grid_dir / f"{prof.stem}.grid.csv",
                                     prof_dir / prof.name, repo))
    return written


def refit_profile(made: dict, grid: Path, dest: Path, repo: Path = REPO) -> Path:
    """Write to ``dest`` the profile fitted to ``grid`` by this checkout's `sim calibrate`,
    keeping the provenance of ``made`` (the profile as the GPU call wrote it)."""
    import yaml

    from servesim.sim.calibrate import calibrate
    from servesim.sim.specs import load_hardware, load_model
    from servesim.sim.types import ConfigError

    prov = {k: v for k, v in made["provenance"].items() if k not in ("source", "grid_sha256", "refitted")}
    try:
        model, hw = load_model(made["model"]), load_hardware(made["hardware"])
    except ConfigError:  # a model this checkout does not bundle (the smoke run's): as made
        doc = made
        doc["provenance"] = {"source": str(grid.relative_to(repo)), **prov}
    else:
        doc = calibrate(model, hw, grid, dest)
        doc["provenance"] = {"source": str(grid.relative_to(repo)), "grid_sha256": doc["provenance"]["grid_sha256"],
                             **prov, "refitted": doc["provenance"]["fitted"]}
    dest.write_text(yaml.safe_dump(doc, sort_keys=False))
    return dest


def refit_shipped(repo: Path = REPO) -> list[Path]:
    """Refit every shipped profile (profiles/, benchmarks/results/{calibration*,features/*/profiles}/) from the grid
    its provenance names: after a change to the fitting code, no profile is left stale."""
    import yaml

    out = []
    for prof in sorted([*(repo / "profiles").glob("*.yaml"), *(repo / "benchmarks" / "results").glob("calibration*/*.yaml"),
                        *(repo / "benchmarks" / "results").glob("features/*/profiles/*.yaml")]):
        made = yaml.safe_load(prof.read_text())
        src = (made.get("provenance") or {}).get("source")
        if src and (repo / src).is_file():
            out.append(refit_profile(made, repo / src, prof, repo))
    return out


def main() -> int:
    if len(sys.argv) == 2 and sys.argv[1] == "--refit":
        for p in refit_shipped():
            print("refitted", p)
        return 0
    if len(sys.argv) == 4 and sys.argv[1] == "--install-features":  # --install-features TARBALL NAME
        for p in install_features(Path(sys.argv[2]), sys.argv[3]):
            print("wrote", p)
        return 0
    if len(sys.argv) in (3, 5) and sys.argv[1] == "--install":
        dirs = None
        if len(sys.argv) == 5:  # --install TARBALL --calibration-dirs A,B
            dirs = tuple(sys.argv[4].split(","))
        for p in install(Path(sys.argv[2]), calibration_dirs=dirs):
            print("wrote", p)
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=540)
    ap.add_argument("--models", default="8b,1b")
    ap.add_argument("--steps", default="1,2,3,4")
    ap.add_argument("--smoke", action="store_true", help="a tiny model on whatever device there is")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_fidelity_"))
    end = time.monotonic() + args.budget_s
    logbuf = io.StringIO()

    def log(s: str) -> None:
        print(s, flush=True)
        logbuf.write(s + "\n")

    def pack() -> None:
        (work / "log.txt").write_text(logbuf.getvalue())
        with tarfile.open(out / "fidelity_gpu.tar.gz", "w:gz") as tf:
            tf.add(work, arcname="fidelity_gpu")

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    steps = set(args.steps.split(","))
    common: list[str] = []
    model_ref = dict(MODELS)
    if args.smoke:
        tiny = work / "tiny.json"
        tiny.write_text(json.dumps(TINY))
        model_ref = {m: str(tiny) for m in MODELS}
        common = ["--set", f"model={tiny}", "--set", "kv_cache.pool_tokens=20000", "--set", "workload.num_requests=10",
                  "--set", "workload.max_prompt_len=200", "--set", "workload.max_output_len=12"]
    try:
        import torch

        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except ImportError:
        gpu = "no torch"
    # the hardware spec of this GPU (the GPU backend refuses another's): runs and profiles say which card
    from servesim.sim.specs import hardware_for_device

    hardware = hardware_for_device(gpu) or "h100-sxm"  # no CUDA device (the smoke run): the experiments' own
    prefix = hardware.split("-")[0]
    log(f"gpu_fidelity on {gpu} ({hardware}), {time.strftime('%Y-%m-%d %H:%M')}, models {models}, "
        f"steps {sorted(steps)}")

    def calibrate(m: str, folder: str) -> None:
        prof = work / folder / f"{prefix}-{MODELS[m]}.yaml"
        if args.smoke:  # the tiny model's grid: small points
            from servesim.gpu_backend import profiler

            profiler.DECODE_POINTS = [(4, 64, 12, True), (2, 32, 10, False)]
            profiler.POWER_POINTS = [(4, 64, 16, True)]
            profiler.PREFILL_POINTS = [(1, 128), (2, 64)]
            profiler.MIXED_POINTS = [(4, 32, 6, 40)]
            profiler.PIECEWISE_POINTS = [(4, 32, 6, 40)]
            profiler.PREFIX_POINTS = [(3, 64, 16, 4, 48)]
            profiler.SERVED_POINTS = {"small": (12, 40.0, 48, 8), "large": (12, 40.0, 48, 8)}
        cli(["calibrate", "--backend", "gpu", "--model", model_ref[m], "--hardware", hardware, "--out", str(prof)], log,
            fresh=not args.smoke)

    def run(m: str, variants: list[str], folder: str, experiment: str = "experiments/fidelity.yaml") -> None:
        cli(["run", experiment, "--backend", "gpu", "--only", ",".join(f"{m}-{v}" for v in variants),
             "--out", str(work / folder), "--set", "output.plots=false", "--set", "output.timeline=false",
             "--set", f"hardware={hardware}", *common], log,
            fresh=not args.smoke)

    plan = []
    for m in models:
        plan.append(("1", f"calibrate {m}", 90 if m == "8b" else 60, lambda m=m: calibrate(m, "profiles")))
    for m in models:
        plan.append(("2", f"fidelity runs {m}", 120, lambda m=m: run(m, ["online-low", "online-high", "offline"], "runs")))
    for m in models:
        plan.append(("3", f"calibrate {m} again", 90 if m == "8b" else 55, lambda m=m: calibrate(m, "profiles_repeat")))
    for m in models:
        plan.append(("4", f"repeat run {m}", 45, lambda m=m: run(m, ["online-high"], "runs_repeat")))
    for step, folder in (("5", "runs_repeat"), ("6", "runs_third")):  # every fidelity run again
        for m in models:
            plan.append((step, f"fidelity runs {m} again ({folder})", 120,
                         lambda m=m, f=folder: run(m, ["online-low", "online-high", "offline"], f)))
    features = "experiments/fidelity_features.yaml"  # each feature off and on, same requests
    for step, what, variants, folder in (("7", "overlap scheduler off / on", OVERLAP_PAIR, "features"),
                                         ("8", "prefix reuse off / on", REUSE_PAIR, "features"),
                                         ("9", "overlap scheduler off / on again", OVERLAP_PAIR, "features_repeat")):
        for m in models:
            plan.append((step, f"{what} {m}", 70 if "overlap" in what else 110,
                         lambda m=m, v=variants, f=folder: run(m, list(v), f, features)))
    os.chdir(REPO)
    for step, what, need, fn in plan:
        if step not in steps:
            continue
        left = end - time.monotonic()
        if left < need and not args.smoke:
            log(f"[{what}: skipped, {left:.0f} s left, needs ~{need} s]")
            continue
        t0 = time.perf_counter()
        try:
            fn()
        except Exception:  # keep going: one broken step must not lose the others
            log(f"[{what} failed]\n{traceback.format_exc()[-3000:]}")
        log(f"[{what}: {time.perf_counter() - t0:.0f} s, {end - time.monotonic():.0f} s left]")
        pack()
    pack()
    return 0


if __name__ == "__main__":
    sys.exit(main())
