"""Simulator fidelity: replay real GPU runs on the simulator, roofline and calibrated.

The GPU runs under benchmarks/results/gpu_runs/ (made by benchmarks/gpu_fidelity.py on an
H100: experiments/fidelity.yaml, Llama-3.2-1B and Llama-3.1-8B, the Azure conversation
trace at two loads and an offline batch) are replayed on the simulator
(`workload: {replay: RUN}`, every other setting taken from the GPU run's resolved config)
with the roofline cost model and with the calibrated profile of the run's model
(profiles/h100-<model>.yaml, fitted in the same device call to the designed grid --
never to these workloads), and `sim compare` gives the errors. Then the noise floor: a
second calibration made right after the table's in the same device call
(benchmarks/results/calibration_repeat/); the same GPU runs made again on the same machine
(gpu_runs_repeat/: in the call of the table's runs; gpu_runs_third/: an earlier call); and
two other machine instances' calibrations and runs of the same workloads
(calibration_machine2/ + gpu_runs_machine2/: A; calibration_machine3/ + gpu_runs_machine3/:
C), compared with the table's and each on its own.
The GPU runs and grids come from the device calls' archives (benchmarks/results/archives/,
unpacked on first use: benchmarks/results_io.py); the profiles are the tracked ones.
Writes benchmarks/out/fidelity.md (benchmarks/results/fidelity.md with --write-results).

    python benchmarks/fidelity.py [--write-results]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import RESULTS as STORE  # noqa: E402
from results_io import add_write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"  # the tracked tables and profiles
# GPU runs and grids: folders under benchmarks/results/ as the archives name them (STORE.path
# unpacks them and gives the folder)
RUNS_AT = "gpu_runs"
REPEAT_RUNS_AT = "gpu_runs_repeat"  # the same requests again, on the table's machine, in the same call
THIRD_RUNS_AT = "gpu_runs_third"  # and once more, on that machine, in an earlier call
# two calibrations made one after the other in one device call on the machine of the table's
# runs: the table's own (profiles/) and the one after it -- the calibration's repeatability
PAIR_PROFILES = (REPO / "profiles", RESULTS / "calibration_repeat")
# other machine instances (other device calls): name, their calibration (profiles), their runs of the same workloads
OTHER_MACHINES_AT = (("A", RESULTS / "calibration_machine2", "gpu_runs_machine2"),
                     ("C", RESULTS / "calibration_machine3", "gpu_runs_machine3"))
# machine instances whose every fidelity run was made three times (D for the 8B, E for the 1B:
# one device call per model), with the calibration of the same call
THRICE_AT = (RESULTS / "calibration_machine4", tuple(f"gpu_runs_machine4{s}" for s in ("", "_repeat", "_third")))
STATS = [("ttft_s", "p50"), ("ttft_s", "p90"), ("ttft_s", "p99"), ("tpot_s", "p50"), ("tpot_s", "p99"),
         ("itl_s", "p50"), ("itl_s", "p99"), ("e2e_s", "p50"), ("e2e_s", "p99"),
         ("throughput_out_tok_s", "value"), ("energy_per_token_j", "value")]
P50S = {("ttft_s", "p50"), ("tpot_s", "p50"), ("e2e_s", "p50"), ("throughput_out_tok_s", "value")}
P99S = {("ttft_s", "p99"), ("tpot_s", "p99"), ("itl_s", "p99"), ("e2e_s", "p99")}


def label(m: str, s: str) -> str:
    name = {"throughput_out_tok_s": "tok/s", "energy_per_token_j": "J/token"}.get(m, m.replace("_s", "").upper())
    return name if s == "value" else f"{name} {s}"


def replay(run: Path, kind: str, out: Path, profile: Path | None = None) -> Path:
    from servesim.sim.cli import main

    cfg = yaml.safe_load((run / "config.yaml").read_text())["config"]
    cfg["workload"] = {"replay": str(run)}
    cfg["output"] = {"plots": False, "timeline": False}
    cfg.pop("power", None)  # the sim's power model: the profile's fit (roofline: the hardware file's)
    if kind != "roofline":
        cfg["cost_model"] = {"kind": "calibrated", "profile": str(profile)}
    name = f"{run.parent.name}-{run.name}-{kind}"
    exp = out / f"{name}.yaml"
    exp.write_text(yaml.safe_dump({"name": name, **cfg}))
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["run", str(exp), "--out", str(out / name)]) == 0
    return out / name / "base"


def errors(a: Path, b: Path, out: Path, values: bool = False) -> tuple[dict, dict]:
    """Per (metric, stat) the relative error (b - a) / a of `sim compare A B` (with
    ``values``: the pair of values (a, b) instead), and its per-iteration comparison."""
    from servesim.sim.compare import compare_runs

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        c = compare_runs(a, b, out, quiet=True)
    res = {(m["metric"], m["stat"]): (m["a"], m["b"]) if values else m["rel_err"] for m in c["metrics"]}
    # the per-request phases (queueing = arrival to first scheduled, prefill span, decode span)
    for k, ph in (c.get("request_phases") or {}).get("phases", {}).items():
        for s, e in ph["rel_err"].items():
            res[(k, s)] = (ph["a"][s], ph["b"][s]) if values else e
    return res, c["iterations"]


def vs_mean_and_noise(gpu_runs: list[Path], sim: Path, out: Path) -> tuple[dict, dict]:
    """Per (metric, stat): the simulator's relative error against the mean of several GPU
    runs of the same requests (what is left when the GPU's run-to-run noise is averaged), and
    that noise (`mean_and_noise`)."""
    return mean_and_noise([errors(g, sim, out / f"mean{i}", values=True)[0] for i, g in enumerate(gpu_runs)])


def mean_and_noise(vals: list[dict]) -> tuple[dict, dict]:
    """From each GPU run's (GPU value, sim value) per key: the sim's relative error against
    the GPU runs' mean, and the GPU's run-to-run noise -- the mean over the runs of
    |run / mean of the other runs - 1| (how far one GPU run is from what the others predict;
    with one run, none). A key is left out where a run lacks it or the values are zero."""
    err, noise = {}, {}
    for k, (_, b) in vals[0].items():
        a = [v[k][0] for v in vals if v.get(k) and v[k][0] is not None]
        if len(a) != len(vals) or not sum(a):
            continue
        if b is not None:
            err[k] = b / (sum(a) / len(a)) - 1
        others = [(sum(a) - x) / (len(a) - 1) for x in a] if len(a) > 1 else []
        if others and all(others):
            noise[k] = sum(abs(x / o - 1) for x, o in zip(a, others)) / len(a)
    return err, noise


def vs_mean_of_runs(gpu_runs: list[Path], sim: Path, out: Path) -> dict:
    """The simulator's relative error against the mean of several GPU runs of the same
    requests, per (metric, stat) (`vs_mean_and_noise`'s first half)."""
    return vs_mean_and_noise(gpu_runs, sim, out)[0]


def own_iterations(run: Path, model: str, profile: Path) -> dict:
    """The calibrated model priced on the GPU run's own iteration shapes, by kind."""
    import pandas as pd

    from servesim.sim.calibrate import iteration_errors_by_kind, load_profile
    from servesim.sim.specs import load_hardware, load_model

    hardware = yaml.safe_load((run / "config.yaml").read_text())["config"]["hardware"]  # the run's card
    m, hw = load_model(model), load_hardware(hardware)
    roofline, _ = load_profile(profile, m, hw)
    return iteration_errors_by_kind(m, hw, roofline, pd.read_parquet(run / "iterations.parquet"))


# the terms fitted to the steps' measured host time (duration - exec + prep), the quantity
# whose ratio host_speed_ratio takes; the launch overheads are fitted to whole iterations
HOST_TERMS = ("scheduler_overhead_s", "scheduler_overhead_per_request_s", "scheduler_overhead_per_context_token_s")


def host_speed_ratio(run: Path, grid_iterations: Path) -> float | None:
    """The run's process's host time per decode step over the calibration process's: the
    median of duration - exec + prep over decode-only steps of up to 40 requests (None
    when either lacks the host times)."""
    import pandas as pd

    def med(it, exec_col, prep_col) -> float:
        d = it[(it.num_ctx_requests == 0) & (it.num_gen_requests <= 40)]
        return float((d.duration_s - d[exec_col] + d[prep_col]).median())

    run_it = pd.read_parquet(run / "iterations.parquet")
    if not grid_iterations.exists() or "host_prep_s" not in run_it.columns:
        return None
    return med(run_it, "host_exec_s", "host_prep_s") / med(pd.read_parquet(grid_iterations), "exec_s", "prep_s")


def host_scaled_profile(profile: Path, ratio: float, out: Path) -> Path:
    """A copy of `profile` with its scheduler (host) terms times `ratio` (a diagnostic, not a
    prediction)."""
    doc = yaml.safe_load(profile.read_text())
    for k in HOST_TERMS:
        if doc["roofline"].get(k) is not None:
            doc["roofline"][k] = float(doc["roofline"][k]) * ratio
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def mean_abs(vals) -> float:
    vals = [abs(v) for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else float("nan")


def main(argv: list[str] | None = None, out_md: Path | None = None) -> Path:
    """Write the page (``out_md``; default benchmarks/out/fidelity.md, with
    ``--write-results`` benchmarks/results/fidelity.md) and return its path."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_write_results(ap)
    args = ap.parse_args(argv)
    if out_md is None:
        out_md = STORE.out_dir(args.write_results) / "fidelity.md"
    RUNS, REPEAT_RUNS, THIRD_RUNS = (STORE.path(d) for d in (RUNS_AT, REPEAT_RUNS_AT, THIRD_RUNS_AT))
    OTHER_MACHINES = tuple((m, cal, STORE.path(r)) for m, cal, r in OTHER_MACHINES_AT)
    THRICE = (THRICE_AT[0], tuple(STORE.path(r) for r in THRICE_AT[1]))
    if not RUNS.is_dir():
        raise SystemExit(f"no GPU runs: {RUNS} (benchmarks/results/archives/ holds them)")
    runs = sorted(p for p in RUNS.iterdir() if (p / "requests.parquet").exists())
    rows, noise, own, diag, rows_other, vs_mean = [], [], [], [], {}, []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for run in runs:
            model = yaml.safe_load((run / "config.yaml").read_text())["config"]["model"]
            prof = REPO / "profiles" / f"h100-{model}.yaml"
            own.append((run.name, own_iterations(run, model, prof)))
            sims = {}
            for kind in ("roofline", "calibrated"):
                sims[kind] = replay(run, kind, tmp, prof)
                errs, its = errors(run, sims[kind], tmp / f"cmp-{run.name}-{kind}")
                rows.append((run.name, kind, [errs.get(s) for s in STATS], its["mape"]))
            ratio = host_speed_ratio(run, STORE.path(f"calibration/h100-{model}.grid.iterations.parquet"))
            if ratio is not None:
                hp = host_scaled_profile(prof, ratio, tmp / f"host-{run.name}.yaml")
                errs, its = errors(run, replay(run, "calibrated-host", tmp, hp), tmp / f"cmp-{run.name}-host")
                diag.append((run.name, ratio, [errs.get(s) for s in STATS], its["mape"]))
            pa, pb = (d / f"h100-{model}.yaml" for d in PAIR_PROFILES)
            if pa.exists() and pb.exists():  # calibration repeatability: sim(table's profile) vs sim(the next one)
                b = replay(run, "calibrated-repeat", tmp, pb)
                cal, _ = errors(sims["calibrated"], b, tmp / f"cmp-{run.name}-rep")
                gpu = [errors(run, d / run.name, tmp / f"cmp-{run.name}-gpu{i}")[0]
                       for i, d in enumerate((REPEAT_RUNS, THIRD_RUNS)) if (d / run.name / "requests.parquet").exists()]
                other, other_gpu = {}, {}
                for mach, cal_dir, runs_dir in OTHER_MACHINES:
                    if (cal_dir / f"h100-{model}.yaml").exists():
                        c = replay(run, f"calibrated-{mach}", tmp, cal_dir / f"h100-{model}.yaml")
                        other[mach] = (errors(sims["calibrated"], c, tmp / f"cmp-{run.name}-{mach}")[0],
                                       errors(run, c, tmp / f"cmp-{run.name}-{mach}gpu")[0])
                    if (runs_dir / run.name / "requests.parquet").exists():
                        other_gpu[mach], _ = errors(run, runs_dir / run.name, tmp / f"cmp-{run.name}-{mach}runs")
                noise.append((run.name, cal, gpu, other, other_gpu))
                many = [run] + [d / run.name for d in (REPEAT_RUNS, THIRD_RUNS)
                                if (d / run.name / "requests.parquet").exists()]
                if len(many) > 2:  # the calibrated row of this run, and against the runs' mean
                    mean = vs_mean_of_runs(many, sims["calibrated"], tmp / f"m-{run.name}")
                    vs_mean.append((run.name, len(many), (rows[-1][2], [mean.get(s) for s in STATS])))
            cal4, runs4 = THRICE
            if (cal4 / f"h100-{model}.yaml").exists() and all((d / run.name / "requests.parquet").exists()
                                                             for d in runs4):
                many = [d / run.name for d in runs4]
                sim4 = replay(many[0], "calibrated-thrice", tmp, cal4 / f"h100-{model}.yaml")
                one, its = errors(many[0], sim4, tmp / f"cmp-{run.name}-thrice")
                mean = vs_mean_of_runs(many, sim4, tmp / f"m4-{run.name}")
                rows_other.setdefault("D/E, against one GPU run", []).append(
                    (run.name, "calibrated", [one.get(s) for s in STATS], its["mape"]))
                rows_other.setdefault("D/E, against the mean of its three GPU runs", []).append(
                    (run.name, "calibrated", [mean.get(s) for s in STATS], its["mape"]))
            for mach, cal_dir, runs_dir in OTHER_MACHINES:  # each other machine's own table
                o = runs_dir / run.name
                if (o / "requests.parquet").exists() and (cal_dir / f"h100-{model}.yaml").exists():
                    errs, its = errors(o, replay(o, f"calibrated-own-{mach}", tmp, cal_dir / f"h100-{model}.yaml"),
                                       tmp / f"cmp-{run.name}-{mach}own")
                    rows_other.setdefault(mach, []).append((run.name, "calibrated", [errs.get(s) for s in STATS],
                                                            its["mape"]))

    head = "| GPU run | sim cost model | " + " | ".join(label(m, s) for m, s in STATS) + " | iteration MAPE |"
    lines = [head, "|" + "---|" * (len(STATS) + 3)]
    for name, kind, errs, mape in rows:
        cells = " | ".join("-" if e is None else f"{e:+.1%}" for e in errs)
        lines.append(f"| {name} | {kind} | {cells} | {mape:.1%} |")
    summary = ["", "| sim cost model | mean abs. error, all cells | p50s + throughput | p99s | energy/token | "
               "iteration MAPE |", "|---|---|---|---|---|---|"]

    def summarize(label: str, mine: list) -> str:
        allv = [e for errs, _ in mine for e in errs]
        p50 = [e for errs, _ in mine for s, e in zip(STATS, errs) if s in P50S]
        p99 = [e for errs, _ in mine for s, e in zip(STATS, errs) if s in P99S]
        en = [errs[-1] for errs, _ in mine]
        return (f"| {label} | {mean_abs(allv):.1%} | {mean_abs(p50):.1%} | {mean_abs(p99):.1%} | "
                f"{mean_abs(en):.1%} | {mean_abs([m for _, m in mine]):.1%} |")

    for kind in ("roofline", "calibrated"):
        summary.append(summarize(kind, [(errs, mape) for _, k, errs, mape in rows if k == kind]))
    for mach, mine in rows_other.items():
        summary.append(summarize(f"calibrated, machine instance {mach} (its own calibration and runs)",
                                 [(errs, mape) for *_, errs, mape in mine]))
    noise_lines = []
    if noise:
        noise_lines = ["", "| workload | two calibrations in one device call, on the table's machine (the table's and "
                       "the next): sim vs sim, mean / max over the metrics | GPU runs of the same requests on the "
                       "table's machine: the table's vs the same call's repeat, mean / max; vs an earlier call's, mean "
                       "| calibrations on other machine instances (A; C): their sim vs the table's sim / vs the table's "
                       "GPU run, mean abs. | GPU runs on other machine instances (A; C) vs the table's GPU run, mean / "
                       "max |",
                       "|---|---|---|---|---|"]

        def mm(d: dict) -> str:
            v = [d.get(s) for s in STATS]
            return f"{mean_abs(v):.1%} / {max(abs(x) for x in v if x is not None):.1%}"

        def ma(d: dict) -> str:
            return f"{mean_abs([d.get(s) for s in STATS]):.1%}"

        for name, cal, gpu, other, other_gpu in noise:
            g = "-" if not gpu else mm(gpu[0]) + (f"; {ma(gpu[1])}" if len(gpu) > 1 else "")
            oth = "; ".join(f"{ma(a)} / {ma(b)}" for a, b in other.values()) or "-"
            ogpu = "; ".join(mm(d) for d in other_gpu.values()) or "-"
            noise_lines.append(f"| {name} | {mm(cal)} | {g} | {oth} | {ogpu} |")
    order = ("decode-graph", "decode-eager", "mixed-piecewise", "mixed", "prefill-piecewise", "prefill")
    seen = {k for _, by in own for k in by}
    kinds = [k for k in order if k in seen] + sorted(seen - set(order))
    own_lines = ["", "The calibrated model priced on each GPU run's own iterations (their recorded shapes; no "
                 "replay, so no queueing feedback): per kind, share of the run's busy time, median signed "
                 "error / mean absolute error / error of the kind's total time.", "",
                 "| GPU run | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for name, by in own:
        cells = [f"{by[k]['time_share']:.0%}: {by[k]['median_err']:+.1%} / {by[k]['mape']:.1%} / "
                 f"{by[k]['total_err']:+.1%}" if k in by else "-"
                 for k in kinds]
        own_lines.append(f"| {name} | " + " | ".join(cells) + " |")
    diag_lines = []
    if diag:
        allv = [e for _, _, errs, _ in diag for e in errs]
        p50 = [e for _, _, errs, _ in diag for s, e in zip(STATS, errs) if s in P50S]
        p99 = [e for _, _, errs, _ in diag for s, e in zip(STATS, errs) if s in P99S]
        diag_lines = ["", "Diagnostic, not a prediction: the calibrated model with its scheduler terms (the host time of a step "
                      "outside the GPU's work and the launches) scaled by the GPU run's "
                      "own host time per decode step over the calibration's (each process runs the host part at its "
                      "own speed; benchmarks/results/host_probe.md). What is left when the simulator knows the run's "
                      "host speed:", "",
                      "| GPU run | host time, run / calibration | " + " | ".join(label(m, s) for m, s in STATS)
                      + " | iteration MAPE |", "|" + "---|" * (len(STATS) + 3)]
        for name, ratio, errs, mape in diag:
            cells = " | ".join("-" if e is None else f"{e:+.1%}" for e in errs)
            diag_lines.append(f"| {name} | {ratio:.2f} | {cells} | {mape:.1%} |")
        diag_lines.append(f"| mean abs. | | all cells {mean_abs(allv):.1%}, p50s + throughput {mean_abs(p50):.1%}, "
                          f"p99s {mean_abs(p99):.1%}, iteration MAPE {mean_abs([m for *_, m in diag]):.1%} |"
                          + " |" * (len(STATS) - 1))
    mean_lines = []
    if vs_mean:
        mean_lines = ["", "The calibrated simulator against the table's GPU run and against the mean of that workload's GPU "
                      "runs on the table's machine (the same requests, run several times): how much of its error is the "
                      "GPU's run-to-run noise.", "",
                      "| GPU run | against | " + " | ".join(label(m, s) for m, s in STATS) + " | mean abs. |",
                      "|" + "---|" * (len(STATS) + 3)]
        for name, k, (one, mean) in vs_mean:
            for what, errs in (("the table's run", one), (f"the mean of {k} runs", mean)):
                cells = " | ".join("-" if e is None else f"{e:+.1%}" for e in errs)
                mean_lines.append(f"| {name} | {what} | {cells} | {mean_abs(errs):.1%} |")
    table = "\n".join(lines + summary + own_lines + noise_lines + mean_lines + diag_lines)
    print(table)
    page = RESULTS / "fidelity.md"  # the tracked page: its hand-written analysis is kept
    marker = "\n## Reading the table"
    old = page.read_text() if page.exists() else ""
    analysis = old[old.index(marker):] if marker in old else ""
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(
        "# Simulator fidelity against the GPU\n\n"
        "Commands: device calls on an H100, `python benchmarks/gpu_fidelity.py --out $OUT --budget-s 585 --steps S "
        "[--models M]` (steps: 1 calibrate, 2 the fidelity runs, 3 calibrate again, 4 the online-high runs again; "
        "the calls are listed under Reading the table), each installed with `--install`; then "
        "`python benchmarks/fidelity.py` (anywhere: the replays and these tables). Each cell is the simulator's "
        "relative error (sim - GPU) / GPU on the same requests "
"(`sim compare GPU_RUN SIM_RUN`). GPU runs: benchmarks/results/gpu_runs/ (experiments/fidelity.yaml: "
        "the Azure conversation trace at two loads and offline, Llama-3.2-1B (800 requests) and "
        "Llama-3.1-8B (300 requests), random weights, bf16, CUDA graphs, one H100). Calibrated = "
        "profiles/h100-<model>.yaml, fitted on the same machine instance to the designed grid "
        "(benchmarks/results/calibration/), never to these workloads. Energy: NVML's energy counter on "
        "the GPU; the profile's fitted power model in the simulator.\n\n" + table + "\n" + analysis)
    print(f"wrote {out_md}", file=sys.stderr)
    return out_md


if __name__ == "__main__":
    main()
