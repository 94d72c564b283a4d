"""`sim sweep SWEEP.yaml`: one experiment run over a grid or a random sample of its settings.

A sweep file names a base experiment (one of its variants), fixed overrides and the points
to run, each a set of ``--set``-style dotted keys::

    name: azure_rate_batch
    base: ../ifb_vs_static.yaml         # the experiment (relative to this file)
    variant: online-ifb-guaranteed      # which of its variants (default: its first)
    set:                                # applied to every point, as --set would
      workload.num_requests: 2000
    grid:                               # every combination, in this order
      workload.target_rate_req_s: [2, 4, 8, 16]
      scheduler.max_batch_size: [32, 256]
    # or
    random:                             # a seeded sample
      samples: 50
      seed: 0
      params:
        workload.target_rate_req_s: {uniform: [2, 40], round: 2}
        scheduler.max_batch_size: {choice: [32, 64, 256]}
        kv_cache.tokens_per_block: {choice: [16, 32]}
    load_key: workload.target_rate_req_s  # the x axis of the latency-vs-load plot
    knee: {ttft_factor: 3.0, throughput_ratio: 0.9}

Every point is validated as `sim run` validates a file (each problem named at its key) and
keyed by the hash of its resolved config (`sim/rundir.py` ``config_hash``): a finished
point's result is kept in ``OUT/points/<hash>.json`` and skipped when the sweep runs again,
so an interrupted sweep resumes where it stopped and a grid grown by a value runs only the
new points (a point written by another version of the simulator -- ``code_version``, as in a
run's config.yaml -- runs again). The points run in local processes (``--jobs N``) or as tasks on a Ray cluster
(``--ray ADDRESS``, ``--ray local``); a point is a pure function of its config, so both give
the same results, and the table holds no wall-clock time (``points/*.json`` do).

Outputs (``OUT``, default ``runs/sweeps/<name>/``): ``results.parquet`` (one row a point:
its parameters, GPU count, offered load and the summary metrics, plus the ``saturated``,
``knee`` and ``pareto`` flags below), ``latency_vs_load.png`` and ``pareto.png``.

**The saturation knee.** Points that differ only in the load key form a curve. Along it, a
point is *saturated* when its p99 TTFT exceeds ``ttft_factor`` x the p99 TTFT of the curve's
lowest load, or when its request throughput falls below ``throughput_ratio`` x its offered
rate (the requests arrive faster than they finish: the queue grows). The *knee* is the first
saturated point of the curve; the load before it is the curve's sustainable load. Request
throughput is finished requests over the run's duration, which includes draining the last
requests: give each point enough requests that the drain is short beside the arrival span
(2,000 requests at 4 req/s: 3.99 of 4.00 req/s), or the throughput test fires early.

**The Pareto front**: the points that no other point beats on both output tokens/s per GPU
(higher) and p99 TTFT (lower).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import PathStr, load_yaml, validation_problems
from .types import ConfigError

# the summary metrics of a results row (flat_row names), in table order
METRICS = (
    "num_requests", "num_finished", "num_rejected", "num_preemptions", "num_iterations", "duration_s",
    *(f"{k}_{s}" for k in ("ttft_s", "tpot_s", "itl_s", "e2e_s") for s in ("mean", "p50", "p90", "p99")),
    "queue_s_p99", "throughput_req_s", "throughput_out_tok_s", "goodput_req_s", "kv_util_mean",
    "prefix_hit_rate", "energy_per_token_j", "bounds_achieved_over_bound",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Distribution(_Strict):
    """One parameter of a random sample: exactly one of choice / uniform / loguniform / randint."""

    choice: list[Any] | None = Field(None, min_length=1, description="one of these values, equally likely")
    uniform: tuple[float, float] | None = Field(None, description="[low, high): uniform")
    loguniform: tuple[float, float] | None = Field(None, description="[low, high): uniform in log (low > 0)")
    randint: tuple[int, int] | None = Field(None, description="an integer in [low, high], inclusive")
    round: int | None = Field(None, ge=0, le=12, description="round a uniform / loguniform draw to this many digits")

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in ("choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of choice, uniform, loguniform, randint"
                             + (f" (got {', '.join(given)})" if given else ""))
        lo_hi = getattr(self, given[0]) if given[0] != "choice" else None
        if lo_hi is not None and not lo_hi[0] < lo_hi[1] and not (given[0] == "randint" and lo_hi[0] == lo_hi[1]):
            raise ValueError(f"{given[0]}: low ({lo_hi[0]}) must be below high ({lo_hi[1]})")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform: low must be positive, got {self.loguniform[0]}")
        if self.round is not None and self.uniform is None and self.loguniform is None:
            raise ValueError("round applies to uniform and loguniform")
        return self

    def draw(self, rng) -> Any:
        if self.choice is not None:
            return self.choice[int(rng.integers(len(self.choice)))]
        if self.randint is not None:
            return int(rng.integers(self.randint[0], self.randint[1] + 1))
        if self.uniform is not None:
            x = float(rng.uniform(*self.uniform))
        else:
            lo, hi = self.loguniform
            x = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        return round(x, self.round) if self.round is not None else x


class RandomSample(_Strict):
    samples: int = Field(gt=0, le=1_000_000, description="points to draw")
    seed: int = Field(0, ge=0, description="seeds the draw (same seed, same points)")
    params: dict[str, Distribution] = Field(min_length=1, description="dotted key -> distribution")


class Knee(_Strict):
    ttft_factor: float = Field(3.0, gt=1, description="saturated: p99 TTFT above this x the lowest load's")
    throughput_ratio: float = Field(0.9, gt=0, le=1, description="saturated: req/s below this x the offered rate")


class SweepFile(_Strict):
    name: str = Field(min_length=1, description="names the output folder (runs/sweeps/<name>)")
    description: str = ""
    base: PathStr = Field(description="the experiment file, relative to the sweep file")
    variant: str | None = Field(None, description="the base experiment's variant (default: its first)")
    set: dict[str, Any] = Field(default_factory=dict, description="dotted key -> value for every point")
    grid: dict[str, list[Any]] | None = Field(None, description="dotted key -> values: every combination")
    random: RandomSample | None = None
    load_key: str | None = Field(None, description="the parameter on the latency-vs-load plot's x axis "
                                 "(default: the first whose name ends in rate_req_s or rate_scale)")
    knee: Knee = Field(default_factory=Knee)

    @model_validator(mode="after")
    def _points(self):
        if (self.grid is None) == (self.random is None):
            raise ValueError("give exactly one of 'grid' and 'random'")
        if self.grid is not None:
            if not self.grid:
                raise ValueError("grid: give at least one key with a list of values")
            empty = [k for k, v in self.grid.items() if not v]
            if empty:
                raise ValueError(f"grid.{empty[0]}: an empty list of values")
        keys = self.param_keys
        if self.load_key is not None and self.load_key not in keys:
            raise ValueError(f"load_key {self.load_key!r} is not a swept key ({', '.join(keys)})")
        both = [k for k in keys if k in self.set]
        if both:
            raise ValueError(f"{both[0]} is both in 'set' and swept")
        return self

    @property
    def param_keys(self) -> list[str]:
        return list(self.grid) if self.grid is not None else list(self.random.params)


@dataclass
class Point:
    """One point: its parameters, the `--set` overrides it runs with, its resolved config."""

    index: int
    params: dict[str, Any]
    overrides: list[str]
    config: dict = field(repr=False)
    config_sha256: str = ""
    gpus: int = 1


@dataclass
class Sweep:
    path: Path
    spec: SweepFile
    base: Path
    experiment: str
    variant: str
    points: list[Point]

    @property
    def load_key(self) -> str | None:
        if self.spec.load_key:
            return self.spec.load_key
        return next((k for k in self.spec.param_keys if k.endswith(("rate_req_s", "rate_scale"))), None)


def set_pairs(values: dict[str, Any]) -> list[str]:
    """``{"a.b": 1}`` -> ``["a.b=1"]`` (values as JSON, which --set parses as YAML)."""
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def expand(spec: SweepFile) -> list[dict[str, Any]]:
    """The points' parameters, in order: the grid's product (first key slowest) or the sample."""
    if spec.grid is not None:
        keys = list(spec.grid)
        return [dict(zip(keys, combo)) for combo in itertools.product(*spec.grid.values())]
    import numpy as np

    rng = np.random.default_rng(spec.random.seed)
    return [{k: d.draw(rng) for k, d in spec.random.params.items()} for _ in range(spec.random.samples)]


def gpus_of(config: dict) -> int:
    """GPUs a run's config occupies: replicas x the product of its parallel sizes (every
    ``cluster.*_parallel`` key, so pipeline / expert parallel count when they exist)."""
    c = config.get("cluster", {})
    n = int(c.get("replicas", 1))
    for k, v in c.items():
        if k.endswith("_parallel") and k != "expert_parallel" and isinstance(v, int):
            n *= v
    return n



def read_study_file(path: Path, model: type[BaseModel], kind: str, keys: str):
    """A sweep or search file read and validated against ``model`` (its problems at their
    keys), its ``name`` checked as a folder name and its ``base`` experiment found next to
    it: ``(spec, base path)``."""
    from .config import _folder_name_problem

    where = str(path)
    raw = load_yaml(path, kind)
    if not isinstance(raw, dict):
        raise ConfigError(f"a {kind} must be a mapping with {keys}", where)
    try:
        spec = model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(validation_problems(e, raw, where)) from None
    bad = _folder_name_problem(spec.name)
    if bad:
        raise ConfigError(bad, f"{where}: name")
    base = (path.parent / spec.base) if not Path(spec.base).is_absolute() else Path(spec.base)
    if not base.is_file():
        raise ConfigError(f"no such experiment file {base}", f"{where}: base")
    return spec, base


def load_base(base: Path, overrides: list[str], where: str):
    """The base experiment with the file's settings; its problems named under ``base``."""
    from .config import load_experiment

    try:
        return load_experiment(base, overrides)
    except ConfigError as e:
        raise ConfigError([(f"{where}: base ({loc})", msg) for loc, msg in e.problems]) from None

def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Read and check a sweep file and every point's config. ConfigError with every problem
    (the point's parameters named: a value the experiment refuses is the sweep file's fault)."""
    from . import rundir
    from .config import load_experiment

    path = Path(path)
    where = str(path)
    spec, base = read_study_file(path, SweepFile, "sweep file", "name, base and grid or random")
    fixed = set_pairs(spec.set) + list(overrides or [])
    exp = load_base(base, fixed, where)
    names = [v.name for v in exp.variants]
    if spec.variant is not None and spec.variant not in names:
        raise ConfigError(f"no variant {spec.variant!r} in {base} (variants: {', '.join(names)})", f"{where}: variant")
    vname = spec.variant or names[0]
    points, problems = [], []
    for i, params in enumerate(expand(spec)):
        ov = fixed + set_pairs(params)
        try:
            e = load_experiment(base, ov)
        except ConfigError as err:
            label = ", ".join(f"{k}={v!r}" for k, v in params.items())
            problems.extend((f"{where}: point {i} ({label})", f"{loc}: {msg}") for loc, msg in err.problems)
            if len(problems) > 20:
                break
            continue
        v = next(x for x in e.variants if x.name == vname)
        cfg = v.config.model_dump(mode="json")
        points.append(Point(i, params, ov, cfg, rundir.config_hash(cfg), gpus_of(cfg)))
    if problems:
        raise ConfigError(problems)
    return Sweep(path, spec, base, exp.name, vname, points)


# ---------------------------------------------------------------------------------------
# running a point
# ---------------------------------------------------------------------------------------


def run_point(config: dict, base_dir: str, run_dir: str | None = None, experiment: str = "sweep",
              variant: str = "point") -> dict:
    """Simulate one resolved config; ``{"metrics", "gpus", "wall_s", "error"}``. A config the
    simulator refuses (a model that does not fit) is a result, not a crash: ``error`` holds
    the problems. ``run_dir``: also write the run's folder there (as `sim run` does)."""
    from .config import RunConfig
    from .metrics import flat_row
    from .runner import resolve, simulate

    t0 = time.perf_counter()
    try:
        cfg = RunConfig.model_validate(config)
        setup = resolve(cfg, Path(base_dir))
        result = simulate(setup)
    except ConfigError as e:
        return {"metrics": None, "gpus": gpus_of(config), "wall_s": time.perf_counter() - t0,
                "error": "; ".join(f"{loc}: {m}" if loc else m for loc, m in e.problems)}
    row = flat_row(result.summary)
    metrics = {k: row.get(k) for k in METRICS}
    arr = setup.workload["arrival_s"].to_numpy()
    span = float(arr.max() - arr.min()) if len(arr) > 1 else 0.0
    metrics["offered_rate_req_s"] = (len(arr) - 1) / span if span > 0 else None
    metrics["kv_pool_blocks"] = setup.num_blocks
    if run_dir is not None:
        from . import rundir
        from .runner import write_run

        final = Path(run_dir)
        tmp = rundir.partial_dir(final.parent, final.name)
        rundir.remove(tmp)
        write_run(result, tmp, experiment, variant)
        rundir.finish_dir(tmp, final)
    return {"metrics": metrics, "gpus": gpus_of(config), "wall_s": time.perf_counter() - t0, "error": None}


@dataclass
class Task:
    key: str  # the config hash
    config: dict
    base_dir: str
    run_dir: str | None = None
    experiment: str = "sweep"
    variant: str = "point"

    def args(self) -> tuple:
        return (self.config, self.base_dir, self.run_dir, self.experiment, self.variant)


def _run_task(args: tuple) -> dict:
    return run_point(*args)


def ray_init(address: str, jobs: int | None):
    """Connect to a Ray cluster (``local``: start one here with `jobs` CPUs)."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs the ray extra: pip install 'servesim[ray]' (or pip install ray)",
                          "command line: --ray") from None
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, private instance: no token files
    kw: dict = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
    try:
        if address == "local":
            ray.init(num_cpus=jobs or os.cpu_count(), **kw)
        else:
            ray.init(address=address, **kw)
    except Exception as e:  # ConnectionError, ValueError, RuntimeError: ray's own reasons
        raise ConfigError(f"cannot connect to Ray at {address!r}: {type(e).__name__}: {e}",
                          "command line: --ray") from None
    return ray


def run_tasks(tasks: list[Task], done: Callable[[Task, dict], None], *, jobs: int | None = None,
              ray_address: str | None = None, ray_module=None) -> None:
    """Run every task, calling ``done(task, result)`` in the calling process as each finishes
    (in finishing order). Local: `jobs` processes (1: in this process). Ray: one task each,
    on a cluster connected for this call (`ray_address`) or already (`ray_module`: the
    ``ray`` module after :func:`ray_init`)."""
    if not tasks:
        return
    if ray_module is not None or ray_address is not None:
        ray = ray_module or ray_init(ray_address, jobs)
        try:
            remote = ray.remote(num_cpus=1)(_run_task)
            pending = {remote.remote(t.args()): t for t in tasks}
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    done(pending.pop(ref), ray.get(ref))
        finally:
            if ray_module is None:
                ray.shutdown()
        return
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(tasks)))
    if jobs == 1:
        for t in tasks:
            done(t, _run_task(t.args()))
        return
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    # spawn: fresh interpreters (no fork of this process's threads, e.g. the progress bar's)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_run_task, t.args()): t for t in tasks}
        try:
            while futures:
                finished, _ = wait(futures, return_when=FIRST_COMPLETED)
                for f in finished:
                    done(futures.pop(f), f.result())
        except BaseException:
            for f in futures:
                f.cancel()
            raise


class Progress:
    """A live bar on a terminal (stderr), else a line every ``SERVESIM_PROGRESS_S`` seconds."""

    def __init__(self, title: str, total: int, skipped: int):
        from .cli import _console

        self.err = _console(stderr=True)
        self.title, self.total, self.skipped, self.done, self.failed = title, total, skipped, skipped, 0
        try:
            self.every = float(os.environ.get("SERVESIM_PROGRESS_S", "5"))
        except ValueError:
            self.every = 5.0
        self.prog = None
        self.t0 = self.last = time.monotonic()

    def __enter__(self):
        if self.err.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
                TimeRemainingColumn

            self.prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=self.err, transient=False)
            self.prog.start()
            self.task = self.prog.add_task(self.title, total=self.total, completed=self.done, detail=self._detail())
        else:
            self._line()
        return self

    def _detail(self) -> str:
        return (f"points ({self.skipped} already done" + (f", {self.failed} failed" if self.failed else "") + ")")

    def _line(self) -> None:
        print(f"{self.title}: {self.done}/{self.total} {self._detail()}, wall {time.monotonic() - self.t0:,.1f} s",
              file=sys.stderr, flush=True)
        self.last = time.monotonic()

    def advance(self, failed: bool) -> None:
        self.done += 1
        self.failed += int(failed)
        if self.prog is not None:
            self.prog.update(self.task, completed=self.done, detail=self._detail())
        elif time.monotonic() - self.last >= self.every or self.done == self.total:
            self._line()

    def __exit__(self, *exc) -> None:
        if self.prog is not None:
            self.prog.stop()


# ---------------------------------------------------------------------------------------
# the sweep
# ---------------------------------------------------------------------------------------


def point_file(out: Path, key: str) -> Path:
    return out / "points" / f"{key}.json"


def code_version() -> str:
    """The simulator's version (sim/runner.py's: package version + git describe), once per process."""
    global _CODE
    if _CODE is None:
        from .runner import code_version as cv

        _CODE = cv()
    return _CODE


_CODE: str | None = None


def read_point(out: Path, key: str) -> dict | None:
    """A finished point's stored result, or None: missing, unreadable, a failed point, or
    written by another version of the simulator (its numbers may differ: it runs again)."""
    try:
        doc = json.loads(point_file(out, key).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("metrics") is None or doc.get("code_version") != code_version():
        return None
    return doc


def write_point(out: Path, task: Task, params: dict, result: dict) -> None:
    from .rundir import write_atomic

    write_atomic(point_file(out, task.key), json.dumps(
        {"config_sha256": task.key, "code_version": code_version(), "params": params, **result,
         "config": task.config}, indent=1, default=str) + "\n")


def run_sweep(sweep: Sweep, out: Path, *, jobs: int | None = None, ray_address: str | None = None,
              keep_runs: bool = False, progress: bool = True, plots: bool = True) -> dict:
    """Run the sweep's unfinished points and write the results table and plots. Returns
    ``{"table": pa.Table, "ran": n, "skipped": n, "failed": n, "wall_s": s}``."""
    if keep_runs and ray_address not in (None, "local"):
        raise ConfigError("--keep-runs writes each point's run folder where the point runs: with a remote Ray "
                          "cluster those are on other machines (leave --keep-runs out)", "command line: --keep-runs")
    t0 = time.perf_counter()
    (out / "points").mkdir(parents=True, exist_ok=True)
    by_key: dict[str, list[Point]] = {}
    for p in sweep.points:
        by_key.setdefault(p.config_sha256, []).append(p)
    todo = []
    for key, ps in by_key.items():
        if read_point(out, key) is not None and (not keep_runs or (out / "runs" / key).is_dir()):
            continue
        todo.append(Task(key, ps[0].config, str(sweep.base.parent.resolve()),
                         str((out / "runs" / key).resolve()) if keep_runs else None, sweep.experiment, key))
    skipped = len(by_key) - len(todo)
    failed = 0
    with (Progress(f"sweep {sweep.spec.name}", len(by_key), skipped) if progress else _Null()) as bar:
        def done(task: Task, result: dict) -> None:
            nonlocal failed
            write_point(out, task, by_key[task.key][0].params, result)
            failed += result["error"] is not None
            bar.advance(result["error"] is not None)

        run_tasks(todo, done, jobs=jobs, ray_address=ray_address)
    table = results_table(sweep, out)
    write_results(sweep, table, out, plots)
    return {"table": table, "ran": len(todo), "skipped": skipped, "failed": failed,
            "wall_s": time.perf_counter() - t0}


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def advance(self, failed: bool) -> None:
        pass


def _column(values: list) -> "Any":
    import pyarrow as pa

    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
        return pa.array([None if v is None else json.dumps(v) for v in values], type=pa.string())


def results_table(sweep: Sweep, out: Path):
    """One row a point (in the sweep's order): parameters, identity, metrics, flags."""
    import pyarrow as pa

    rows = []
    for p in sweep.points:
        try:
            doc = json.loads(point_file(out, p.config_sha256).read_text())
        except (OSError, ValueError):
            doc = {"metrics": None, "error": "not run", "gpus": p.gpus}
        m = doc.get("metrics") or {}
        row = {"point": p.index, **{k: p.params[k] for k in sweep.spec.param_keys},
               "config_sha256": p.config_sha256, "status": "ok" if doc.get("metrics") else "error",
               "error": doc.get("error") or "", "gpus": p.gpus}
        row.update({k: m.get(k) for k in (*METRICS, "offered_rate_req_s", "kv_pool_blocks")})
        tok = m.get("throughput_out_tok_s")
        row["out_tok_s_per_gpu"] = tok / p.gpus if tok is not None else None
        rows.append(row)
    flags = knee_flags(rows, sweep.load_key, sweep.spec.param_keys, sweep.spec.knee)
    pareto = pareto_flags(rows)
    for r, (sat, knee), par in zip(rows, flags, pareto):
        r["saturated"], r["knee"], r["pareto"] = sat, knee, par
    cols = list(rows[0]) if rows else ["point"]
    meta = {b"servesim.sweep": json.dumps({"name": sweep.spec.name, "base": str(sweep.spec.base),
                                            "variant": sweep.variant, "params": sweep.spec.param_keys,
                                            "load_key": sweep.load_key,
                                            "knee": sweep.spec.knee.model_dump()}).encode()}
    return pa.table({c: _column([r.get(c) for r in rows]) for c in cols}).replace_schema_metadata(meta)


def knee_flags(rows: list[dict], load_key: str | None, keys: list[str], knee: Knee) -> list[tuple]:
    """(saturated, knee) per row (None, None where there is no load key or no result)."""
    flags: list[tuple] = [(None, None)] * len(rows)
    if load_key is None:
        return flags
    curves: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        if r["status"] != "ok":
            continue
        other = json.dumps({k: r[k] for k in keys if k != load_key}, sort_keys=True, default=str)
        curves.setdefault(other, []).append(i)
    for idx in curves.values():
        idx.sort(key=lambda i: (rows[i][load_key], rows[i]["point"]))
        ref = rows[idx[0]]["ttft_s_p99"]
        seen_knee = False
        for i in idx:
            r = rows[i]
            p99, tput, offered = r["ttft_s_p99"], r["throughput_req_s"], r["offered_rate_req_s"]
            sat = bool((ref is not None and p99 is not None and p99 > knee.ttft_factor * ref)
                       or (offered and tput is not None and tput < knee.throughput_ratio * offered))
            flags[i] = (sat, sat and not seen_knee)
            seen_knee = seen_knee or sat
    return flags


def pareto_flags(rows: list[dict], x: str = "out_tok_s_per_gpu", y: str = "ttft_s_p99") -> list[bool | None]:
    """True where no other row has x >= and y <= with one strictly better (x up, y down);
    None for rows without both values. O(n log n): by x descending, each point against the
    lowest y of the points with a larger x and of its own x."""
    pts = [(r[x], r[y]) if r["status"] == "ok" and r[x] is not None and r[y] is not None else None for r in rows]
    out: list[bool | None] = [None] * len(rows)
    order = sorted((i for i, p in enumerate(pts) if p is not None), key=lambda i: -pts[i][0])
    best_above = math.inf  # the lowest y among points with a strictly larger x
    k = 0
    while k < len(order):
        j = k
        while j < len(order) and pts[order[j]][0] == pts[order[k]][0]:
            j += 1
        group = order[k:j]
        low = min(pts[i][1] for i in group)
        for i in group:
            out[i] = not (best_above <= pts[i][1] or low < pts[i][1])
        best_above = min(best_above, low)
        k = j
    return out


def write_results(sweep: Sweep, table, out: Path, plots: bool = True) -> None:
    import pyarrow.parquet as pq

    tmp = out / ".results.partial.parquet"
    pq.write_table(table, tmp)
    os.replace(tmp, out / "results.parquet")
    if not plots:
        return
    from .plots_sweep import latency_vs_load, pareto_plot

    df = table.to_pandas()
    if sweep.load_key is not None:
        latency_vs_load(df, sweep.load_key, sweep.spec.param_keys, out / "latency_vs_load.png",
                        f"{sweep.spec.name}: latency vs load ({sweep.spec.knee.ttft_factor:g}x p99 TTFT or "
                        f"< {sweep.spec.knee.throughput_ratio:.0%} of offered req/s = saturated)")
    pareto_plot(df, out / "pareto.png", f"{sweep.spec.name}: throughput per GPU vs p99 TTFT")


SHOW = [("out_tok_s_per_gpu", "out tok/s/GPU", "{:,.0f}"), ("throughput_req_s", "req/s", "{:.2f}"),
        ("offered_rate_req_s", "offered", "{:.2f}"), ("ttft_s_p50", "TTFT p50 s", "{:.3f}"),
        ("ttft_s_p99", "TTFT p99 s", "{:.2f}"), ("tpot_s_p99", "TPOT p99 ms", "ms"),
        ("e2e_s_p99", "E2E p99 s", "{:.2f}"), ("kv_util_mean", "KV use", "{:.0%}"), ("gpus", "GPUs", "{}")]


def print_results(sweep: Sweep, table, console, out: Path, limit: int = 60) -> None:
    from rich.table import Table

    from .cli import _fmt

    df = table.to_pandas()
    t = Table(title=f"sweep {sweep.spec.name}: {len(df)} points -> {out}/results.parquet")
    keys = sweep.spec.param_keys
    for k in keys:
        t.add_column(k.split(".")[-1], justify="right")
    for _, h, _ in SHOW:
        t.add_column(h, justify="right")
    t.add_column("", justify="left")
    for _, r in df.head(limit).iterrows():
        if r["status"] != "ok":
            t.add_row(*[str(r[k]) for k in keys], *["-"] * len(SHOW), f"[red]error[/]: {r['error'][:60]}")
            continue
        mark = ("[yellow]knee[/] " if r.get("knee") is True else "") + ("pareto" if r.get("pareto") is True else "")
        vals = [None if (isinstance(r[c], float) and math.isnan(r[c])) else r[c] for c, _, _ in SHOW]
        t.add_row(*[str(r[k]) for k in keys], *[_fmt(v, f) for v, (_, _, f) in zip(vals, SHOW)], mark)
    console.print(t)
    if len(df) > limit:
        console.print(f"[dim]({len(df) - limit} more rows in {out}/results.parquet)[/]")


__all__ = ["SweepFile", "Sweep", "Point", "Task", "load_sweep", "expand", "run_point", "run_tasks", "run_sweep",
           "results_table", "knee_flags", "pareto_flags", "gpus_of", "set_pairs", "METRICS"]
