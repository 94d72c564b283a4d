"""`sim` command line: run, validate, compare, check-policy.

Bad input (ConfigError) prints one readable message per problem, naming the file and
key path, and exits with status 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import csv
import gc
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
    from .runner import resolve_experiment

    status = 0
    for f in args.files:
        try:
            exp = load_experiment(f, args.set)
            resolve_experiment(exp, f)  # the checks sim run makes, in its order
        except ConfigError as e:
            status = _fail(e)
            continue
        _console().print(f"[green]ok[/] {f}: {len(exp.variants)} variant(s): "
                         + ", ".join(v.name for v in exp.variants))
    return status


class RunProgress:
    """What a person sees while `sim run` works, on stderr: a live bar on a terminal, else a
    plain line every ``SERVESIM_PROGRESS_S`` seconds (default 5). Progress counts finished
    requests (an offline run, all arriving at 0, moves too), and the write phase shows the
    file being written."""

    def __init__(self, stdout_terminal: bool, backend: str):
        import os

        self.err = _console(stderr=True)
        self.live = self.err.is_terminal
        try:
            self.every = float(os.environ.get("SERVESIM_PROGRESS_S", "5"))
        except ValueError:
            self.every = 5.0
        self.stdout_terminal = stdout_terminal
        self.verb = "simulating" if backend == "sim" else "running on the GPU"
        self.prog = None
        self.task = None
        self.variant, self.label, self.total, self.finished, self.now = "", "", 0, 0, 0.0
        self.t0 = self.last = 0.0
        self.writing_shown = False

    def __enter__(self):
        if self.live:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.prog = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[detail]}"),
                                 TimeElapsedColumn(), console=self.err, transient=True,
                                 redirect_stdout=self.stdout_terminal, redirect_stderr=True)
            self.prog.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.prog is not None:
            self.prog.stop()

    def _line(self, text: str) -> None:
        import time

        print(f"sim run: {text}", file=sys.stderr, flush=True)
        self.last = time.monotonic()

    def _task(self, description: str, total, detail: str = "") -> None:
        if self.task is not None:
            self.prog.remove_task(self.task)
        self.task = self.prog.add_task(description, total=total, detail=detail)

    def _detail(self) -> str:
        return f"{self.finished:,}/{self.total:,} requests, simulated {self.now:,.1f} s"

    def start(self, variant: str, i: int, n: int, total: int) -> None:
        import time

        self.variant, self.label, self.total, self.finished, self.now = variant, f"{variant} ({i}/{n})", total, 0, 0.0
        self.t0 = time.monotonic()
        self.writing_shown = False
        if self.prog is not None:
            self._task(self.label, max(total, 1), self._detail())
        else:
            self._line(f"{self.label}: {self.verb} {total:,} requests")

    def update(self, now: float, finished: int) -> None:
        """The engine's progress callback: virtual (or wall) time, requests finished."""
        import time

        self.now, self.finished = now, finished
        if self.prog is not None:
            self.prog.update(self.task, completed=finished, detail=self._detail())
        elif time.monotonic() - self.last >= self.every:
            self._line(f"{self.label}: {self._detail()}, wall {time.monotonic() - self.t0:,.1f} s")

    def simulated(self, finished: int, duration_s: float) -> None:
        import time

        self.now, self.finished = duration_s, finished
        if self.prog is None:
            self._line(f"{self.label}: {self._detail()}, wall {time.monotonic() - self.t0:,.1f} s; done")

    def writing(self, what: str, where: Path) -> None:
        """A file of the write phase is next (`where`: the folder it goes to)."""
        import time

        head = f"{self.label}: " if self.label else ""
        if self.prog is not None:
            self._task(f"{head}writing {what}", None, f"-> {where}/")
        elif not self.writing_shown or time.monotonic() - self.last >= self.every:
            self._line(f"{head}writing {what} -> {where}/")  # at the phase's start, then every few s
        self.writing_shown = True

    def end_variant(self) -> None:
        if self.prog is not None and self.task is not None:
            self.prog.remove_task(self.task)
            self.task = None
        self.label, self.writing_shown = "", False


def _interrupted(state: dict, out: Path, exp, write_index) -> int:
    """Ctrl-C: say what was interrupted, remove the unfinished variant, exit 130."""
    import signal

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the clean-up
    try:
        return _report_interrupt(state, out, exp, write_index)
    finally:
        signal.signal(signal.SIGINT, before)


def _report_interrupt(state: dict, out: Path, exp, write_index) -> int:
    from . import rundir

    v = state.get("variant")
    names = [x.name for x in exp.variants]
    if v is not None:
        rundir.remove(rundir.partial_dir(out, v))
    try:
        write_index("interrupted", {"interrupted": {"variant": v, "phase": state.get("phase")}})
    except ConfigError:
        pass
    lines = []
    if v is not None:
        i = names.index(v) + 1
        what = state.get("phase", "simulating")
        prog = state.get("progress")
        counts = (f", {prog.finished:,}/{prog.total:,} requests finished" if prog is not None and what == "simulating"
                  else "")
        kept = (f"; {out / v} still holds an earlier run" if (out / v).is_dir() else "")
        lines.append(f"interrupted (Ctrl-C) while {what} variant {v!r} ({i}/{len(names)}{counts}): its unfinished "
                     f"output was removed{kept}")
    else:
        lines.append(f"interrupted (Ctrl-C) while {state.get('phase', 'starting')}")
    done = state.get("done", [])
    if done:
        lines.append(f"finished and written: {', '.join(done)} (in {out}/)")
    rest = [x for x in names if x not in done and x != v]
    if rest:
        lines.append(f"not run: {', '.join(rest)}")
    lines.append("comparison.csv and latency_cdf.png were not written")
    for ln in lines:
        print(ln, file=sys.stderr, flush=True)
    return 130


def cmd_run(args) -> int:
    import io
    import json
    import os

    from . import rundir
    from .config import load_experiment
    from .metrics import flat_row
    from .runner import resolve_experiment, simulate, write_run

    overrides = list(args.set or [])
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    made = None
    try:
        exp = load_experiment(args.experiment, overrides)
        # every variant's config identity, --only or not: it tells other folders apart
        hashes = {v.name: rundir.config_hash(v.config.model_dump(mode="json")) for v in exp.variants}
        names = [v.name for v in exp.variants]
        if args.only is not None:
            wanted = [w.strip() for w in args.only.split(",") if w.strip()]
            if not wanted:
                raise ConfigError(f"{args.only!r} names no variant: give one or more, comma-separated "
                                  f"(variants: {', '.join(names)})", "command line: --only")
            unknown = [w for w in wanted if w not in names]
            if unknown:
                raise ConfigError(f"no variant named {', '.join(unknown)} (variants: {', '.join(names)})",
                                  "command line: --only")
            exp.variants = [v for v in exp.variants if v.name in wanted]
        # the output folder, before any work: a file there, a read-only or pseudo filesystem
        out = Path(args.out) if args.out else Path("runs") / exp.name
        where = ("command line: --out" if args.out else
                 f"output folder {out} (the default, runs/<experiment name>; choose another with --out)")
        # the file's problems as sim validate reports them (same checks, same order), then the output's
        problems = []
        try:
            setups = resolve_experiment(exp, args.experiment)
        except ConfigError as e:
            problems.extend(e.problems)
        made = next((q for q in reversed((out, *out.parents)) if not q.exists()), None)  # what the check makes
        try:
            rundir.check_output_dir(out, where)
            for v in exp.variants:
                if (out / v.name).exists() and not (out / v.name).is_dir():
                    raise ConfigError(f"{out / v.name} is a file where variant {v.name!r}'s folder goes", where)
        except ConfigError as e:
            problems.extend(e.problems)
        if problems:
            raise ConfigError(problems)
        if args.backend == "gpu":
            from .pipeline import gpu_backend_problems

            gpu_probs = [(f"{args.experiment}: variants[{v.index}] ({v.name}): {k}", m)
                         for v, s in zip(exp.variants, setups) for k, m in gpu_backend_problems(s.cfg, s.model)]
            if gpu_probs:
                raise ConfigError(gpu_probs)
            try:
                from servesim.gpu_backend.runner import simulate_gpu  # lazily: needs torch
            except ImportError as e:
                raise ConfigError(f"--backend gpu needs the gpu extra (torch, triton): {e}",
                                  "command line") from None
    except ConfigError as e:
        if made is not None:  # folders the output check made, for a run that never started
            for q in (out, *out.parents):
                try:
                    q.rmdir()  # only if empty
                except OSError:
                    break
                if q == made:
                    break
        return _fail(e)
    running = {v.name for v in exp.variants}
    foreign = rundir.foreign_folders(out, hashes, args.backend, running)
    if foreign:
        _console(stderr=True).print(
            f"[yellow]warning[/]: {out} holds {len(foreign)} folder(s) this configuration did not write, left as "
            f"they are (comparison.csv lists this run's variants only): "
            + "; ".join(f"{name}: {why}" for name, why in foreign), soft_wrap=True)
    index = {k: e for k, e in rundir.read_index(out).items() if (out / k).is_dir()}

    def write_index(status: str, extra: dict | None = None) -> None:
        try:
            rundir.write_atomic(out / rundir.INDEX, json.dumps(
                {"name": exp.name, "description": exp.description, "source": str(args.experiment),
                 "variants": [v.name for v in exp.variants], "backend": args.backend, "status": status,
                 **(extra or {}), "runs": dict(sorted(index.items()))}, indent=2) + "\n")
        except OSError as e:
            raise ConfigError(f"cannot write {out / rundir.INDEX}: {e.strerror or e}", where) from None

    rows = []
    tables = {}
    con = _console()
    state: dict = {"variant": None, "phase": "starting", "done": []}
    try:
        write_index("running")
        with RunProgress(con.is_terminal, args.backend) as prog:
            state["progress"] = prog
            for i, (v, setup) in enumerate(zip(exp.variants, setups), 1):
                state.update(variant=v.name, phase="simulating")
                prog.start(v.name, i, len(exp.variants), len(setup.workload))
                # the variant goes to .<name>.partial, renamed to <name> once every file is in it
                # (a sim run streams its records there as it runs: sim/stream.py)
                run_dir = out / v.name
                tmp = rundir.partial_dir(out, v.name)
                rundir.remove(tmp)
                try:
                    if args.backend == "gpu":
                        result = simulate_gpu(setup, progress=prog.update)
                    else:
                        result = simulate(setup, progress=prog.update, out_dir=tmp)
                except ConfigError as e:
                    rundir.remove(tmp)
                    write_index("failed")
                    return _fail(e)
                except OSError as e:
                    rundir.remove(tmp)
                    write_index("failed")
                    raise ConfigError(f"cannot write {e.filename or run_dir}: {e.strerror or e} (variant {v.name!r} "
                                      "not written)", where) from None
                prog.simulated(result.summary["num_requests"], result.summary["duration_s"])  # finished or rejected
                state["phase"] = "writing"
                try:
                    write_run(result, tmp, exp.name, v.name, phase=lambda f: prog.writing(f, run_dir))
                    if setup.cfg.output.plots:
                        from .plots import timeline

                        prog.writing("timeline.png", run_dir)
                        timeline(result.requests, result.iterations, setup.num_blocks, tmp / "timeline.png",
                                 f"{exp.name} / {v.name} ({setup.model.name}, {setup.hardware.name})")
                    if setup.cfg.output.timeline:
                        from .timeline import write_chrome_trace

                        prog.writing("timeline.json", run_dir)
                        write_chrome_trace(result.iterations, tmp / "timeline.json")
                    rundir.finish_dir(tmp, run_dir)
                    result.run_dir = run_dir if result.run_dir is not None else None
                except OSError as e:
                    rundir.remove(tmp)
                    write_index("failed")
                    raise ConfigError(f"cannot write {e.filename or run_dir}: {e.strerror or e} (variant {v.name!r} "
                                      "not written)", where) from None
                index[v.name] = {"config_sha256": hashes[v.name], "backend": args.backend}
                state["done"].append(v.name)
                write_index("running")
                state.update(variant=None, phase="writing the experiment's files")
                prog.end_variant()
                tables[v.name] = result  # (its requests table, read for the plots)
                rows.append({"variant": v.name, **flat_row(result.summary)})
                con.print(f"[dim]{v.name}: {result.summary['num_finished']} requests, "
                          f"{result.summary['num_iterations']} iterations, wall {result.summary['wall_s']:.2f} s "
                          f"-> {run_dir}[/]")
                if result.summary.get("per_replica"):
                    from .cluster import print_per_replica

                    print_per_replica(result.summary["per_replica"], f"{v.name}: per replica", _console())
                lw = result.summary["long_waits"]
                if lw["count"]:
                    _console(stderr=True).print(
                        f"[yellow]warning[/]: {v.name}: {lw['count']} request(s) waited longer than "
                        f"{lw['factor']:g}x the median end-to-end latency ({lw['threshold_s']:.3g} s) before "
                        f"being scheduled, up to {lw['max_wait_s']:.3g} s: starvation? (summary.json long_waits)")
            try:
                if any(s.cfg.output.plots for s in setups):
                    from .plots import latency_cdfs

                    prog.writing("latency_cdf.png", out)
                    tmp_png = out / ".latency_cdf.partial.png"
                    latency_cdfs({k: r.requests for k, r in tables.items()}, tmp_png,
                                 f"{exp.name}: latency per variant")
                    os.replace(tmp_png, out / "latency_cdf.png")
                prog.writing("comparison.csv", out)
                keys: list[str] = []
                for r in rows:
                    keys.extend(k for k in r if k not in keys)
                buf = io.StringIO(newline="")
                w = csv.DictWriter(buf, fieldnames=keys)
                w.writeheader()
                w.writerows(rows)
                rundir.write_atomic(out / "comparison.csv", buf.getvalue())
                write_index("finished")
            except OSError as e:
                raise ConfigError(f"cannot write {e.filename or out}: {e.strerror or e}", where) from None
    except KeyboardInterrupt:
        return _interrupted(state, out, exp, write_index)
    print_comparison(rows, f"{exp.name} ({args.backend}) -> {out}/comparison.csv")
    return 0


def cmd_bounds(args) -> int:
    from .bounds import run_cli

    try:
        return run_cli(args, _console())
    except ConfigError as e:
        return _fail(e)


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


def cmd_sweep(args) -> int:
    from . import rundir
    from .sweep import load_sweep, print_results, run_sweep

    out = None
    try:
        if args.jobs is not None and args.jobs < 1:
            raise ConfigError(f"--jobs {args.jobs}: give 1 or more", "command line: --jobs")
        sweep = load_sweep(args.sweep, args.set)
        out = Path(args.out) if args.out else Path("runs") / "sweeps" / sweep.spec.name
        rundir.check_output_dir(out, "command line: --out" if args.out else f"output folder {out}")
        res = run_sweep(sweep, out, jobs=args.jobs, ray_address=args.ray, keep_runs=args.keep_runs)
    except ConfigError as e:
        return _fail(e)
    except OSError as e:
        return _fail(ConfigError(f"cannot write {e.filename or out}: {e.strerror or e}", "command line: --out"))
    except KeyboardInterrupt:
        if out is None:
            raise
        kept = len(list((out / "points").glob("*.json"))) if (out / "points").is_dir() else 0
        print(f"interrupted (Ctrl-C): {kept} finished point(s) kept in {out}/points/; the same command resumes "
              "(results.parquet was not written)", file=sys.stderr, flush=True)
        return 130
    print_results(sweep, res["table"], _console(), out)
    _console().print(f"[dim]{res['ran']} point(s) run, {res['skipped']} already done, {res['failed']} failed; "
                     f"wall {res['wall_s']:.1f} s; plots: {out}/latency_vs_load.png, {out}/pareto.png[/]")
    return 1 if res["failed"] else 0


def cmd_search(args) -> int:
    from . import rundir
    from .search import load_search, print_search, run_search

    try:
        if args.jobs is not None and args.jobs < 1:
            raise ConfigError(f"--jobs {args.jobs}: give 1 or more", "command line: --jobs")
        search = load_search(args.search, args.set)
        out = Path(args.out) if args.out else Path("runs") / "search" / search.spec.name
        rundir.check_output_dir(out, "command line: --out" if args.out else f"output folder {out}")
        res = run_search(search, out, jobs=args.jobs, ray_address=args.ray)
    except ConfigError as e:
        return _fail(e)
    except OSError as e:
        return _fail(ConfigError(f"cannot write {e.filename or out}: {e.strerror or e}", "command line: --out"))
    print_search(search, res, _console(), out)
    return 0 if res["choice"] is not None else 1


def cmd_timeline(args) -> int:
    from .timeline import timeline_cli

    try:
        return timeline_cli(args, _console())
    except ConfigError as e:
        return _fail(e)


def _check_text_file(path: Path, what: str) -> None:
    """ConfigError naming `path` if it is not UTF-8 text (a missing file is reported by its reader)."""
    try:
        path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"not a UTF-8 text file ({e.reason} at byte {e.start}): a {what} expected",
                          str(path)) from None
    except OSError:
        pass


def _fp8_capable_list(text: str | None, flag: str, choices, hw, fp8_needs: str) -> tuple[str, ...] | None:
    """A comma-separated option (``--gemm-precisions``, ``--kv-dtypes``) as a tuple, each
    entry one of ``choices`` and fp8 only where the hardware has it; None when not given."""
    if text is None:
        return None
    vals = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in vals if p not in choices]
    if bad:
        raise ConfigError(f"{flag} {text}: {', '.join(bad)} not measurable (choose from {', '.join(choices)})",
                          f"command line: {flag}")
    if "fp8" in vals and not hw.matmul_rate("fp8"):
        raise ConfigError(f"{flag} fp8: {hw.name} has no {fp8_needs}", f"command line: {flag}")
    return vals


def _check_cuda(what: str) -> None:
    """Measuring the calibration grid needs a CUDA GPU: without one it would run the grid on
    the CPU for minutes and fit nothing that describes a GPU. Refuse at once."""
    try:
        import torch
    except ImportError as e:
        raise ConfigError(f"{what} needs the gpu extra (torch, triton): {e}", "command line: --backend") from None
    if not torch.cuda.is_available():
        raise ConfigError(f"{what} measures this machine's GPU, and torch sees no CUDA device here "
                          f"(torch {torch.__version__}); run it on the GPU machine, or fit measurements made "
                          "there with --from-grid CSV", "command line: --backend")


def cmd_calibrate(args) -> int:
    from .calibrate import calibrate
    from .specs import load_hardware, load_model

    try:
        model = load_model(args.model, Path.cwd(), location="--model")
        hw = load_hardware(args.hardware, Path.cwd(), location="--hardware")
        if model.is_moe:  # the grid measures a dense Llama's GEMMs and steps (gpu_backend/)
            raise ConfigError(f"model {model.name} is a mixture of experts: calibration measures dense Llama-family "
                              "models only", "command line: --model")
        if args.processes < 1:
            raise ConfigError(f"--processes {args.processes}: give 1 or more", "command line")
        if args.backend == "grid" and not args.from_grid:
            raise ConfigError("give --from-grid CSV (measurements made earlier) or --backend gpu "
                              "(measure here)", "command line")
        if args.from_grid and args.backend == "grid":
            _check_text_file(Path(args.from_grid), "calibration grid (CSV)")
        if args.backend == "gpu":
            _check_cuda("sim calibrate --backend gpu")
        if args.tensor_parallel < 1:
            raise ConfigError(f"--tensor-parallel {args.tensor_parallel}: give 1 or more", "command line")
        from .calibrate import GEMM_PRECISIONS
        from .kv_attention import KV_DTYPES

        gemm_precisions = _fp8_capable_list(args.gemm_precisions, "--gemm-precisions", GEMM_PRECISIONS, hw,
                                            "fp8 tensor cores")
        kv_dtypes = _fp8_capable_list(args.kv_dtypes, "--kv-dtypes", KV_DTYPES, hw, "fp8 (e4m3) support")
        if args.backend == "gpu" and args.tensor_parallel > 1:
            import torch

            if torch.cuda.device_count() < args.tensor_parallel:
                raise ConfigError(f"--tensor-parallel {args.tensor_parallel} measures on that many GPUs, "
                                  f"{torch.cuda.device_count()} visible", "command line: --tensor-parallel")
        doc = calibrate(model, hw, Path(args.from_grid) if args.from_grid else None, Path(args.out),
                        backend=args.backend, model_ref=args.model, processes=args.processes,
                        tp=args.tensor_parallel, gemm_precisions=gemm_precisions, kv_dtypes=kv_dtypes,
                        kv_attention_table=Path(args.kv_attention) if args.kv_attention else None)
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
    con.print("fitted: " + ", ".join(f"{k}={v:.4g}" for k, v in doc["roofline"].items()
                                     if isinstance(v, (int, float))))  # the tables are printed below
    curves = {"bf16": doc["roofline"].get("gemm_times"), **(doc["roofline"].get("gemm_times_by_precision") or {})}
    for prec, gemm in curves.items():
        if gemm:
            con.print(f"{prec} GEMM curves measured (they price the {prec} linears): " + ", ".join(
                f"{k} [{c['k']}x{c['n']}] {len(c['tokens'])} row counts, {c['seconds'][-1] * 1e6:.0f} us at "
                f"{c['tokens'][-1]} rows" for k, c in gemm.items()))
    ka = fit.get("kv_attention")
    if ka:
        batches = doc["roofline"]["decode_attention_kernel"]["batches"]
        con.print(f"decode attention kernel alone per KV dtype (batches {batches}): at batch {ka['batch']} "
                  + ", ".join(
                      f"{dt} {v:.3f}" for dt, v in ka["kernel_ns_per_token"].items())
                  + f" ns / token / layer; the grid's fitted {ka['grid_ns_per_token']:.3f} = its KV dtype's kernel + "
                  f"{ka['remainder_ns_per_token']:.3f} that every KV dtype pays")
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


def cmd_check_policy(args) -> int:
    from .check_policy import INVARIANTS, check_policy, reproduce

    con = _console()
    if args.reproduce:
        try:
            results = reproduce(Path(args.reproduce), args.max_overtakes)
        except ConfigError as e:
            return _fail(e)
        bad = [(n, v) for n, v in results if v is not None]
        for n, v in results:
            con.print(f"{n}: " + (f"[bold red]{v.invariant}[/]: {v.message}" if v else "[green]every invariant "
                                  "holds[/]"), soft_wrap=True)
        return 1 if bad else 0
    if not args.policy:
        return _fail(ConfigError("give POLICY (a built-in name or module:Class) or --reproduce FILE", "command line"))
    try:
        import yaml

        pargs = yaml.safe_load(args.args) if args.args else None
        if pargs is not None and not isinstance(pargs, dict):
            raise ConfigError(f"--args expects a mapping, e.g. '{{max_overtakes: 8}}', got {args.args!r}",
                              "command line: --args")
        if args.examples < 1:
            raise ConfigError(f"--examples {args.examples}: give 1 or more", "command line: --examples")
        out = Path(args.out)
        rep = check_policy(args.policy, args.family, pargs, base_dir=Path.cwd(), examples=args.examples,
                           seed=args.seed, max_overtakes=args.max_overtakes, out=out)
    except ConfigError as e:
        return _fail(e)
    if rep.violation is None:
        con.print(f"[green]ok[/] {rep.policy} ({rep.family}): {rep.examples} random examples, every invariant held: "
                  + ", ".join(INVARIANTS) + f" (most overtakes of one request: {rep.max_overtakes_seen}, "
                  f"bound {args.max_overtakes})", soft_wrap=True)
        return 0
    v = rep.violation
    con.print(f"[bold red]violation[/] {rep.policy} ({rep.family}): [bold]{v.invariant}[/] after {rep.examples} "
              f"examples (shrinking included)", soft_wrap=True)
    con.print(f"  {v.message}", soft_wrap=True)
    con.print(f"shrunk reproducer: {rep.reproducer} (+ {rep.reproducer.with_suffix('.csv').name}): "
              f"{len(rep.rows['rows'])} requests", soft_wrap=True)
    con.print(rep.reproducer.read_text(), soft_wrap=True, markup=False)
    return 1


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
    k.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="--backend gpu: measure on N GPUs (cluster.tensor_parallel: the grid, the GEMMs at one GPU's "
                        "shard, and an all-reduce sweep fitting allreduce_latency_s / "
                        "allreduce_bandwidth_efficiency); with --from-grid: the TP the grid ran at")
    k.add_argument("--gemm-precisions", metavar="LIST",
                   help="--backend gpu: GEMM sweeps of quantised weights besides bf16's, e.g. fp8 "
                        "(torch._scaled_mm; fitted into gemm_times_by_precision); default fp8 when the model's "
                        "weights are fp8, else none; '' for none")
    k.add_argument("--kv-dtypes", metavar="LIST",
                   help="--backend gpu: time the decode attention kernel alone per KV-cache dtype, e.g. "
                        "bf16,fp8 (fitted into decode_attention_kernel); default bf16,fp8 when the model's KV "
                        "cache is fp8, else none; '' for none")
    k.add_argument("--kv-attention", metavar="CSV",
                   help="--from-grid: the decode attention kernel alone per KV dtype measured apart on the same GPU "
                        "(sim/kv_attention.py's table, e.g. benchmarks/results/calibration_h200/"
                        "decode_attention_kv.csv; default: GRID's .kv-attention.csv beside it, if any), fitted "
                        "into decode_attention_kernel: a KV dtype other than the grid's pays the kernel-alone "
                        "difference")
    k.add_argument("--out", required=True, help="profile to write, e.g. profiles/h100-llama-3.1-8b.yaml")
    k.add_argument("--provenance", action="append", metavar="KEY=VALUE",
                   help="facts about the measurements to record (gpu, driver, torch, ...)")
    k.set_defaults(fn=cmd_calibrate)
    c = sub.add_parser("compare", help="compare two runs of the same requests")
    c.add_argument("run_a")
    c.add_argument("run_b")
    c.add_argument("--out", help="where to write compare.json (default: RUN_B)")
    c.set_defaults(fn=cmd_compare)
    b = sub.add_parser("bounds", help="what the hardware allows: memory fit, decode and prefill rooflines, "
                       "end-to-end tokens/s; --claim-tok-s checks a claimed figure")
    cp = sub.add_parser("check-policy", help="check a policy against the engine's invariants on random workloads; "
                        "the first violation, shrunk, is written as an experiment file")
    cp.add_argument("policy", nargs="?", help="a built-in name or module:Class (module looked for in the current "
                    "folder, then installed), or file.py:Class")
    cp.add_argument("--family", choices=["capacity", "order", "chunking", "preemption", "eviction", "router", "draft"],
                    help="the family it is for (default: the one whose Protocol it satisfies)")
    cp.add_argument("--args", metavar="YAML", help="constructor keyword arguments, e.g. '{max_overtakes: 8}'")
    cp.add_argument("--examples", type=int, default=100, help="random examples to try (default 100)")
    cp.add_argument("--seed", type=int, default=0, help="seed of the search (default 0: the same examples each time)")
    cp.add_argument("--max-overtakes", type=int, default=16,
                    help="starvation bound: times a request may be overtaken by later arrivals (default 16)")
    cp.add_argument("--out", default="check-policy-failure.yaml", help="where to write the shrunk reproducer "
                    "(default ./check-policy-failure.yaml, its workload beside it as .csv)")
    cp.add_argument("--reproduce", metavar="FILE", help="check an experiment file (a reproducer) again instead")
    cp.set_defaults(fn=cmd_check_policy)
    from .bounds import add_arguments

    add_arguments(b)
    b.set_defaults(fn=cmd_bounds)
    sw = sub.add_parser("sweep", help="run an experiment over a grid or random sample of settings "
                        "(resumable; local processes or Ray)")
    sw.add_argument("sweep", help="sweep YAML file")
    sw.add_argument("--out", help="output directory (default runs/sweeps/<sweep name>)")
    sw.add_argument("--jobs", type=int, help="local processes (default: the CPU count)")
    sw.add_argument("--ray", metavar="ADDRESS", help="run the points on a Ray cluster (ADDRESS, or 'local' to "
                    "start one here; needs the ray extra)")
    sw.add_argument("--keep-runs", action="store_true", help="also write each point's run folder (OUT/runs/<hash>)")
    sw.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", default=[],
                    help="override a setting of every point (repeatable)")
    sw.set_defaults(fn=cmd_sweep)
    se = sub.add_parser("search", help="the cheapest hardware x GPUs x layout x batching x precision that meets "
                        "TTFT/TPOT SLOs at a request rate")
    se.add_argument("search", help="search YAML file")
    se.add_argument("--out", help="output directory (default runs/search/<search name>)")
    se.add_argument("--jobs", type=int, help="local processes (default: the CPU count)")
    se.add_argument("--ray", metavar="ADDRESS", help="simulate on a Ray cluster (ADDRESS or 'local')")
    se.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", default=[],
                    help="override a setting of every candidate (repeatable)")
    se.set_defaults(fn=cmd_search)
    tl = sub.add_parser("timeline", help="write a finished run's Chrome trace (Perfetto JSON): iterations and "
                        "requests (queued, prefill, decode)")
    from .timeline import add_arguments as timeline_arguments

    timeline_arguments(tl)
    tl.set_defaults(fn=cmd_timeline)
    return p


def main(argv: list[str] | None = None) -> int:
    # `sim run`: Python's cyclic garbage collector off for the whole command, as simulate()
    # has it off for a run (sim/driver.py collector_paused): what the collector would pass
    # over before the run starts (the imports, the configuration's models, the workload) is
    # live to its end; its passes were ~0.07 s of the Azure trace's ~2 s run (one full pass
    # 0.05 s). Other commands (a sweep runs many points in one process) have it back on
    # once parsed. As it was when the command returns.
    was = gc.isenabled()
    gc.disable()
    _single_threaded_blas(argv)
    try:
        return _main(argv, was)
    finally:
        if was:
            gc.enable()


def _single_threaded_blas(argv: list[str] | None) -> None:
    """`sim run` before NumPy is imported: its OpenBLAS without worker threads, unless
    OPENBLAS_NUM_THREADS is set. A run does no linear algebra worth threads (a few
    least-squares fits of a handful of points), and OpenBLAS's workers busy-wait on the
    other cores for ~0.1 s after they start (perf: 0.1 s of the Azure trace's ~1.5 s of
    CPU), cores the run's writer thread (sim/stream.py) and a shared machine's other
    work need. (Set once NumPy is imported, it would change nothing: left alone then.)"""
    import os

    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["run"] and "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


# the command `main` last parsed and its backend (what `exit_now` is for: a simulated run)
_last_command: tuple[str, str | None] = ("", None)


def _main(argv: list[str] | None, gc_was_on: bool) -> int:
    global _last_command
    args = build_parser().parse_args(argv)
    _last_command = (args.cmd, getattr(args, "backend", None))
    if args.cmd != "run" and gc_was_on:
        gc.enable()
    try:
        return args.fn(args)
    except ConfigError as e:
        return _fail(e)
    except KeyboardInterrupt:
        print(f"interrupted (Ctrl-C): sim {args.cmd} stopped", file=sys.stderr, flush=True)
        return 130


def exit_now(rc: int) -> None:
    """End the process with status `rc` once stdout and stderr are flushed, without the
    interpreter's teardown: `sim run`'s files are complete and closed when `main` returns
    (written, renamed into place: sim/rundir.py; no thread of ours is left), and freeing
    every module and object one by one took ~0.1 s of the Azure trace's run
    (benchmarks/sim_speed.py). Only for a simulated `sim run` from the command line
    (`python -m servesim.sim.cli run ...`; the GPU backend's and other commands' teardown
    left to Python): `main` itself returns as any function does."""
    import os

    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):  # (a closed or broken pipe: nothing more to say there)
            pass
    os._exit(rc)


if __name__ == "__main__":
    _rc = main()
    if _last_command == ("run", "sim"):
        exit_now(_rc)
    sys.exit(_rc)
