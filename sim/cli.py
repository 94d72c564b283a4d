"""`sim` command line: run, validate, compare.

Bad input (ConfigError) prints one readable message per problem, naming the file and
key path, and exits with status 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from .types import ConfigError


def _console(stderr: bool = False):
    import shutil

    from rich.console import Console

    # Tables are wide: when the output is a pipe or a file, do not wrap them at 80 columns.
    width = max(shutil.get_terminal_size((200, 40)).columns, 160)
    return Console(stderr=stderr, highlight=False, width=width)


def _fail(err: ConfigError) -> int:
    con = _console(stderr=True)
    n = len(err.problems)
    con.print(f"[bold red]error:[/] {n} problem{'s' if n > 1 else ''} found")
    for loc, msg in err.problems:
        con.print(f"  [bold]{loc}[/]: {msg}" if loc else f"  {msg}", soft_wrap=True)
    return 2


COLUMNS = [
    ("variant", "variant", None),
    ("throughput_req_s", "req/s", "{:.2f}"),
    ("throughput_out_tok_s", "out tok/s", "{:,.0f}"),
    ("ttft_s_p50", "TTFT p50 s", "{:.3f}"),
    ("ttft_s_p99", "TTFT p99 s", "{:.2f}"),
    ("tpot_s_p50", "TPOT p50 ms", "ms"),
    ("tpot_s_p99", "TPOT p99 ms", "ms"),
    ("itl_s_p99", "ITL p99 ms", "ms"),
    ("e2e_s_p50", "E2E p50 s", "{:.2f}"),
    ("goodput_req_s", "goodput req/s", "{:.2f}"),
    ("kv_util_mean", "KV use", "{:.0%}"),
    ("num_rejected", "rejected", "{}"),
    ("num_preemptions", "preempt", "{}"),
    ("wall_s", "wall s", "{:.2f}"),
]


def _fmt(v, f):
    if v is None or v == "":
        return "-"
    if f is None:
        return str(v)
    if f == "ms":
        return f"{float(v) * 1e3:.1f}"
    return f.format(v)


def print_comparison(rows: list[dict], title: str) -> None:
    from rich.table import Table

    t = Table(title=title, show_lines=False)
    for key, head, _ in COLUMNS:
        t.add_column(head, justify="left" if key == "variant" else "right")
    for r in rows:
        t.add_row(*[_fmt(r.get(k), f) for k, _, f in COLUMNS])
    _console().print(t)


def cmd_validate(args) -> int:
    from .config import load_experiment

    status = 0
    for f in args.files:
        try:
            exp = load_experiment(f, args.set)
            problems = []
            for i, v in enumerate(exp.variants):
                try:
                    setup_check(v.config, exp.base_dir, f"{f}: variants[{i}] ({v.name}): ")
                except ConfigError as e:
                    problems.extend(e.problems)
            if problems:
                raise ConfigError(problems)
        except ConfigError as e:
            status = _fail(e)
            continue
        _console().print(f"[green]ok[/] {f}: {len(exp.variants)} variant(s): "
                         + ", ".join(v.name for v in exp.variants))
    return status


def setup_check(cfg, base_dir: Path, where: str) -> None:
    """The checks that need the model, hardware and trace files (no simulation)."""
    from .runner import resolve

    resolve(cfg, base_dir, where)


def cmd_run(args) -> int:
    import json

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .config import load_experiment
    from .metrics import flat_row
    from .runner import resolve, simulate, write_run

    overrides = list(args.set or [])
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    try:
        exp = load_experiment(args.experiment, overrides)
        if args.only:
            wanted = [w for w in args.only.split(",") if w]
            names = [v.name for v in exp.variants]
            unknown = [w for w in wanted if w not in names]
            if unknown:
                raise ConfigError(f"no variant named {', '.join(unknown)} (variants: {', '.join(names)})",
                                  "command line: --only")
            exp.variants = [v for v in exp.variants if v.name in wanted]
        setups = []
        for i, v in enumerate(exp.variants):
            setups.append(resolve(v.config, exp.base_dir, f"{args.experiment}: variants[{i}] ({v.name}): "))
    except ConfigError as e:
        return _fail(e)
    out = Path(args.out) if args.out else Path("runs") / exp.name
    out.mkdir(parents=True, exist_ok=True)
    if args.backend == "gpu":
        try:
            from servesim.gpu_backend.runner import simulate_gpu  # lazily: needs torch
        except ImportError as e:
            return _fail(ConfigError(f"--backend gpu needs the gpu extra (torch, triton): {e}",
                                     "command line"))
    rows = []
    tables = {}
    con = _console()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), console=con, transient=True,
                  disable=not con.is_terminal) as prog:
        for v, setup in zip(exp.variants, setups):
            horizon = float(setup.workload["arrival_s"].max()) if len(setup.workload) else 0.0
            task = prog.add_task(f"{v.name} ({len(setup.workload)} requests)", total=max(horizon, 1e-9))
            cb = lambda t, task=task: prog.update(task, completed=min(t, horizon))  # noqa: E731
            try:
                if args.backend == "gpu":
                    result = simulate_gpu(setup, progress=cb)
                else:
                    result = simulate(setup, progress=cb)
            except ConfigError as e:
                return _fail(e)
            prog.update(task, completed=horizon)
            run_dir = out / v.name
            write_run(result, run_dir, exp.name, v.name)
            if setup.cfg.output.plots:
                from .plots import timeline

                timeline(result.requests, result.iterations, setup.num_blocks, run_dir / "timeline.png",
                         f"{exp.name} / {v.name} ({setup.model.name}, {setup.hardware.name})")
            if setup.cfg.output.timeline:
                from .timeline import write_chrome_trace

                write_chrome_trace(result.iterations, run_dir / "timeline.json")
            tables[v.name] = result.requests
            rows.append({"variant": v.name, **flat_row(result.summary)})
            prog.remove_task(task)
            con.print(f"[dim]{v.name}: {result.summary['num_finished']} requests, "
                      f"{result.summary['num_iterations']} iterations, wall {result.summary['wall_s']:.2f} s "
                      f"-> {run_dir}[/]")
    if any(s.cfg.output.plots for s in setups):
        from .plots import latency_cdfs

        latency_cdfs(tables, out / "latency_cdf.png", f"{exp.name}: latency per variant")
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    with open(out / "comparison.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    print_comparison(rows, f"{exp.name} ({args.backend}) -> {out}/comparison.csv")
    (out / "experiment.json").write_text(json.dumps(
        {"name": exp.name, "description": exp.description, "source": str(args.experiment),
         "variants": [v.name for v in exp.variants], "backend": args.backend}, indent=2) + "\n")
    return 0


def cmd_compare(args) -> int:
    try:
        from .compare import compare_runs
    except ImportError:
        return _fail(ConfigError("sim compare is not available in this build", "command line"))
    try:
        compare_runs(Path(args.run_a), Path(args.run_b), Path(args.out) if args.out else None)
    except ConfigError as e:
        return _fail(e)
    return 0


def cmd_calibrate(args) -> int:
    from .calibrate import calibrate
    from .specs import load_hardware, load_model

    try:
        model = load_model(args.model, Path.cwd(), location="--model")
        hw = load_hardware(args.hardware, Path.cwd(), location="--hardware")
        if args.processes < 1:
            raise ConfigError(f"--processes {args.processes}: give 1 or more", "command line")
        if args.backend == "grid" and not args.from_grid:
            raise ConfigError("give --from-grid CSV (measurements made earlier) or --backend gpu "
                              "(measure here)", "command line")
        doc = calibrate(model, hw, Path(args.from_grid) if args.from_grid else None, Path(args.out),
                        backend=args.backend, model_ref=args.model, processes=args.processes)
        for kv in args.provenance or []:
            k, _, v = kv.partition("=")
            doc["provenance"][k] = v
        if args.provenance:
            import yaml

            Path(args.out).write_text(yaml.safe_dump(doc, sort_keys=False))
    except ConfigError as e:
        return _fail(e)
    fit = doc["fit"]
    con = _console()
    con.print(f"[green]wrote[/] {args.out}: {model.name} on {hw.name}, {fit['points']} measurements")
    con.print("fitted: " + ", ".join(f"{k}={v:.4g}" for k, v in doc["roofline"].items() if k != "gemm_times"))
    gemm = doc["roofline"].get("gemm_times")
    if gemm:
        con.print("GEMM curves measured (they price the linears): " + ", ".join(
            f"{k} [{c['k']}x{c['n']}] {len(c['tokens'])} row counts, {c['seconds'][-1] * 1e6:.0f} us at "
            f"{c['tokens'][-1]} rows" for k, c in gemm.items()))
    con.print(f"fit error: MAPE {fit['mape']:.1%} (max {fit['max_abs_rel_err']:.1%}); the uncalibrated "
              f"roofline's MAPE on the same grid: {fit['roofline_mape']:.1%}")
    con.print("by kind: " + ", ".join(f"{k} {v:.1%}" for k, v in fit["by_kind"].items()))
    if fit.get("process_host_speeds"):
        con.print("host speed of each grid process (the host terms are a typical process's): " + ", ".join(
            f"{v:.2f}" for v in fit["process_host_speeds"]))
    pw = doc.get("power")
    if pw:
        con.print(f"power: idle {pw['idle_w']:.0f} W, busy +{pw['busy_w']:.0f} W, reading weights at full bandwidth "
                  f"+{pw['memory_w']:.0f} W, the KV cache +{pw.get('kv_w', pw['memory_w']):.0f} W, at the full "
                  f"matmul rate +{pw['compute_w']:.0f} W; energy of the "
                  f"{pw['fit']['runs']} grid runs within "
                  f"{pw['fit']['mape']:.1%} (MAPE)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sim", description="servesim: LLM-serving simulator with a real-GPU mode")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run every variant of an experiment")
    r.add_argument("experiment", help="experiment YAML file")
    r.add_argument("--backend", choices=["sim", "gpu"], default="sim")
    r.add_argument("--out", help="output directory (default runs/<experiment name>)")
    r.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", default=[],
                   help="override a setting in every variant (repeatable)")
    r.add_argument("--seed", type=int, help="shorthand for --set seed=N")
    r.add_argument("--only", metavar="NAME[,NAME]", help="run only these variants")
    r.set_defaults(fn=cmd_run)
    v = sub.add_parser("validate", help="check experiment files without running them")
    v.add_argument("files", nargs="+")
    v.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", default=[])
    v.set_defaults(fn=cmd_validate)
    k = sub.add_parser("calibrate", help="fit the cost model to GPU measurements (writes a profile)")
    k.add_argument("--model", required=True, help="bundled model name or config.json path")
    k.add_argument("--hardware", default="h100-sxm")
    k.add_argument("--backend", choices=["grid", "gpu"], default="grid",
                   help="grid: fit --from-grid measurements; gpu: measure the grid on this machine's GPU")
    k.add_argument("--from-grid", help="calibration CSV (benchmarks/gpu_bench.py writes one)")
    k.add_argument("--processes", type=int, default=3,
                   help="--backend gpu: spread the grid's runs over this many fresh processes, one after the other "
                        "(the host part of a step runs at a speed that differs from process to process; "
                        "several average it out); default 3")
    k.add_argument("--out", required=True, help="profile to write, e.g. profiles/h100-llama-3.1-8b.yaml")
    k.add_argument("--provenance", action="append", metavar="KEY=VALUE",
                   help="facts about the measurements to record (gpu, driver, torch, ...)")
    k.set_defaults(fn=cmd_calibrate)
    c = sub.add_parser("compare", help="compare two runs of the same requests")
    c.add_argument("run_a")
    c.add_argument("run_b")
    c.add_argument("--out", help="where to write compare.json (default: RUN_B)")
    c.set_defaults(fn=cmd_compare)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        return _fail(e)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
