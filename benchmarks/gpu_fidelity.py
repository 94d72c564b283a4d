"""The GPU half of the fidelity benchmark, in one device call: calibrate, then run the
fidelity workloads, then calibrate again and repeat runs (for the noise floor).

    # on the GPU machine (the command is in benchmarks/results/fidelity.md)
    python benchmarks/gpu_fidelity.py --out $OUT --budget-s 540
    # anywhere: the same steps on a tiny model on the CPU (CI runs this)
    python benchmarks/gpu_fidelity.py --smoke --out /tmp/gpu_fidelity

Steps, most important first; each is skipped when the time budget left is too small:
 1. `sim calibrate --backend gpu` for each model (the designed grid through the real
    engine; grid CSV, per-run energies, profile), with `--gemm-precisions fp8` on a card
    with fp8 tensor cores (the fp8 GEMM curves, `gemm_times_by_precision`, beside the grid
    as .grid.gemm-fp8.csv: what the shipped profile prices `model_precision: fp8` with;
    each sweep's seconds in the profile's provenance, `gemm_sweep_s`);
 2. `sim run experiments/fidelity.yaml --backend gpu` (the fidelity workloads: Azure
    conversation trace at two loads, an offline batch, per model);
 3. a second calibration of each model (calibration repeatability);
 4. a repeat of the online-high runs (run-to-run noise on the GPU);
 5, 6. every fidelity run again, twice (runs_repeat/, runs_third/: the table against the
    mean of three GPU runs of each workload). Not in the default steps.
 7, 8, 9. experiments/fidelity_features.yaml: the overlap scheduler off and on (7), prefix
    reuse off and on (8), the overlap pair again (9; features/, features_repeat/:
    benchmarks/feature_fidelity.py's table). Not in the default steps.
 10, 11. experiments/fidelity_long.yaml (the 8B only: Mooncake long prompts, chunked
    context, the KV pool near full under GUARANTEED_NO_EVICT) once (10, runs_long/) and
    again (11, runs_long_repeat/; benchmarks/fidelity_h200.py's long-prompt table). Not in
    the default steps.
Everything is packed into OUT/fidelity_gpu.tar.gz after every step (the device tool
returns at most 8 files), with call.json (the command, date, device and the host's identity:
hostname, GPU UUID -- device calls may land on different machines). Back on any machine,

    python benchmarks/gpu_fidelity.py --install PATH/fidelity_gpu.tar.gz [--name CALL]
    python benchmarks/gpu_fidelity.py --refit     # after a change to the fitting code
    python benchmarks/gpu_fidelity.py --install-features PATH/fidelity_gpu.tar.gz NAME [--name CALL]  # steps 1, 7-9

packs the call's raw files into ONE archive, benchmarks/results/archives/CALL.tar.xz with its
manifest CALL.json (benchmarks/results_io.py), its members named by where the tables look
for them -- runs in gpu_runs{,_repeat}/, grids in calibration/ (the second calibration's in
calibration_repeat/); a call of the feature steps under features/NAME/ -- and refits the
call's profiles into profiles/ (the second calibration into
benchmarks/results/calibration_repeat/; feature calls into features/NAME/profiles/). Then
`benchmarks/fidelity.py` replays the runs on the simulator and writes the error table
(`benchmarks/feature_fidelity.py`: the feature table).
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
sys.path.insert(0, str(REPO / "benchmarks"))  # results_io, when this file is loaded as a module

MODELS = {"8b": "llama-3.1-8b", "1b": "llama-3.2-1b"}
# experiments/fidelity_features.yaml's pairs (variant names after the model's "8b-" / "1b-")
OVERLAP_PAIR = ("online-high", "online-high-overlap")
REUSE_PAIR = ("multiturn-noreuse", "multiturn-reuse")
# experiments/fidelity_long.yaml's variants (after the model's "8b-"), and the models it has
LONG_EXPERIMENT = "experiments/fidelity_long.yaml"
LONG_VARIANTS = ("mooncake-long",)
LONG_MODELS = ("8b",)
TINY = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=128, vocab_size=256, rms_norm_eps=1e-5, rope_theta=10000.0,
            max_position_embeddings=4096, tie_word_embeddings=False)


def calibration_gemm_precisions(hardware: str) -> tuple[str, ...]:
    """The quantised GEMM sweeps a calibration of this call measures besides bf16's: every
    one `sim calibrate` can measure that the card has tensor cores for (fp8 on Hopper and
    later), so the shipped profile prices an fp8 run with its own measured fp8 curves
    (``gemm_times_by_precision``), not its bf16 curves times the roofline ratio."""
    from servesim.sim.calibrate import GEMM_PRECISIONS
    from servesim.sim.specs import MATMUL_PRECISION, load_hardware

    hw = load_hardware(hardware)
    return tuple(p for p in GEMM_PRECISIONS if hw.matmul_rate(MATMUL_PRECISION[p]))


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


def host_identity() -> dict:
    """Which machine this is: its hostname and, with a CUDA device, the GPU's UUID (two
    device calls on the same host and GPU share both; the tables group repeated runs by it)."""
    import socket

    import subprocess

    ident = {"hostname": socket.gethostname()}
    try:
        import torch
    except ImportError:
        return ident
    if torch.cuda.is_available():
        uuid = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "uuid", None)
        if uuid is None:  # an older torch: ask the driver
            try:
                uuid = subprocess.run(["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader", "-i",
                                       str(torch.cuda.current_device())], capture_output=True, text=True,
                                      timeout=30).stdout.strip() or None
            except (OSError, subprocess.SubprocessError):
                uuid = None
        if uuid is not None:
            ident["gpu_uuid"] = str(uuid)
    return ident


def call_info(src: Path, tarball: Path) -> dict:
    """What a device call's tarball says about the call: the command, date, device and
    hardware (its call.json; for tarballs from before it, the log's first line)."""
    import re

    if (src / "call.json").is_file():
        return json.loads((src / "call.json").read_text())
    first = (src / "log.txt").read_text().splitlines()[0] if (src / "log.txt").is_file() else ""
    m = re.match(r"gpu_fidelity on (.+?)(?: \((\S+)\))?, (\d{4}-\d\d-\d\d \d\d:\d\d), models \[(.*?)\], "
                 r"steps \[(.*?)\]", first)
    if not m:
        return {"command": f"python benchmarks/gpu_fidelity.py (made {tarball.name})", "date": "", "device": "?"}
    device, hardware, date, models, steps = m.groups()
    unq = lambda t: ",".join(x.strip().strip("'") for x in t.split(","))  # noqa: E731
    return {"command": f"python benchmarks/gpu_fidelity.py --out $OUT --models {unq(models)} --steps {unq(steps)}",
            "date": date, "device": device, **({"hardware": hardware} if hardware else {})}


def call_name(info: dict) -> str:
    """A device call's default archive name: its date and card (20261127-0250-h200-sxm)."""
    date = info.get("date", "").replace("-", "").replace(":", "").replace(" ", "-") or time.strftime("%Y%m%d-%H%M")
    card = info.get("hardware") or "".join(c if c.isalnum() else "-" for c in info.get("device", "gpu").lower())
    return f"{date}-{card}"


def _tree(folder: Path, rel: str) -> dict[str, Path]:
    """Every file under ``folder`` as archive members under ``rel``."""
    return {f"{rel}/{f.relative_to(folder).as_posix()}": f for f in sorted(folder.rglob("*")) if f.is_file()}


def _store(files: dict[str, Path], replaced: set[str], name: str, info: dict, how: str, repo: Path) -> list[Path]:
    """Pack a call's files into its archive (one per call, with its manifest), take what it
    replaces out of the older archives, and unpack it into the cache."""
    from results_io import Results

    store = Results(repo)
    changed = store.supersede(replaced, by=name)
    arc = store.pack(name, files, {**{k: info[k] for k in ("device", "date", "command", "hardware", "host")
                                      if k in info},
                                   "installed": how})
    store.unpack(name)
    return [arc, arc.with_name(f"{name}.json"), *(store.archives / f"{c}.json" for c in changed)]


def install(tarball: Path, repo: Path = REPO, calibration_dirs: tuple[str, str] | None = None,
            name: str | None = None) -> list[Path]:
    """Install a device call's fidelity_gpu.tar.gz: its raw files (runs, grids, log) packed
    as ONE archive, benchmarks/results/archives/NAME.tar.xz with its manifest (NAME: the
    call's date and card unless given), its members named by the results layout:

    runs in gpu_runs/ and gpu_runs_repeat/, grids in calibration/ (the second calibration's in
    calibration_repeat/), the log as gpu_fidelity_log_NAME.txt. Profiles are refitted here
    from their grids with this checkout's `sim calibrate` (keeping the GPU call's provenance:
    GPU, driver, versions, date) into profiles/ and benchmarks/results/calibration_repeat/
    (tracked), so the shipped profiles always match the code that reads them.
    `calibration_dirs` (profiles, repeat) puts the calibrations elsewhere (another machine's,
    kept for comparison); such a call's repeat runs (step 4) still go to gpu_runs_repeat/ and
    its fidelity runs are not installed. A run replaces the run of the same name (and a grid
    the grid) in the older archives: a call with one model's runs keeps the other's."""
    import yaml

    res = repo / "benchmarks" / "results"
    if calibration_dirs is None:
        targets = (("profiles", repo / "profiles", "calibration"),
                   ("profiles_repeat", res / "calibration_repeat", "calibration_repeat"))
    else:
        targets = (("profiles", res / calibration_dirs[0], calibration_dirs[0]),
                   ("profiles_repeat", res / calibration_dirs[1], calibration_dirs[1]))
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(tarball) as tf:
            tf.extractall(tmp, filter="data")
        src = Path(tmp) / "fidelity_gpu"
        info = call_info(src, tarball)
        name = name or call_name(info)
        files: dict[str, Path] = {}
        replaced: set[str] = set()
        # another machine's call (calibration_dirs) brings its repeat runs, not the table's runs
        for sub, dest in (("runs", "gpu_runs"), ("runs_repeat", "gpu_runs_repeat")):
            if calibration_dirs is None or sub == "runs_repeat":
                for run in sorted((src / sub).iterdir()) if (src / sub).is_dir() else []:
                    replaced.add(f"{dest}/{run.name}")
                    # a folder per run; the call's comparison table and experiment record beside them
                    files.update(_tree(run, f"{dest}/{run.name}") if run.is_dir() else {f"{dest}/{run.name}": run})
        profs = []
        for sub, prof_dir, grid_rel in targets:
            for prof in sorted((src / sub).glob("*.yaml")) if (src / sub).is_dir() else []:
                for f in sorted((src / sub).glob(f"{prof.stem}.grid*.*")):
                    files[f"{grid_rel}/{f.name}"] = f
                    replaced.add(f"{grid_rel}/{f.name}")
                profs.append((prof, prof_dir, grid_rel))
        if (src / "log.txt").exists():
            files[f"gpu_fidelity_log_{name}.txt"] = src / "log.txt"
        how = f"python benchmarks/gpu_fidelity.py --install {tarball.name}" + \
            (f" --calibration-dirs {','.join(calibration_dirs)}" if calibration_dirs else "")
        written = _store(files, replaced, name, info, how, repo)
        from results_io import Results

        store = Results(repo)
        for prof, prof_dir, grid_rel in profs:
            grid = f"{grid_rel}/{prof.stem}.grid.csv"
            written.append(refit_profile(yaml.safe_load(prof.read_text()), store.path(grid), prof_dir / prof.name,
                                         repo, source=f"benchmarks/results/{grid}", made_path=prof))
    return written


def install_features(tarball: Path, name: str, repo: Path = REPO, call: str | None = None) -> list[Path]:
    """Install a device call's feature runs (steps 7-9) with that call's calibration (step 1)
    for machine instance NAME: its raw files as ONE archive (benchmarks/results/archives/CALL,
    CALL: the call's date and card unless given), members under features/NAME/ -- pairs/
    (steps 7, 8), pairs_repeat/ (step 9), profiles/ (the grids), log.txt -- and the call's
    profiles refitted here (provenance kept) into benchmarks/results/features/NAME/profiles/
    (tracked): one machine instance, one folder, so each run is replayed with its own
    machine's calibration."""
    import yaml

    from results_io import Results

    store = Results(repo)
    base = f"features/{name}"
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(tarball) as tf:
            tf.extractall(tmp, filter="data")
        src = Path(tmp) / "fidelity_gpu"
        if not any((src / s).is_dir() for s in ("features", "features_repeat")):
            raise SystemExit(f"{tarball}: no feature runs (steps 7-9) in it")
        info = call_info(src, tarball)
        call = call or call_name(info)
        files: dict[str, Path] = {}
        replaced: set[str] = set()
        for sub, to in (("features", "pairs"), ("features_repeat", "pairs_repeat")):
            for run in sorted((src / sub).iterdir()) if (src / sub).is_dir() else []:
                if run.is_dir():
                    files.update(_tree(run, f"{base}/{to}/{run.name}"))
                    replaced.add(f"{base}/{to}/{run.name}")
        profs = sorted((src / "profiles").glob("*.yaml")) if (src / "profiles").is_dir() else []
        for prof in profs:
            for f in sorted((src / "profiles").glob(f"{prof.stem}.grid*.*")):
                files[f"{base}/profiles/{f.name}"] = f
                replaced.add(f"{base}/profiles/{f.name}")
        if (src / "log.txt").exists():  # a second call for the same machine: its log beside the first's
            taken = {m for c, man in store.manifests().items() if c != call for m in man["members"]}
            log = f"{base}/log.txt" if f"{base}/log.txt" not in taken else f"{base}/log_{call}.txt"
            files[log] = src / "log.txt"
        written = _store(files, replaced, call, info,
                         f"python benchmarks/gpu_fidelity.py --install-features {tarball.name} {name}", repo)
        store = Results(repo)
        for prof in profs:
            grid = f"{base}/profiles/{prof.stem}.grid.csv"
            written.append(refit_profile(yaml.safe_load(prof.read_text()), store.path(grid),
                                         store.tables / base / "profiles" / prof.name, repo,
                                         source=f"benchmarks/results/{grid}", made_path=prof))
    return written


def refit_profile(made: dict, grid: Path, dest: Path, repo: Path = REPO, source: str | None = None,
                  made_path: Path | None = None) -> Path:
    """Write to ``dest`` the profile fitted to ``grid`` by this checkout's `sim calibrate`,
    keeping the provenance of ``made`` (the profile as the GPU call wrote it, at
    ``made_path``); ``source``: the grid's name in the provenance (default: its path in
    the repository; an archived grid's is its path under benchmarks/results/)."""
    import shutil

    from servesim.sim.calibrate import calibrate, dump_profile, residuals_path
    from servesim.sim.specs import load_hardware, load_model
    from servesim.sim.types import ConfigError

    source = source or str(grid.relative_to(repo))
    prov = {k: v for k, v in made["provenance"].items() if k not in ("source", "grid_sha256", "refitted")}
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        model, hw = load_model(made["model"]), load_hardware(made["hardware"])
    except ConfigError:  # a model this checkout does not bundle (the smoke run's): as made, with its residuals
        doc = made
        doc["provenance"] = {"source": source, **prov}
        ref = (doc.get("fit") or {}).get("residuals")
        if isinstance(ref, dict) and made_path is not None and (made_path.parent / ref["file"]).is_file():
            shutil.copy(made_path.parent / ref["file"], residuals_path(dest))
            doc["fit"]["residuals"] = {**ref, "file": residuals_path(dest).name}
    else:
        kv = made["provenance"].get("kv_attention")  # a kernel table measured apart (sim calibrate --kv-attention)
        doc = calibrate(model, hw, grid, dest, kv_attention_table=repo / kv if kv else None)
        doc["provenance"] = {"source": source, "grid_sha256": doc["provenance"]["grid_sha256"],
                             **prov, "refitted": doc["provenance"]["fitted"]}
        _name_long_kv_table(doc, source)
    dump_profile(dest, doc)
    return dest


def _name_long_kv_table(doc: dict, source: str) -> None:
    """The long-context kernel table (``.kv-long.csv``, beside the grid) named where it is kept
    -- beside ``source``, the grid's name in the results -- not where the device call or the
    refit read it (a device's /tmp, the archive's extraction cache)."""
    if not source.endswith(".grid.csv"):
        return
    table = source[: -len(".csv")] + ".kv-long.csv"
    if "kv_attention_long" in doc["provenance"]:
        doc["provenance"]["kv_attention_long"] = table
    for section in doc.values():
        if isinstance(section, dict) and isinstance(section.get("decode_attention_long"), dict):
            section["decode_attention_long"]["source"] = table


def refit_shipped(repo: Path = REPO) -> list[Path]:
    """Refit every shipped profile (profiles/, benchmarks/results/{calibration*,calibration_h200/*,
    features/*/profiles}/) from the grid its provenance names (in the calls' archives): after a change to the fitting
    code, no profile is left stale."""
    import yaml

    from results_io import Results

    store = Results(repo)
    out = []
    for prof in sorted([*(repo / "profiles").glob("*.yaml"), *store.tables.glob("calibration*/*.yaml"),
                        *store.tables.glob("calibration_h200/*/*.yaml"),
                        *store.tables.glob("features/*/profiles/*.yaml")]):
        made = yaml.safe_load(prof.read_text())
        src = (made.get("provenance") or {}).get("source")
        grid = store.path(src) if src and src.startswith("benchmarks/results/") else repo / src if src else None
        if grid is not None and grid.is_file():
            out.append(refit_profile(made, grid, prof, repo, source=src))
    return out


def main() -> int:
    if sys.argv[1:2] in (["--refit"], ["--install"], ["--install-features"]):
        ap = argparse.ArgumentParser(prog="gpu_fidelity.py", description="install or refit (on any machine)")
        ap.add_argument("--refit", action="store_true")
        ap.add_argument("--install", metavar="TARBALL", type=Path)
        ap.add_argument("--install-features", nargs=2, metavar=("TARBALL", "NAME"))
        ap.add_argument("--calibration-dirs", help="A,B: --install's calibrations go to benchmarks/results/A, B")
        ap.add_argument("--name", help="the call's archive name (default: its date and card)")
        a = ap.parse_args()
        if a.refit:
            written = refit_shipped()
        elif a.install_features:
            written = install_features(Path(a.install_features[0]), a.install_features[1], call=a.name)
        else:
            written = install(a.install, calibration_dirs=tuple(a.calibration_dirs.split(",")) if a.calibration_dirs
                              else None, name=a.name)
        for p in written:
            print("wrote", p)
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=540)
    ap.add_argument("--models", default="8b,1b")
    ap.add_argument("--steps", default="1,2,3,4")
    ap.add_argument("--smoke", action="store_true", help="a tiny model on whatever device there is")
    ap.add_argument("--smoke-hardware", default="h100-sxm",
                    help="--smoke without a CUDA device: the hardware spec the runs and profiles name (default "
                         "h100-sxm; h200-sxm makes a call that benchmarks/fidelity_h200.py --install takes)")
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
        (work / "call.json").write_text(json.dumps(call, indent=1) + "\n")  # the manifest's command, date, device
        with tarfile.open(out / "fidelity_gpu.tar.gz", "w:gz") as tf:
            tf.add(work, arcname="fidelity_gpu")

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    steps = set(args.steps.split(","))
    common: list[str] = []
    model_ref = dict(MODELS)
    if args.smoke:
        import torch

        if not torch.cuda.is_available():  # the calibration's kv-attention sweep runs the Triton kernel itself:
            os.environ.setdefault("TRITON_INTERPRET", "1")  # the interpreter on CPU tensors (before its import)
        tiny = work / "tiny.json"
        tiny.write_text(json.dumps(TINY))
        model_ref = {m: str(tiny) for m in MODELS}
        common = ["--set", f"model={tiny}", "--set", "kv_cache.pool_tokens=20000", "--set", "workload.num_requests=10",
                  "--set", "workload.max_prompt_len=200", "--set", "workload.max_output_len=12"]
    # the hardware spec of this GPU (the GPU backend refuses another's): runs and profiles say which card
    from bench_device import device_name, hardware_here

    gpu, hardware = device_name(), hardware_here(args.smoke_hardware)  # no CUDA device: the smoke's
    prefix = hardware.split("-")[0]
    call = {"command": "python benchmarks/gpu_fidelity.py " + " ".join(sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M"), "device": gpu, "hardware": hardware, "host": host_identity()}
    log(f"gpu_fidelity on {gpu} ({hardware}), {call['date']}, models {models}, steps {sorted(steps)}, host "
        f"{call['host']}")

    gemm_precisions = calibration_gemm_precisions(hardware)

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
            profiler.SERVED_HIGH_POINTS = {"small": (12, 80.0, 48, 8), "large": None}
            profiler.PROMPT_POINTS = [(4, 24)]
            profiler.CHUNKED_POINTS = [(2, 120, 4, 40, False), (2, 120, 4, 40, True)]
            from servesim.gpu_backend import kv_attention_sweep as kvs

            from servesim.sim import kv_attention

            # the kv-long sweep at tiny contexts (the interpreter: minutes at 8-16k), its fit's bounds with them
            kvs.LONG_SIZES = tuple((b, c) for b in (1, 3) for c in (24, 48, 96, 160))
            kv_attention.SHORT_CTX_MAX, kv_attention.LONG_CTX_MIN = 48, 96
            if not getattr(profiler.gemm_sweep, "smoke", False):  # the GEMM sweep at three row counts
                sweep = profiler.gemm_sweep

                def small_sweep(model, **kw):
                    return sweep(model, **{"tokens": (1, 16, 48), **kw})

                small_sweep.smoke = True
                profiler.gemm_sweep = small_sweep
            # `sim calibrate --backend gpu` refuses a machine without CUDA; the smoke measures the
            # tiny model's grid on whatever device there is through the same function, in one
            # grid process (fewer start-ups than the device's three)
            from servesim.sim.calibrate import calibrate as fit_grid
            from servesim.sim.specs import load_hardware, load_model

            t0 = time.perf_counter()
            doc = fit_grid(load_model(model_ref[m]), load_hardware(hardware), None, prof, backend="gpu",
                           model_ref=model_ref[m], processes=1, gemm_precisions=gemm_precisions)
            log(f"$ sim calibrate --backend gpu --model {model_ref[m]} --hardware {hardware} --out {prof} "
                f"--processes 1 --gemm-precisions {','.join(gemm_precisions)}  (in this process: {time.perf_counter() - t0:.0f} s)\nwrote {prof}: "
                f"{doc['fit']['points']} measurements")
            return
        cli(["calibrate", "--backend", "gpu", "--model", model_ref[m], "--hardware", hardware, "--out", str(prof),
             "--gemm-precisions", ",".join(gemm_precisions)], log)

    def run(m: str, variants: list[str], folder: str, experiment: str = "experiments/fidelity.yaml",
            extra: tuple[str, ...] = ()) -> None:
        cli(["run", experiment, "--backend", "gpu", "--only", ",".join(f"{m}-{v}" for v in variants),
             "--out", str(work / folder), "--set", "output.plots=false", "--set", "output.timeline=false",
             "--set", f"hardware={hardware}", *common, *extra], log,
            fresh=not args.smoke)

    plan = []
    for m in models:
        plan.append(("1", f"calibrate {m}", 90 if m == "8b" else 60, lambda m=m: calibrate(m, "profiles")))
    for m in models:
        # measured on an H200: 99 s (8b), 73 s (1b), call 20261202-1830 / -1857
        plan.append(("2", f"fidelity runs {m}", 110 if m == "8b" else 85,
                     lambda m=m: run(m, ["online-low", "online-high", "offline"], "runs")))
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
    # the long-prompt run: ~85 s of serving on an H200 plus the engine's start-up; the smoke's
    # chunks are small enough that its (capped) prompts are still chunked, its pool still fills
    long_smoke = ("--set", "scheduler.max_batch_size=16", "--set", "scheduler.max_num_tokens=64", "--set",
                  "kv_cache.pool_tokens=1024") if args.smoke else ()
    for step, folder in (("10", "runs_long"), ("11", "runs_long_repeat")):
        for m in models:
            if m in LONG_MODELS:
                plan.append((step, f"long-prompt run {m} ({folder})", 150,
                             lambda m=m, f=folder: run(m, list(LONG_VARIANTS), f, LONG_EXPERIMENT, long_smoke)))
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
