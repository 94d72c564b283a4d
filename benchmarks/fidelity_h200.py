"""Fidelity on the H200: the calibrated simulator against GPU runs made on an H200, each
run replayed (same requests) with the profile fitted to the designed grid in the same
device call. The H100 table (benchmarks/fidelity.py, fidelity.md) stays as the second
machine kind; this page is the H200's.

    # the GPU half, one device call each on an H200 (estimated wall on one H200):
    python benchmarks/gpu_fidelity.py --out $OUT --budget-s 585 --models 8b --steps 1,2,5,10  # ~530 s
    python benchmarks/gpu_fidelity.py --out $OUT --budget-s 585 --models 1b --steps 1,2,5,6   # ~345 s
    python benchmarks/gpu_fidelity.py --out $OUT --budget-s 585 --models 8b --steps 1,2,6,11  # ~530 s; on
    #   another host (cross-machine), or on the same one (a third run of each workload, the long run again)
    python benchmarks/gpu_fidelity.py --out $OUT --budget-s 585 --models 8b --steps 1,10,11  # ~460 s: the 8B's
    #   calibration (with the kv-long sweep) and the long-prompt runs on the same instance
    # install a device call's fidelity_gpu.tar.gz:
    python benchmarks/fidelity_h200.py --install PATH/fidelity_gpu.tar.gz [--name CALL]
    # the table (benchmarks/out/, or benchmarks/results/ with --write-results):
    python benchmarks/fidelity_h200.py [--write-results]

An install packs the call's raw files into ONE archive (benchmarks/results/archives/CALL),
its members under h200/CALL/ (runs/, calibration/, log.txt) so they never replace the H100
table's, and refits the call's profiles with this checkout's fitting code into
profiles/h200-<model>.yaml (the shipped H200 profiles) and, kept per call, into
benchmarks/results/calibration_h200/CALL/ (tracked). Several calls: every run of every
installed H200 call is replayed with its own call's profile of its model, else the shipped
one (the latest call with a grid for it); a run of one call replayed with another call's
profile is the cross-machine row (the calls' hosts, recorded in call.json since S11, say
whether they were different machines).

The page opens with the S11 must-show lines, each PASS or FAIL computed from the numbers
below it; then per workload the simulator against the mean of the workload's repeated GPU
runs (steps 2, 5, 6 of gpu_fidelity.py: runs/, runs_repeat/, runs_third/ of one call) with
the GPU's own run-to-run noise beside each cell; the long-prompt table (steps 10, 11); the
cross-machine rows.
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
from fidelity import P50S, P99S, STATS, errors, label, mean_abs, own_iterations, replay, vs_mean_and_noise  # noqa: E402
from results_io import RESULTS as STORE  # noqa: E402
from results_io import add_write_results  # noqa: E402

PREFIX = "h200"
# a call's run folders: the fidelity runs, again, once more (gpu_fidelity.py steps 2, 5, 6),
# and the long-prompt run and its repeat (steps 10, 11)
RUN_SETS = ("runs", "runs_repeat", "runs_third")
LONG_SETS = ("runs_long", "runs_long_repeat")
PROFILES_AT = "calibration_h200"  # benchmarks/results/calibration_h200/CALL/: each call's profiles (tracked)


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
        for sub in (*RUN_SETS, *LONG_SETS):
            for run in sorted((src / sub).iterdir()) if (src / sub).is_dir() else []:
                files.update(_tree(run, f"{base}/{sub}/{run.name}") if run.is_dir() else
                             {f"{base}/{sub}/{run.name}": run})
        profs = sorted((src / "profiles").glob("*.yaml")) if (src / "profiles").is_dir() else []
        for prof in profs:
            for f in sorted((src / "profiles").glob(f"{prof.stem}.grid*.*")):
                files[f"{base}/calibration/{f.name}"] = f
        if (src / "log.txt").exists():
            files[f"{base}/log.txt"] = src / "log.txt"
        written = _store(files, set(), name, info, f"python benchmarks/fidelity_h200.py --install {tarball.name}",
                         REPO)
        for prof in profs:  # refitted once into the call's folder, the shipped profile a copy of it
            grid = f"{base}/calibration/{prof.stem}.grid.csv"
            made = yaml.safe_load(prof.read_text())
            kv = kept_kv_attention(made, src / "profiles" / f"{prof.stem}.grid.kv-attention.csv",
                                   REPO / "profiles" / prof.name)
            if kv:
                made["provenance"]["kv_attention"] = kv
            mine = refit_profile(made, STORE.path(grid),
                                 STORE.tables / PROFILES_AT / name / prof.name, REPO,
                                 source=f"benchmarks/results/{grid}", made_path=prof)
            written += [mine, _copy_profile(mine, REPO / "profiles" / prof.name)]
    return written


def kept_kv_attention(made: dict, own_table: Path, shipped: Path) -> str | None:
    """The decode-attention kernel table (per KV dtype) a call's profile is refitted with when
    the call measured none of its own (no ``--kv-dtypes``: no .grid.kv-attention.csv beside
    its grid): the one the shipped profile of the same model and GPU names
    (``provenance.kv_attention``, a table measured apart on this GPU type), so installing a
    calibration never drops the profile's `decode_attention_kernel` (the fp8 KV cache's
    price). None: the call has its own table, or there is none to keep."""
    if (made.get("provenance") or {}).get("kv_attention") or own_table.is_file() or not shipped.is_file():
        return None
    return (yaml.safe_load(shipped.read_text()).get("provenance") or {}).get("kv_attention")


def _copy_profile(src: Path, dest: Path) -> Path:
    """A profile and its residuals sidecar, copied (the file names inside stay valid)."""
    import shutil

    from servesim.sim.calibrate import residuals_path

    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dest)
    if residuals_path(src).exists():
        shutil.copy(residuals_path(src), residuals_path(dest))
    return dest


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


def host_of(call: str) -> str | None:
    """The host a call ran on (hostname / GPU UUID, from its call.json), None where the call
    recorded none (calls before S11)."""
    h = STORE.manifests()[call].get("host")
    if not h:
        return None
    return f"{h.get('hostname', '?')} / {h.get('gpu_uuid', '?')}"


def call_profile(call: str, model: str) -> Path | None:
    """The profile the call itself fitted for ``model`` (refitted by this checkout), if any."""
    p = STORE.tables / PROFILES_AT / call / f"{PREFIX}-{model}.yaml"
    return p if p.exists() else None


def machines() -> dict[str, list[str]]:
    """The installed calls by machine: the calls with the same recorded host (hostname and GPU
    UUID) are one machine, named by its calls joined with '+'; a call that recorded no host is
    a machine of its own (it may have been any)."""
    by: dict[str, list[str]] = {}
    for c in calls():
        by.setdefault(host_of(c) or f"call {c}", []).append(c)
    return {"+".join(cs): cs for cs in by.values()}


def machine_profile(cs: list[str], model: str) -> Path | None:
    """The machine's own calibration of ``model``: its latest call's that has one."""
    return next((p for p in (call_profile(c, model) for c in reversed(cs)) if p is not None), None)


def runs_of(cs: list[str] | str, sets: tuple[str, ...]) -> dict[str, list[Path]]:
    """The GPU runs of the calls ``cs`` (one machine's) by workload, call by call in ``sets``
    order (the first: the one replayed)."""
    out: dict[str, list[Path]] = {}
    for call in [cs] if isinstance(cs, str) else cs:
        for sub in sets:
            d = STORE.path(f"{PREFIX}/{call}/{sub}")
            for run in sorted(d.iterdir()) if d.is_dir() else []:
                if (run / "requests.parquet").exists():
                    out.setdefault(run.name, []).append(run)
    return out


def model_of(run: Path) -> str:
    return yaml.safe_load((run / "config.yaml").read_text())["config"]["model"]


def kv_full_share(run: Path, at: float = 0.9) -> float:
    """Share of the run's busy time with the KV pool at least ``at`` full."""
    import pandas as pd

    it = pd.read_parquet(run / "iterations.parquet", columns=["duration_s", "kv_blocks_used", "kv_blocks_free"])
    total = it.kv_blocks_used + it.kv_blocks_free
    w = it.duration_s
    return float(w[it.kv_blocks_used >= at * total.max()].sum() / w.sum()) if w.sum() else float("nan")


# the long-prompt table's columns (the per-request phases from sim compare)
LONG_STATS = [("ttft_s", "p50"), ("ttft_s", "p99"), ("e2e_s", "p50"), ("e2e_s", "p99"), ("tpot_s", "p50"),
              ("queueing_s", "p50"), ("queueing_s", "p90"), ("prefill_span_s", "p50"), ("decode_span_s", "p50"),
              ("throughput_out_tok_s", "value")]
LONG_MUST = [("ttft_s", "p50"), ("e2e_s", "p50"), ("queueing_s", "p50")]
# the S11 targets: model -> (mean abs over the table's metrics, p50s + throughput, p99s, iteration MAPE)
TARGETS = {"llama-3.2-1b": (0.03, 0.03, 0.06, 0.04), "llama-3.1-8b": (0.025, 0.025, 0.05, None)}
DECODE_TARGET = 0.05  # 1B: pure decode iterations of every batch-size bucket
ENERGY_TARGET = 0.03
LONG_TARGET = 0.03


PHASE_LABELS = {"queueing_s": "queueing", "prefill_span_s": "prefill span", "decode_span_s": "decode span"}


def _label(m: str, s: str) -> str:
    return f"{PHASE_LABELS[m]} {s}" if m in PHASE_LABELS else label(m, s)


def _pct(e) -> str:
    return "-" if e is None else f"{100 * e:+.1f}%"


def measure_workload(call: str, name: str, runs: list[Path], prof: Path, tmp: Path) -> dict:
    """One workload of one call: the replays (roofline, calibrated with ``prof``) against
    its first GPU run, and with several runs the calibrated replay against their mean and the
    runs' own noise."""
    rec = {"call": call, "name": name, "model": model_of(runs[0]), "runs": len(runs), "profile": prof}
    (tmp / call).mkdir(parents=True, exist_ok=True)
    for kind in ("roofline", "calibrated"):
        sim = replay(runs[0], kind, tmp / call, prof)
        errs, its = errors(runs[0], sim, tmp / f"cmp-{call}-{name}-{kind}")
        rec[kind] = (errs, its["mape"])
        rec[f"{kind}_sim"] = sim
    if len(runs) > 1:
        rec["vs_mean"], rec["noise"] = vs_mean_and_noise(runs, rec["calibrated_sim"], tmp / f"m-{call}-{name}")
    rec["kv_full"] = (kv_full_share(runs[0]), kv_full_share(rec["calibrated_sim"]))
    return rec


def best(rec: dict) -> dict:
    """The workload's calibrated errors: against the mean of its GPU runs where it has
    several, else against its one run."""
    return rec.get("vs_mean") or rec["calibrated"][0]


def summary_of(recs: list[dict]) -> dict:
    """Mean abs error over the table's metrics, the p50s + throughput, the p99s; the largest
    energy-per-token error; the mean iteration MAPE (calibrated, over ``recs``)."""
    errs = [best(r) for r in recs]
    en = [e.get(("energy_per_token_j", "value")) for e in errs]
    en = [abs(x) for x in en if x is not None]
    return {"all": mean_abs([e.get(k) for e in errs for k in STATS]),
            "p50": mean_abs([e.get(k) for e in errs for k in STATS if k in P50S]),
            "p99": mean_abs([e.get(k) for e in errs for k in STATS if k in P99S]),
            "energy": max(en) if en else None,
            "mape": mean_abs([r["calibrated"][1] for r in recs])}


def verdict(value, target) -> str:
    if value is None or value != value:
        return "FAIL (no measurement)"
    return f"{'PASS' if value <= target else 'FAIL'} ({100 * value:.1f}% vs ≤{100 * target:g}%)"


def must_show(fid: list[dict], long: list[dict], batch: dict, cross: list[dict]) -> list[str]:
    """The S11 must-show lines, each PASS/FAIL from the numbers (latest call per model)."""
    lines = ["## S11 must-show (computed from the tables below)", ""]
    latest = {}
    for r in fid:
        latest.setdefault(r["model"], {})
        latest[r["model"]][r["call"]] = latest[r["model"]].get(r["call"], []) + [r]
    for model, (t_all, t_p50, t_p99, t_mape) in TARGETS.items():
        if model not in latest:
            lines.append(f"- {model}: FAIL (no H200 fidelity runs installed)")
            continue
        call = max(latest[model])
        recs = latest[model][call]
        sm = summary_of(recs)
        what = ", ".join(f"{r['name']} ({'mean of ' + str(r['runs']) + ' runs' if r['runs'] > 1 else '1 run'})"
                         for r in recs)
        parts = [f"mean abs {verdict(sm['all'], t_all)}", f"p50s {verdict(sm['p50'], t_p50)}",
                 f"p99s {verdict(sm['p99'], t_p99)}"]
        if t_mape is not None:
            parts.append(f"iteration MAPE {verdict(sm['mape'], t_mape)}")
        lines.append(f"- {model}, machine {call}, {len(recs)} workloads [{what}]: " + "; ".join(parts))
        lines.append(f"- {model} energy per token (largest workload error): {verdict(sm['energy'], ENERGY_TARGET)}")
        if model == "llama-3.2-1b":
            worst = [(lab, e) for r in recs for lab, (e, _) in batch.get((r["call"], r["name"]), {}).items()]
            if worst:
                lab, e = max(worst, key=lambda x: x[1])
                lines.append(f"- {model} pure decode iterations, every batch-size bucket of its runs (worst: batch "
                             f"{lab}): {verdict(e, DECODE_TARGET)}")
            else:
                lines.append(f"- {model} pure decode iterations: FAIL (no decode iterations)")
    if long:
        r = long[-1]
        e = best(r)
        for k in LONG_MUST:
            lines.append(f"- long prompts (Mooncake, 8B), machine {r['call']} "
                         f"({'mean of ' + str(r['runs']) + ' runs' if r['runs'] > 1 else '1 run'}), {_label(*k)}: "
                         f"{verdict(None if e.get(k) is None else abs(e[k]), LONG_TARGET)}")
    else:
        lines.append("- long prompts (Mooncake, 8B): FAIL (no run installed: gpu_fidelity.py --steps 10)")
    shown = [c for c in cross if c["hosts_differ"] and c["own"] is not None]
    if shown:
        for c in shown:
            target = TARGETS[c["model"]][0]
            lines.append(f"- cross-machine, {c['model']}: calibrated on {c['cal']}, predicting {c['runs_call']}'s "
                         f"runs (another host): {verdict(c['cross_all'], target)} mean abs over its workloads, "
                         f"beside that machine's own calibration {100 * c['own']:.1f}%")
    else:
        why = ("no pair of calls on two recorded, different hosts with a calibration each" if cross else
               "no run of one call replayed with another call's calibration")
        lines.append(f"- cross-machine: FAIL (not shown: {why})")
    return lines + [""]


def long_analysis() -> list[str]:
    """benchmarks/long_context.py's section: the long-prompt runs' iterations priced on their own shapes."""
    from long_context import installed_long_runs, section

    runs, prof = installed_long_runs()
    if not runs:
        return []
    lines = section(runs, prof)
    lines[0] = lines[0].replace("## ", "### ")
    return [ln.replace("### call", "#### call") for ln in lines] + [""]


def table(write_results: bool) -> Path:
    fid: list[dict] = []
    long: list[dict] = []
    own, by_batch, grids = [], {}, {}
    cross: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ms = machines()
        for mach, cs in ms.items():
            for sets, dest in ((RUN_SETS, fid), (LONG_SETS, long)):
                for name, runs in runs_of(cs, sets).items():
                    model = model_of(runs[0])
                    prof = machine_profile(cs, model) or REPO / "profiles" / f"{PREFIX}-{model}.yaml"
                    rec = measure_workload(mach, name, runs, prof, tmp)
                    rec["host"] = host_of(cs[0])
                    dest.append(rec)
                    if sets is RUN_SETS:
                        own.append((f"{mach} {name}", own_iterations(runs[0], model, prof)))
                        by_batch[(mach, name)] = decode_by_batch(runs[0], model, prof)
                        grids[model] = prof
        # cross-machine: each machine's fidelity runs replayed with every other machine's calibration
        for model in sorted({r["model"] for r in fid}):
            for cal, ccs in ms.items():
                prof = machine_profile(ccs, model)
                if prof is None:
                    continue
                for yc, ycs in ms.items():
                    mine = [r for r in fid if r["call"] == yc and r["model"] == model]
                    if yc == cal or not mine:
                        continue
                    errs, gpu = [], []
                    (tmp / f"x-{cal}-{yc}").mkdir(parents=True, exist_ok=True)
                    for r in mine:
                        runs = runs_of(ycs, RUN_SETS)[r["name"]]
                        sim = replay(runs[0], f"cross-{list(ms).index(cal)}", tmp / f"x-{cal}-{yc}", prof)
                        e = vs_mean_and_noise(runs, sim, tmp / f"xm-{cal}-{yc}-{r['name']}")[0] if len(runs) > 1 \
                            else errors(runs[0], sim, tmp / f"xc-{cal}-{yc}-{r['name']}")[0]
                        errs.append((r["name"], e))
                        theirs = runs_of(ccs, RUN_SETS).get(r["name"])
                        if theirs:  # the two machines' GPU runs of the same requests
                            gpu.append(mean_abs([errors(theirs[0], runs[0], tmp / f"xg-{cal}-{yc}-{r['name']}")[0].get(k)
                                                 for k in STATS]))
                    ha, hb = host_of(ccs[0]), host_of(ycs[0])
                    own_cal = machine_profile(ycs, model) is not None
                    cross.append({"model": model, "cal": cal, "runs_call": yc, "host_cal": ha, "host_runs": hb,
                                  "hosts_differ": ha is not None and hb is not None and ha != hb,
                                  "cross": errs, "cross_all": mean_abs([e.get(k) for _, e in errs for k in STATS]),
                                  "own": summary_of(mine)["all"] if own_cal else None,
                                  "gpu_diff": mean_abs(gpu) if gpu else None})

    def cells(errs: dict, noise: dict | None = None, stats=STATS) -> str:
        if noise is None:
            return " | ".join(_pct(errs.get(k)) for k in stats)
        return " | ".join(f"{_pct(errs.get(k))} (±{100 * noise[k]:.1f}%)" if k in noise else _pct(errs.get(k))
                          for k in stats)

    head = "| machine (its calls) | run | cost model | " + " | ".join(label(m, s) for m, s in STATS) + " | mean abs | iteration MAPE |"
    lines = [head, "|" + "---|" * (len(STATS) + 5)]
    for r in fid:
        for kind in ("roofline", "calibrated"):
            errs, mape = r[kind]
            lines.append(f"| {r['call']} | {r['name']} | {kind} | {cells(errs)} | "
                         f"{100 * mean_abs([errs.get(k) for k in STATS]):.1f}% | {100 * mape:.1f}% |")
    mean_lines = ["| machine (its calls) | run | GPU runs | " + " | ".join(label(m, s) for m, s in STATS) + " | mean abs | GPU noise, "
                  "mean |", "|" + "---|" * (len(STATS) + 5)]
    for r in fid:
        if "vs_mean" in r:
            mean_lines.append(f"| {r['call']} | {r['name']} | {r['runs']} | {cells(r['vs_mean'], r['noise'])} | "
                              f"{100 * mean_abs([r['vs_mean'].get(k) for k in STATS]):.1f}% | "
                              f"{100 * mean_abs([r['noise'].get(k) for k in STATS]):.1f}% |")
    if len(mean_lines) == 2:
        mean_lines.append("| (no workload with repeated GPU runs installed: gpu_fidelity.py --steps 2,5,6) |"
                          + " |" * (len(STATS) + 4))
    long_lines = ["| machine (its calls) | run | GPU runs | against | " + " | ".join(_label(m, s) for m, s in LONG_STATS)
                  + " | iteration MAPE | KV pool ≥90% full, share of busy time: GPU / sim |",
                  "|" + "---|" * (len(LONG_STATS) + 6)]
    for r in long:
        errs, mape = r["calibrated"]
        full = f"{100 * r['kv_full'][0]:.0f}% / {100 * r['kv_full'][1]:.0f}%"
        long_lines.append(f"| {r['call']} | {r['name']} | {r['runs']} | first run | "
                          f"{cells(errs, stats=LONG_STATS)} | {100 * mape:.1f}% | {full} |")
        if "vs_mean" in r:
            long_lines.append(f"| {r['call']} | {r['name']} | {r['runs']} | mean (± GPU noise) | "
                              f"{cells(r['vs_mean'], r['noise'], LONG_STATS)} | | |")
        rf, _ = r["roofline"]
        long_lines.append(f"| {r['call']} | {r['name']} | {r['runs']} | first run, roofline | "
                          f"{cells(rf, stats=LONG_STATS)} | {100 * r['roofline'][1]:.1f}% | |")
    cross_lines = ["| model | calibrated on (host) | runs of (host) | hosts | per workload: mean abs error (against the "
                   "mean of the runs where repeated) | mean abs, all | that machine's own calibration, mean abs | "
                   "the two machines' GPU runs, mean abs difference |", "|---|---|---|---|---|---|---|---|"]
    for c in cross:
        hosts = "different" if c["hosts_differ"] else "same" if c["host_cal"] and c["host_cal"] == c["host_runs"] \
            else "unrecorded"
        per = ", ".join(f"{n} {100 * mean_abs([e.get(k) for k in STATS]):.1f}%" for n, e in c["cross"])
        own_s = "-" if c["own"] is None else f"{100 * c['own']:.1f}%"
        gpu_s = "-" if c["gpu_diff"] is None else f"{100 * c['gpu_diff']:.1f}%"
        cross_lines.append(f"| {c['model']} | {c['cal']} ({c['host_cal'] or '?'}) | {c['runs_call']} "
                           f"({c['host_runs'] or '?'}) | {hosts} | {per} | {100 * c['cross_all']:.1f}% | {own_s} | "
                           f"{gpu_s} |")
    kinds = sorted({k for _, d in own for k in d})
    own_lines = ["| run | " + " | ".join(kinds) + " |", "|" + "---|" * (len(kinds) + 1)]
    for run, d in own:
        own_lines.append(f"| {run} | " + " | ".join(
            f"{100 * d[k]['mape']:.1f}% ({d[k]['iterations']} its, {100 * d[k]['time_share']:.0f}% of time)"
            if k in d else "-" for k in kinds) + " |")
    labs = _bucket_labels()
    batch_lines = ["| run | " + " | ".join(f"batch {x}" for x in labs) + " |", "|" + "---|" * (len(labs) + 1)]
    for (call, run), d in by_batch.items():
        batch_lines.append(f"| {call} {run} | " + " | ".join(
            f"{100 * d[x][0]:.1f}% ({100 * d[x][1]:.0f}%)" if x in d else "-" for x in labs) + " |")
    for model, prof in sorted(grids.items()):
        pts = grid_decode_points(prof)
        batch_lines.append(f"| grid points, {model} | " + " | ".join(str(pts[x]) for x in labs) + " |")
    text = ("# Fidelity on the H200\n\n"
            "Command: `python benchmarks/fidelity_h200.py --write-results` (replays every installed H200 run on "
            "the simulator; the GPU half: `python benchmarks/gpu_fidelity.py --out $OUT --steps 1,2,5,6` (and "
            "`--models 8b --steps 10,11`, the long prompts) on one H200, installed with "
            "`python benchmarks/fidelity_h200.py --install fidelity_gpu.tar.gz`). Each cell: (sim - GPU) / GPU for "
            "the same requests; `calibrated` uses the profile fitted in the run's own device call to the designed "
            "grid (benchmarks/results/calibration_h200/CALL/; the latest one is shipped as "
            "profiles/h200-<model>.yaml), else the shipped one; `roofline` the uncalibrated model.\n\n"
            + "\n".join(must_show(fid, long, by_batch, cross)) + "\n"
            "## Against one GPU run\n\n" + "\n".join(lines) + "\n\n"
            "## Against the mean of the repeated GPU runs, the GPU's own noise beside each cell\n\n"
            "Each cell: the calibrated simulator's error against the mean of the workload's GPU runs on that machine "
            "(the same requests, run again: steps 2, 5, 6; the calls of one recorded host are one machine); in brackets the GPU's own run-to-run noise, the mean "
            "over the runs of |run / mean of the other runs - 1|.\n\n" + "\n".join(mean_lines) + "\n\n"
            "## Long prompts with chunked context near KV saturation\n\n"
            "experiments/fidelity_long.yaml (Mooncake conversation trace, Llama-3.1-8B, prompts capped at 16,384 "
            "tokens, chunked context, GUARANTEED_NO_EVICT, a 262,144-token pool; gpu_fidelity.py steps 10, 11). "
            "Queueing: arrival to first scheduled; prefill span: first scheduled to first token; decode span: first "
            "token to the last (sim compare's per-request phases).\n\n" + "\n".join(long_lines) + "\n\n"
            + "\n".join(long_analysis()) + "\n"
            "## Cross-machine: one machine's calibration predicting another machine's runs\n\n"
            "Hosts from each call's call.json (hostname / GPU UUID; calls before S11 recorded none: `?`, each such "
            "call its own machine, which may have been the same host as another).\n\n"
            + "\n".join(cross_lines) + "\n\n"
            "## Iterations\n\nThe calibrated model priced on each GPU run's own iteration shapes "
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
