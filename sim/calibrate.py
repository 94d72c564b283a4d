"""Calibrated cost model: the roofline's terms with efficiencies and overheads fitted to
GPU measurements.

A profile is the roofline model (sim/cost_model.py) with its free parameters -- matmul and
bandwidth efficiency, attention efficiency, the per-layer kernel floor, eager-launch,
piecewise-graph and CUDA-graph host overheads -- fitted to a grid of measured iterations
by robust least squares (pseudo-Huber in the log error, so a few iterations slowed by a
host hiccup do not pull the fit; scipy's bounded trust-region solver): prefill chunks
(tokens x cached tokens) and decode batches (batch x KV length), graphs on and off. Because
the terms stay those of the roofline, the fitted model extrapolates beyond the grid the way
the hardware does (compute-bound prefill, bandwidth-bound decode), instead of
interpolating a table.

    sim calibrate --model llama-3.1-8b --from-grid benchmarks/results/calibration_h100.csv \\
                  --out profiles/h100-llama-3.1-8b.yaml        # fit measurements made earlier
    sim calibrate --backend gpu --model llama-3.1-8b --out ...  # measure the grid here, then fit

An experiment uses it with `cost_model: {kind: calibrated, profile: profiles/...yaml}`.

A profile (schema servesim-profile/3) is a small YAML -- the fitted parameters, the fit's
statistics, the provenance and the power model -- and, beside it, the time fit's residuals
(one row a grid measurement: kind, measured_s, predicted_s) in ``<name>.residuals.parquet``
(`residuals_path`, `load_residuals`); loading a profile reads the YAML only.
servesim-profile/2 files (the residuals inline) are converted with
``python -m servesim.sim.calibrate convert PROFILE.yaml``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
import re
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from . import kv_attention
from .cost_model import RooflineConfig, RooflineCostModel
from .errors import load_yaml, validation_problems
from .power import POWER_KEYS
from .specs import HardwareSpec, ModelSpec
from .types import ConfigError, IterationShape
from .yamlio import dump_readable, safe_load

# 2: work-based power model, host_overhead_context_s; 3: the time fit's residuals (one row a
# grid measurement) in a Parquet file beside the profile (residuals_path), not in the YAML
PROFILE_SCHEMA = "servesim-profile/3"
INLINE_RESIDUALS_SCHEMA = "servesim-profile/2"  # the same profile with its residuals inline: convert_profile
RESIDUAL_COLUMNS = ("kind", "measured_s", "predicted_s")
# fitted parameters: (name, lower, upper, prior); searched in log space
PARAMS = (
    ("flops_efficiency", 0.2, 1.3, 0.8),
    ("bandwidth_efficiency", 0.2, 1.1, 0.9),  # <= 1.1: a read stream beats a copy by ~10%, no more
    ("kv_bandwidth_efficiency", 0.2, 1.1, 0.8),
    ("attention_flops_efficiency", 0.05, 1.5, 0.5),
    # a chunk over a long cached prefix: its last program's walk (the cached-context points)
    ("prefill_attention_program_speed", 0.05, 1.5, 0.5),
    ("host_overhead_eager_s", 1e-5, 0.1, 1e-2),
    ("host_overhead_context_s", 1e-5, 0.1, 2e-3),
    # beside decodes: the decode attention's split and reduce kernels in every layer, which a
    # prompt-only eager pass does not launch (as host_overhead_piecewise_decode_s)
    ("host_overhead_eager_decode_s", 1e-5, 0.1, 2e-3),
    ("host_overhead_graph_s", 1e-6, 5e-3, 1e-4),
    # gpu_bench section 9 measured 0.76-0.99 (median 0.96) on forward passes with one chunk
    ("context_launch_overlap", 1e-3, 1.0, 0.9),
    # a graph replay and ~3 attention launches per layer (gpu_bench section 10)
    ("host_overhead_piecewise_s", 1e-5, 0.1, 3e-3),
    # beside decodes: the decode attention's split and reduce kernels per layer (section 10)
    ("host_overhead_piecewise_decode_s", 1e-5, 0.1, 2e-3),
    # ~180 kernels of a few microseconds in a Llama-3.2-1B decode step (gpu_bench section 8)
    ("layer_latency_s", 1e-7, 2e-4, 1.5e-5),
    # a GEMM near its ridge point (M ~ 100-500 rows on an H100) reaches neither roof
    ("linear_ridge_exponent", 1.2, 40.0, 6.0),
)
# Some parameters trade off against each other on a grid (a batch-1 decode step is
# weights / bandwidth + the graph's host overhead: a lower bandwidth efficiency and a
# smaller overhead price it alike). A weak pull towards physically plausible values
# (the priors above; a factor e away costs PRIOR_WEIGHT, ~1/25 of a 5% fit error)
# picks one point of such a ridge, the same one every time, so two calibrations on the
# same GPU give the same model instead of two ends of the ridge. Where the grid
# determines a parameter, the data outweigh the prior.
PRIOR_WEIGHT = 1e-4
RUN_ROW_CAP = 300  # see fit()
# The loss is pseudo-Huber in the log error: quadratic within ~ROBUST_SCALE, linear beyond,
# so a few iterations that a host hiccup (a garbage collection, a page fault) made 2x
# slower pull the fit no more than their share.
ROBUST_SCALE = 0.05


def rows_from_iterations(name: str, it, host=None) -> list[dict]:
    """Calibration-grid rows (kind decode / prefill / mixed) of a run's iterations (a
    pandas frame of iterations.parquet); ``host(row)`` gives each row's ``host_s``.
    ``graph`` with ``padded``: a decode-only iteration's CUDA graph and its padded batch,
    or an iteration with context chunks run as piecewise graphs at ``padded`` tokens."""
    rows = []
    for r in it.itertuples(index=False):
        k, n = int(r.num_ctx_requests), int(r.num_gen_requests)
        real = n + (int(r.ctx_tokens) if k else 0)
        row = dict(kind="decode" if not k else "mixed" if n else "prefill", model=name, n_decode=n,
                   kv_sum=int(r.decode_kv_tokens) if n else 0, ctx_tokens=int(r.ctx_tokens),
                   ctx_prior=int(r.ctx_cached_tokens), n_chunks=k, chunk_tokens=int(r.ctx_tokens) // k if k else 0,
                   graph=bool(r.graph), padded=real + int(r.padded_tokens) if r.graph else 0,
                   time_s=float(r.duration_s), run=str(getattr(r, "workload", "")))
        if host is not None:
            row["host_s"] = host(r)
        rows.append(row)
    return rows


def iteration_errors_by_kind(model: ModelSpec, hw: HardwareSpec, roofline: RooflineConfig, it) -> dict:
    """A cost model priced on a run's own iterations (its recorded shapes, not a replay's):
    per kind (decode-graph / decode-eager / mixed / prefill, with -piecewise for piecewise
    graphs) the number of iterations,
    their share of the run's busy time, the median signed error, the mean absolute error
    and the error of their total time (what throughput and mean latencies see). Separates
    the price of an iteration from the queueing a replay adds on top."""
    rows = rows_from_iterations(model.name, it)
    if not rows:
        return {}
    shapes, times, kinds = shapes_from_grid(rows)
    cm = RooflineCostModel(model, hw, roofline, cuda_graphs=True)
    pred = np.array([cm.price(s) for s in shapes])
    err = pred / times - 1
    kinds = np.array(kinds)
    out = {}
    for k in sorted(set(kinds.tolist())):
        m = kinds == k
        out[k] = {"iterations": int(m.sum()), "time_share": float(times[m].sum() / times.sum()),
                  "median_err": float(np.median(err[m])), "mape": float(np.mean(np.abs(err[m]))),
                  "total_err": float(pred[m].sum() / times[m].sum() - 1)}
    return out


def shapes_from_grid(rows: list[dict]) -> tuple[list[IterationShape], np.ndarray, list[str]]:
    """IterationShapes, measured seconds and kinds of the rows of a calibration CSV."""
    shapes, times, kinds = [], [], []
    for r in rows:
        kind = r["kind"]
        graph = str(r["graph"]).lower() in ("true", "1")
        if kind == "decode":
            n = int(r["n_decode"])
            pad = int(float(r.get("padded") or 0)) or n  # grids without the column: exact sizes
            shapes.append(IterationShape(n_decode=n, decode_kv_sum=int(r["kv_sum"]), graph=graph,
                                         padded_decode=pad if graph else 0))
        elif kind in ("prefill", "mixed"):
            k = int(float(r.get("n_chunks") or 1))
            per = int(float(r.get("chunk_tokens") or int(r["ctx_tokens"]) // k))
            prior = int(float(r["ctx_prior"])) // k
            n = int(float(r.get("n_decode") or 0)) if kind == "mixed" else 0
            # piecewise graphs: at the recorded padded size (never below the real count)
            pw = max(int(float(r.get("padded") or 0)), per * k + n) if graph else 0
            shapes.append(IterationShape(ctx_new_tokens=(per,) * k, ctx_prior_tokens=(prior,) * k,
                                         n_ctx_sampling=k, n_decode=n,
                                         decode_kv_sum=int(float(r.get("kv_sum") or 0)) if n else 0,
                                         piecewise_tokens=pw))
        else:
            raise ConfigError(f"unknown kind {kind!r} in a calibration grid (expected decode, prefill or mixed)")
        times.append(float(r["time_s"]))
        kinds.append(kind + ("-graph" if graph else "-eager") if kind == "decode" else
                     kind + ("-piecewise" if graph else ""))
    return shapes, np.asarray(times), kinds


SCHED = ("scheduler_overhead_s", "scheduler_overhead_per_request_s", "scheduler_overhead_per_context_token_s")


def _model_for(model: ModelSpec, hw: HardwareSpec, params: dict, graphs: bool = True, tp: int = 1) -> RooflineCostModel:
    # a grid without host times (a bare forward's) has no scheduler work in it
    cfg = RooflineConfig(**{**dict.fromkeys(SCHED, 0.0), **params})
    return RooflineCostModel(model, hw, cfg, tp=tp, cuda_graphs=graphs)


# the parameters that are host (CPU) time: a process's host speed scales them all
HOST_PARAMS = ("host_overhead_eager_s", "host_overhead_eager_decode_s", "host_overhead_context_s",
               "host_overhead_graph_s",
               "host_overhead_piecewise_s", "host_overhead_piecewise_decode_s", *SCHED)


def _processes(rows: list[dict]) -> np.ndarray:
    """Each row's grid process as an index 0..K-1 (the ``process`` column of a grid measured
    over several processes; one process for grids without it)."""
    labels = [str(r.get("process") if r.get("process") not in (None, "") else "0") for r in rows]
    order = {k: i for i, k in enumerate(sorted(set(labels)))}
    return np.array([order[k] for k in labels], dtype=int)


def fit_host(rows: list[dict], with_speeds: bool = False):
    """Scheduler overhead -- fixed, per request and per new context token -- fitted to the
    rows' measured host time (``host_s``: the engine's scheduling and bookkeeping plus
    the executor's input packing) by robust least squares, each term >= 0; None for a
    grid without host times. The context-token term keeps the long prompts' input
    packing (ids, positions, KV slots per token) from inflating the per-request term,
    which a decode of hundreds of requests would then pay many times over.

    A grid measured over several processes (rows with ``process``): each process runs the
    host part at a speed of its own (1.5-2x apart on the H100 hosts here; host_probe.md),
    the same factor on every host operation, so the model is ``speed[p] * (fixed +
    per_request * requests + per_token * tokens)`` with the speeds' geometric mean 1: the
    terms are those of a typical process, and a grid point that happened to run in a slow
    process does not tilt them (the served run, split over every process, ties the speeds
    together). ``with_speeds``: also the speeds, one per process (index of `_processes`)."""
    keep = [r for r in rows if str(r.get("host_s", "")).strip() not in ("", "nan", "None")]
    if len(keep) < 3:
        return (None, None) if with_speeds else None
    X = np.array([[1.0, int(float(r.get("n_decode") or 0)) + int(float(r.get("n_chunks") or 0)),
                   int(float(r.get("ctx_tokens") or 0))] for r in keep])
    h = np.array([float(r["host_s"]) for r in keep])
    proc = _processes(keep)
    k = int(proc.max()) + 1
    scale = np.maximum(X.max(axis=0), 1.0)  # solve in units where every column is O(1)
    Xs = X / scale
    x0 = np.linalg.lstsq(Xs, h, rcond=None)[0].clip(0)
    f_scale = max(0.05 * float(np.median(h)), 1e-7)

    def speeds(u: np.ndarray) -> np.ndarray:  # k-1 free log speeds, their mean 0
        u = np.concatenate([u, [-u.sum()]]) if k > 1 else np.zeros(1)
        return np.exp(u)

    def res(z: np.ndarray) -> np.ndarray:
        return speeds(z[3:])[proc] * (Xs @ z[:3]) - h

    lo = np.concatenate([np.zeros(3), np.full(k - 1, -2.0)])
    hi = np.concatenate([np.full(3, np.inf), np.full(k - 1, 2.0)])
    from scipy.optimize import least_squares

    sol = least_squares(res, np.concatenate([x0, np.zeros(k - 1)]), bounds=(lo, hi), loss="soft_l1",
                        f_scale=f_scale)
    a, b, c = sol.x[:3] / scale
    terms = {"scheduler_overhead_s": float(a), "scheduler_overhead_per_request_s": float(b),
             "scheduler_overhead_per_context_token_s": float(c)}
    return (terms, speeds(sol.x[3:])) if with_speeds else terms


def predict(model: ModelSpec, hw: HardwareSpec, params: dict, shapes: list[IterationShape],
            proc: np.ndarray | None = None, speeds: np.ndarray | None = None, tp: int = 1) -> np.ndarray:
    """Prices of ``shapes`` (on ``tp`` GPUs); with ``proc`` and ``speeds`` (`fit_host`), each
    shape's host terms (HOST_PARAMS) at the speed of the process it was measured in."""
    if proc is None or speeds is None or len(speeds) < 2:
        cm = _model_for(model, hw, params, tp=tp)
        return np.asarray([cm.price(s) for s in shapes])
    out = np.empty(len(shapes))
    for p, sp in enumerate(speeds):
        idx = np.flatnonzero(proc == p)
        cm = _model_for(model, hw, {**params, **{k: params[k] * sp for k in HOST_PARAMS if params.get(k) is not None}},
                        tp=tp)
        out[idx] = [cm.price(shapes[i]) for i in idx]
    return out


def part_label(part: int, parts: int) -> str:
    """The suffix of the run label of part ``part`` (0-based) of a grid run split into
    ``parts`` (gpu_backend/profiler.py splits the served run over the grid's processes);
    '' for an unsplit run. `whole_run` takes it off."""
    return f" part {part + 1}/{parts}" if parts > 1 else ""


_PART = re.compile(r" part \d+/\d+$")


def whole_run(label: str) -> str:
    """The grid run a row's run label belongs to: a part of a split run (`part_label`) is
    that run."""
    return _PART.sub("", label)


def row_weights(rows: list[dict]) -> np.ndarray:
    """Each grid row's weight in the fit's loss: no run outweighs the rest -- a run's rows
    beyond RUN_ROW_CAP count less each (a served run has thousands of iterations, a grid
    point tens) -- and the parts of a run split over the grid's processes are one run (the
    served run's parts each counted as a run made it weigh as much as 3-6 designed points
    at 300 rows each: its decode steps at batch 8-48 set the one per-KV-token rate the
    designed points at 64-256 requests share, and the H200 1B profile of calls 29-30 priced
    its own runs' decodes at 97-128 requests +32%)."""
    runs = [whole_run(str(r.get("run") or "")) for r in rows]
    counts: dict[str, int] = {}
    for k in runs:
        counts[k] = counts.get(k, 0) + 1
    return np.array([min(1.0, RUN_ROW_CAP / counts[k]) if k else 1.0 for k in runs])


def _host_s(row: dict) -> float:
    v = str(row.get("host_s", "")).strip()
    try:
        return float(v) if v not in ("", "nan", "None") else math.nan
    except ValueError:
        return math.nan


def fit(model: ModelSpec, hw: HardwareSpec, rows: list[dict], gemm: dict | None = None, tp: int = 1,
        fixed: dict | None = None, gemm_by_precision: dict | None = None) -> tuple[dict, dict]:
    """Fitted parameters and fit statistics for a model's grid rows; ``gemm``: measured
    GEMM curves (`gemm_curves`), which price the linears and come into the parameters;
    ``gemm_by_precision``: those of quantised weights (``{"fp8": curves}``), likewise
    (`RooflineConfig.gemm_times_by_precision`: they price the linears of that precision).
    ``tp``: the grid ran on that many GPUs (tensor parallel); ``fixed``: parameters
    measured apart (the all-reduce's, `fit_allreduce`), held fixed and written too.
    Rows with a measured host part (``host_s``) fit the GPU's terms to ``time_s - host_s``;
    the scheduler terms come from ``host_s`` (`fit_host`). The statistics are of whole times."""
    shapes, times, kinds = shapes_from_grid(rows)
    if len(shapes) < len(PARAMS):
        raise ConfigError(f"{len(shapes)} measurements cannot fit {len(PARAMS)} parameters")
    lo = np.log([p[1] for p in PARAMS])
    hi = np.log([p[2] for p in PARAMS])
    z0 = np.log([p[3] for p in PARAMS])
    sched, speeds = fit_host(rows, with_speeds=True)
    sched = sched or {}
    proc = _processes(rows)  # each row's host terms at its process's speed (fit_host)
    if speeds is not None and len(speeds) != int(proc.max()) + 1:  # rows without host times
        speeds = None
    if gemm:
        sched = {**sched, "gemm_times": gemm}  # fixed during the fit, like the host terms
    if gemm_by_precision:
        sched = {**sched, "gemm_times_by_precision": gemm_by_precision}
    if fixed:
        sched = {**sched, **fixed}

    def params_of(z: np.ndarray) -> dict:
        z = np.clip(z, lo, hi)
        return {**{p[0]: float(math.exp(v)) for p, v in zip(PARAMS, z)}, **sched}

    row_w = np.sqrt(row_weights(rows))  # no run outweighs the rest
    prior_w = math.sqrt(float(row_w @ row_w) * PRIOR_WEIGHT)  # the prior weighs as much as before per row

    # The GPU's terms are fitted to each row's own GPU part where the grid measured its host
    # part (time_s - host_s: the executor's launch-to-sync time), the host's scheduling terms
    # having been fitted to host_s apart (fit_host). Fitting them to whole times instead lets
    # a grid point whose host happened to be slow (the designed points' decode steps at
    # 32-256 requests: 0.5-0.75 ms of host where served runs take 0.3-0.4) push the GPU
    # terms, which every iteration of every run then pays.
    host = np.array([_host_s(r) for r in rows])
    split = np.isfinite(host) & (times - np.nan_to_num(host) > 0)
    target = np.where(split, times - np.nan_to_num(host), times)
    no_sched = dict.fromkeys(SCHED, 0.0)

    def predict_target(p: dict) -> np.ndarray:
        out = predict(model, hw, p, shapes, proc, speeds, tp)
        if split.any():
            gpu = predict(model, hw, {**p, **no_sched}, [s for s, m in zip(shapes, split) if m],
                          proc[split] if proc is not None else None, speeds, tp)
            out[split] = gpu
        return out

    def residuals(z: np.ndarray) -> np.ndarray:
        # pseudo-Huber of the log error as a sum of squares (signed square roots), so
        # that least squares minimises it; then the priors' pull
        r = np.log(predict_target(params_of(z)) / target)
        h = np.sign(r) * ROBUST_SCALE * np.sqrt(2 * (np.sqrt(1 + (r / ROBUST_SCALE) ** 2) - 1))
        return np.concatenate([h * row_w, prior_w * (z - z0)])

    from scipy.optimize import least_squares  # here, not at the top: loading a profile needs no scipy

    best, best_cost = None, math.inf
    span = hi - lo
    for start in (z0, lo + 0.3 * span, lo + 0.7 * span):
        sol = least_squares(residuals, np.clip(start, lo + 1e-9, hi - 1e-9), bounds=(lo, hi), method="trf",
                            diff_step=1e-4, x_scale=1.0, max_nfev=400)
        if sol.cost < best_cost:
            best, best_cost = sol.x, sol.cost
    params = params_of(best)
    pred = predict(model, hw, params, shapes, proc, speeds, tp)
    err = pred / times - 1
    stats = {
        "points": len(times),
        **({"process_host_speeds": [round(float(v), 4) for v in speeds]} if speeds is not None and len(speeds) > 1
           else {}),
        "mape": float(np.mean(np.abs(err))),
        "max_abs_rel_err": float(np.max(np.abs(err))),
        "by_kind": {k: float(np.mean(np.abs(err[[i for i, kk in enumerate(kinds) if kk == k]])))
                    for k in sorted(set(kinds))},
        "roofline_mape": float(np.mean(np.abs(predict(model, hw, {k: v for k, v in RooflineConfig().model_dump()
                                                                 .items() if k in SCHED}, shapes, tp=tp) / times
                                                      - 1))),
        "residuals": [{"kind": k, "measured_s": float(t), "predicted_s": float(p)}
                      for k, t, p in zip(kinds, times, pred)],
    }
    return params, stats


def read_grid(path: Path, model_name: str) -> list[dict]:
    import csv

    if not path.is_file():
        raise ConfigError("no such calibration grid", str(path))
    with open(path, newline="") as fh:
        rows = [r for r in csv.DictReader(fh)]
    need = {"model", "kind", "n_decode", "kv_sum", "ctx_tokens", "ctx_prior", "graph", "time_s"}
    if not rows or not need <= set(rows[0]):
        raise ConfigError(f"not a calibration grid: expected columns {sorted(need)}", str(path))
    mine = [r for r in rows if r["model"].lower() == model_name.lower()]
    if not mine:
        models = sorted({r["model"] for r in rows})
        raise ConfigError(f"no measurements of {model_name} (it has {', '.join(models)})", str(path))
    return mine


def fit_power_runs(runs: list[dict], idle_w: float | None, iterations=None, model: ModelSpec | None = None,
                   hw: HardwareSpec | None = None) -> dict | None:
    """The power model fitted to the grid runs' measured energies (None without them).

    A run's regressors come from its iterations where the grid kept them (``iterations``:
    the grid runs' iterations with a ``workload`` column, priced by this checkout's
    `roofline_work`), else from the power CSV's columns; a CSV without ``kv_s`` (grids
    before the KV term) fits weights and KV reads with one power (kv_w = memory_w)."""
    import pyarrow as pa

    from .power import POWER_TERMS, fit_power, roofline_work, run_power_terms

    # runs of under 0.2 s are left out: the energy counter updates every few tens of
    # milliseconds, too coarse for them even with readings aligned on its updates
    ok = [r for r in runs if r.get("energy_j") not in (None, "", "None") and float(r["energy_j"]) > 0
          and float(r["span_s"]) >= 0.2 and r.get("bytes_s") not in (None, "")]
    if idle_w is None or len(ok) < 3:
        return None
    names = POWER_TERMS
    if iterations is not None and model is not None and hw is not None and "workload" in iterations.columns:
        groups = {k: g for k, g in iterations.groupby("workload", sort=False)}
        ok = [r for r in ok if r.get("workload") in groups]
        terms = []
        for r in ok:
            t = pa.Table.from_pandas(groups[r["workload"]].drop(columns=["workload"]), preserve_index=False)
            terms.append((float(r["energy_j"]), float(r["span_s"]), *run_power_terms(t, *roofline_work(t, model, hw))))
    elif all(r.get("kv_s") not in (None, "") for r in ok):
        terms = [tuple(float(r[k]) for k in ("energy_j", "span_s", "busy_s", "bytes_s", "kv_s", "flops_s")) for r in ok]
    else:
        names = ("busy_w", "memory_w", "compute_w")
        terms = [tuple(float(r[k]) for k in ("energy_j", "span_s", "busy_s", "bytes_s", "flops_s")) for r in ok]
    if len(terms) < 3:
        return None
    fitted = fit_power(terms, float(idle_w), names)
    pred = [idle_w * t[1] + sum(fitted[n] * x for n, x in zip(names, t[2:])) for t in terms]
    errs = [p / t[0] - 1 for p, t in zip(pred, terms)]
    fitted.setdefault("kv_w", fitted["memory_w"])
    # the cap: the highest average power of a sustained grid run (power.py), never below the board's limit
    sustained = max(float(r["energy_j"]) / float(r["span_s"]) for r in ok)
    max_w = max(sustained, hw.max_power_w) if hw is not None else sustained
    return {"idle_w": float(idle_w), **{k: fitted[k] for k in POWER_TERMS}, "max_w": float(max_w),
            "fit": {"runs": len(ok), "mape": float(np.mean(np.abs(errs))),
                    "residuals": [{"workload": r.get("workload", ""), "measured_j": t[0], "predicted_j": float(p)}
                                  for r, t, p in zip(ok, terms, pred)]}}


def residuals_path(profile: Path) -> Path:
    """The sidecar of a profile: its time fit's residuals, one row a grid measurement
    (kind, measured_s, predicted_s), in ``<profile stem>.residuals.parquet`` beside it."""
    profile = Path(profile)
    return profile.with_name(f"{profile.stem}.residuals.parquet")


def _write_residuals(path: Path, residuals: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"kind": pa.array([r["kind"] for r in residuals], pa.string()),
                      "measured_s": pa.array([float(r["measured_s"]) for r in residuals], pa.float64()),
                      "predicted_s": pa.array([float(r["predicted_s"]) for r in residuals], pa.float64())})
    pq.write_table(table, path, compression="zstd")


def load_residuals(profile: Path):
    """A profile's time-fit residuals as a pandas frame (kind, measured_s, predicted_s),
    read from its sidecar Parquet; a clear error when the sidecar is missing."""
    import pandas as pd

    profile = Path(profile)
    doc = safe_load(profile.read_text())
    ref = (doc.get("fit") or {}).get("residuals") if isinstance(doc, dict) else None
    if isinstance(ref, list):  # a servesim-profile/2 file: inline
        return pd.DataFrame(ref, columns=list(RESIDUAL_COLUMNS))
    side = profile.with_name(ref["file"]) if isinstance(ref, dict) and ref.get("file") else residuals_path(profile)
    if not side.is_file():
        raise ConfigError(f"the profile's residuals file {side.name} is missing (it is written beside the profile "
                          "by `sim calibrate`)", str(profile))
    return pd.read_parquet(side)


def write_profile(path: Path, model: ModelSpec, hw: HardwareSpec, params: dict, stats: dict,
                  provenance: dict, power: dict | None = None) -> dict:
    """Write a profile: the YAML (parameters, fit statistics, provenance, power model) and,
    beside it, the time fit's residuals (`residuals_path`). Returns the YAML's document."""
    path = Path(path)
    stats = dict(stats)
    residuals = stats.pop("residuals", None)
    path.parent.mkdir(parents=True, exist_ok=True)
    if residuals is not None:
        _write_residuals(residuals_path(path), residuals)
        stats["residuals"] = {"file": residuals_path(path).name, "rows": len(residuals),
                              "columns": list(RESIDUAL_COLUMNS)}
    doc = {
        "schema": PROFILE_SCHEMA,
        "model": model.name,
        "hardware": hw.name,
        "roofline": params,
        "fit": stats,
        "provenance": provenance,
    }
    if power is not None:
        doc["power"] = power
    dump_profile(path, doc)
    return doc


def dump_profile(path: Path, doc: dict) -> None:
    """Write a profile's YAML document ``doc`` (its residuals sidecar is not touched):
    block style, keys in order, lists of numbers on one line."""
    Path(path).write_text(dump_readable(doc))


def convert_profile(path: Path, out: Path | None = None) -> Path:
    """Rewrite a servesim-profile/2 file (time-fit residuals inline) as a servesim-profile/3
    one (`PROFILE_SCHEMA`): the residuals into the sidecar Parquet, the rest unchanged, so
    it loads to the same RooflineConfig and power model. ``out``: elsewhere than in place."""
    path = Path(path)
    out = Path(out) if out is not None else path
    doc = safe_load(path.read_text())
    if not isinstance(doc, dict) or doc.get("schema") != INLINE_RESIDUALS_SCHEMA:
        raise ConfigError(f"not a {INLINE_RESIDUALS_SCHEMA} profile (schema {doc.get('schema')!r})"
                          if isinstance(doc, dict) else "not a calibration profile", str(path))
    fit_stats = dict(doc.get("fit") or {})
    residuals = fit_stats.pop("residuals", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    if residuals is not None:
        _write_residuals(residuals_path(out), residuals)
        fit_stats["residuals"] = {"file": residuals_path(out).name, "rows": len(residuals),
                                  "columns": list(RESIDUAL_COLUMNS)}
    doc = {**doc, "schema": PROFILE_SCHEMA, "fit": fit_stats}
    dump_profile(out, doc)
    return out


def load_profile(path: Path, model: ModelSpec, hw: HardwareSpec, where: str = "") -> tuple[RooflineConfig, dict | None]:
    """The fitted RooflineConfig of a profile and its power model (None if it has none),
    after checking it fits this model and GPU. Reads the YAML only (not the residuals)."""
    loc = f"{where}cost_model.profile"
    if not path.is_file():
        raise ConfigError(f"no such calibration profile: {path}", loc)
    try:
        doc = load_yaml(path, "calibration profile")  # not UTF-8, bad YAML, a key twice: named with its line
    except ConfigError as e:
        raise ConfigError([(where_, f"corrupt calibration profile: {msg}") for where_, msg in e.problems]) from None
    if not isinstance(doc, dict):
        raise ConfigError("corrupt calibration profile (not a YAML mapping)", str(path))
    schema = doc.get("schema")
    if schema == INLINE_RESIDUALS_SCHEMA:
        raise ConfigError(f"calibration profile of the older version {schema!r} (its residuals inline; this "
                          f"servesim reads {PROFILE_SCHEMA!r}): convert it with `python -m servesim.sim.calibrate "
                          f"convert {path}` (same parameters), or recalibrate with `sim calibrate`", str(path))
    if schema != PROFILE_SCHEMA:
        raise ConfigError(f"calibration profile of an incompatible version ({schema!r}; this servesim "
                          f"reads {PROFILE_SCHEMA!r}): recalibrate with `sim calibrate`", str(path))
    probs = []
    if str(doc.get("model", "")).lower() != model.name.lower():
        probs.append((loc, f"profile {path} was made for model {doc.get('model')}, the experiment runs "
                           f"{model.name}"))
    if str(doc.get("hardware", "")).lower() != hw.name.lower():
        probs.append((loc, f"profile {path} was made on {doc.get('hardware')}, the experiment runs on "
                           f"{hw.name}"))
    if probs:
        raise ConfigError(probs)
    try:
        roofline = RooflineConfig.model_validate(doc["roofline"])
    except ValidationError as e:  # a hand-edited profile: each bad parameter at its key
        raise ConfigError(validation_problems(e, doc["roofline"], str(path), "roofline")) from None
    except (KeyError, TypeError):
        raise ConfigError("corrupt calibration profile: no roofline mapping", str(path)) from None
    try:
        power = doc.get("power")
        if power is not None:
            kv, cap = power.get("kv_w"), power.get("max_w")
            power = {k: float(power[k]) for k in POWER_KEYS}
            power["kv_w"] = float(kv) if kv is not None else power["memory_w"]
            if cap is not None:  # older profiles: the hardware file's max_power_w
                power["max_w"] = float(cap)
            if not (power["idle_w"] > 0 and min(power.values()) >= 0 and all(map(math.isfinite, power.values()))):
                raise ValueError(f"power model out of range: {power}")
        return roofline, power
    except Exception as e:  # noqa: BLE001 - a hand-edited profile
        raise ConfigError(f"corrupt calibration profile: {e}", str(path)) from None


def _write_csv(path: Path, rows: list[dict]) -> None:
    """``rows`` (dicts with the same keys) as a CSV beside a grid; nothing for no rows."""
    import csv

    if rows:
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def _read_csv(path: Path) -> list[dict]:
    """The rows of a CSV beside a grid ([] if there is none)."""
    import csv

    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def calibrate(model: ModelSpec, hw: HardwareSpec, grid: Path | None, out: Path, backend: str = "grid",
              model_ref: str | None = None, processes: int = 1, tp: int = 1,
              gemm_precisions: tuple[str, ...] | None = None, kv_dtypes: tuple[str, ...] | None = None,
              kv_attention_table: Path | None = None) -> dict:
    """Fit a profile to a grid measured here (``backend="gpu"``) or earlier (``grid``) and
    write it to ``out``. ``tp > 1``: the grid runs at ``cluster.tensor_parallel: tp``, the
    GEMM sweep at the per-GPU shapes, and the all-reduce sweep by message size (a CSV
    beside the grid, ``.allreduce.csv``) fits ``allreduce_latency_s`` and
    ``allreduce_bandwidth_efficiency`` (`fit_allreduce`); the profile's
    ``tensor_parallel`` mapping keeps the sweep itself (docs/calibration.md).
    ``gemm_precisions``: GEMM sweeps of quantised weights besides bf16's (``("fp8",)``;
    default fp8 for a model of fp8 weights), written beside the grid as
    ``.gemm-fp8.csv`` and fitted into ``gemm_times_by_precision``. ``kv_dtypes``: the decode
    attention kernel alone per KV dtype (default bf16 + fp8 for an fp8 KV cache), written
    beside the grid as ``.kv-attention.csv`` (sim/kv_attention.py's table; a grid's is read
    from there, or from ``kv_attention_table``: one measured apart on the same GPU) and fitted
    into ``decode_attention_kernel`` (`fit_kv_attention`)."""
    model.check_tp(tp, "--tensor-parallel")
    ar_rows: list[dict] = []
    if backend == "gpu":
        from servesim.gpu_backend.profiler import measure_grid

        rows, env = measure_grid(model, model_ref=model_ref, hardware=hw.name, processes=processes, tp=tp,
                                 gemm_precisions=gemm_precisions, kv_dtypes=kv_dtypes)
        kv_rows = env.pop("kv_attention", None) or []
        long_rows = env.pop("kv_attention_long", None) or []
        prec_rows = {p: env.pop(f"gemm_{p}") for p in GEMM_PRECISIONS if f"gemm_{p}" in env}
        ar_rows = env.pop("allreduce", None) or []
        runs = env.pop("power_runs", [])
        idle_w = env.pop("idle_power_w", None)
        grid_its = env.pop("grid_iterations", None)
        gemm_rows = env.pop("gemm", None) or []
        grid = out.with_suffix(".grid.csv")
        grid.parent.mkdir(parents=True, exist_ok=True)
        _write_csv(grid, rows)
        _write_csv(grid.with_suffix(".gemm.csv"), gemm_rows)
        for p, r in prec_rows.items():
            _write_csv(grid.with_suffix(f".gemm-{p}.csv"), r)
        _write_csv(grid.with_suffix(".power.csv"), [{"idle_w": idle_w, **r} for r in runs])
        _write_csv(grid.with_suffix(".allreduce.csv"), ar_rows)
        if kv_rows:
            kv_attention.write_table(grid.with_suffix(".kv-attention.csv"), kv_rows)
        if long_rows:
            kv_attention.write_table(grid.with_suffix(LONG_KV_SUFFIX), long_rows)
        if grid_its is not None:
            grid_its.to_parquet(grid.with_suffix(".iterations.parquet"), index=False)
        source = f"measured by sim calibrate --backend gpu ({grid.name})"
        grid_bytes = grid.read_bytes()
    else:
        rows = read_grid(grid, model.name)
        runs, idle_w = read_power_runs(grid.with_suffix(".power.csv"))
        gemm_rows = _read_csv(grid.with_suffix(".gemm.csv"))  # none for grids from before the GEMM sweep
        prec_rows = {p: r for p in GEMM_PRECISIONS if (r := _read_csv(grid.with_suffix(f".gemm-{p}.csv")))}
        ar_rows = _read_csv(grid.with_suffix(".allreduce.csv")) if tp > 1 else []
        kv_path = Path(kv_attention_table) if kv_attention_table is not None else grid.with_suffix(".kv-attention.csv")
        if kv_attention_table is not None and not kv_path.is_file():
            raise ConfigError("no such decode attention calibration table", str(kv_path))
        try:
            kv_rows = kv_attention.read_table(kv_path) if kv_path.is_file() else []
        except ValueError as e:
            raise ConfigError(str(e), str(kv_path)) from None
        long_path = grid.with_suffix(LONG_KV_SUFFIX)
        try:
            long_rows = kv_attention.read_table(long_path) if long_path.is_file() else []
        except ValueError as e:
            raise ConfigError(str(e), str(long_path)) from None
        its_path = grid.with_suffix(".iterations.parquet")
        grid_its = None
        if its_path.is_file():  # grids from before the iterations were kept have none
            import pandas as pd

            grid_its = pd.read_parquet(its_path)
        env = {}
        source = str(grid)
        grid_bytes = grid.read_bytes()
    ar = fit_allreduce(ar_rows, hw, tp) if tp > 1 else None
    if tp > 1 and ar is None:
        where = "" if backend == "gpu" else f" ({grid.with_suffix('.allreduce.csv')}, beside the grid)"
        raise ConfigError(f"a tensor-parallel calibration (tp {tp}) needs its all-reduce sweep{where}",
                          "--tensor-parallel")
    by_prec = {p: c for p, r in prec_rows.items() if (c := gemm_curves(r))}
    params, stats = fit(model, hw, rows, gemm_curves(gemm_rows), tp=tp, fixed=ar, gemm_by_precision=by_prec or None)
    kv_env = fit_kv_attention(params, stats, kv_rows, model, hw, tp,
                              kv_path if backend != "gpu" else grid.with_suffix(".kv-attention.csv"))
    kv_env.update(fit_long_context(params, long_rows, model, grid.with_suffix(LONG_KV_SUFFIX), hw, tp))
    power = fit_power_runs(runs, idle_w, grid_its, model, hw)
    prov = {
        "source": source,
        "grid_sha256": hashlib.sha256(grid_bytes).hexdigest()[:16],
        "fitted": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        **env,
        **kv_env,
    }
    doc = write_profile(out, model, hw, params, stats, prov, power)
    if tp > 1:  # the measured sweep beside the fitted terms (TP_PROFILE_KEY)
        ar_sorted = sorted(ar_rows, key=lambda r: int(float(r["bytes"])))
        doc[TP_PROFILE_KEY] = {"tp": tp, "allreduce_bytes": [int(float(r["bytes"])) for r in ar_sorted],
                               "allreduce_seconds": [float(r["seconds"]) for r in ar_sorted]}
        dump_profile(out, doc)
    return doc


LONG_KV_SUFFIX = ".kv-long.csv"  # beside a grid: the decode attention kernel alone at long contexts


def with_sweep_lengths(rows: list[dict], model: ModelSpec, tp: int = 1) -> list[dict]:
    """kv-long rows with the lengths their sweep drew (``kv_sum``, ``kv_max``): as recorded, else
    replayed from the sweep's seeded generator (gpu_backend/kv_attention_sweep.py
    `sweep_lengths`, torch; tables measured before the sweep recorded them); as they are where
    torch is missing."""
    if not rows or all("kv_sum" in r and "kv_max" in r for r in rows):
        return rows
    try:
        from servesim.gpu_backend.kv_attention_sweep import sweep_lengths
    except ImportError:
        return rows
    sizes = list(dict.fromkeys((r["batch"], r["ctx"]) for r in rows))
    got = dict(zip(sizes, sweep_lengths(sizes, model.num_heads // tp, model.head_dim)))
    return [{**r, "kv_sum": got[(r["batch"], r["ctx"])][0], "kv_max": got[(r["batch"], r["ctx"])][1]}
            if "kv_sum" not in r or "kv_max" not in r else r for r in rows]


def fit_long_context(params: dict, rows: list[dict], model: ModelSpec, path: Path, hw: HardwareSpec | None = None,
                     tp: int = 1) -> dict:
    """The decode attention kernel alone in the model's KV dtype at long contexts (``rows``:
    the grid's ``.kv-long.csv``) into ``params["decode_attention_long"]`` (sim/kv_attention.py
    `long_context_delta`: the kernel's long - short context per-token difference at a batch).
    Nothing without rows of the model's KV dtype. Returns the provenance to record."""
    rows = [{**r, "batch": int(r["batch"]), "ctx": int(r["ctx"]), "us": float(r["us"]),
             **{c: int(r[c]) for c in ("kv_sum", "kv_max") if str(r.get(c, "")).strip()}} for r in rows]
    rows = with_sweep_lengths(rows, model, tp)
    root = Path(__file__).resolve().parents[1]
    path = Path(path).resolve().relative_to(root) if Path(path).resolve().is_relative_to(root) else Path(path)
    try:
        k = kv_attention.fit_long(rows, model.kv_dtype, source=str(path), kv_heads=model.kv_heads_per_gpu(tp),
                                  sms=hw.num_sms if hw is not None else None)
    except ValueError as e:
        raise ConfigError(str(e), str(path)) from None
    if k is None:
        return {}
    params["decode_attention_long"] = k
    return {"kv_attention_long": str(path)}


def fit_kv_attention(params: dict, stats: dict, rows: list[dict], model: ModelSpec, hw: HardwareSpec, tp: int,
                     path: Path) -> dict:
    """The decode attention kernel alone per KV dtype (the calibration's kv-attention table,
    ``rows``) into ``params["decode_attention_kernel"]`` (sim/kv_attention.py: the grid's
    per-KV-token term stays as fitted, of the model's KV dtype; another dtype pays the
    kernel-alone difference), and into ``stats["kv_attention"]`` the split of the fitted term
    at the largest measured batch: the grid dtype's kernel and the remainder, ns per token and
    layer. Nothing without rows with two dtypes. Returns the provenance to record."""
    rows = [{**r, "batch": int(r["batch"]), "ctx": int(r["ctx"]), "us": float(r["us"])} for r in rows]
    if len({r["kv_dtype"] for r in rows}) < 2:
        return {}
    root = Path(__file__).resolve().parents[1]  # a table in this source tree is named from its root
    path = Path(path).resolve().relative_to(root) if Path(path).resolve().is_relative_to(root) else Path(path)
    try:
        k = kv_attention.fit_kernel(rows, model.kv_dtype, source=str(path))
    except ValueError as e:
        raise ConfigError(str(e), str(path)) from None
    params["decode_attention_kernel"] = k
    kern = kv_attention.DecodeAttentionKernel.model_validate(k)
    grid_rate = _model_for(model, hw, params, tp=tp).decode_kv_rate(kern.batches[-1]) / model.num_layers
    g = k["grid_kv_dtype"]
    if g in k["per_token_s"]:
        ker = k["per_token_s"][g][-1]
        stats["kv_attention"] = {"batch": kern.batches[-1], "grid_ns_per_token": grid_rate * 1e9,
                                 "kernel_ns_per_token": {dt: v[-1] * 1e9 for dt, v in k["per_token_s"].items()},
                                 "remainder_ns_per_token": (grid_rate - ker) * 1e9}
    return {"kv_attention": str(path)}


# a tensor-parallel profile's own mapping: the TP size its grid ran at and the all-reduce
# time measured by message size (bytes per rank; seconds of one all-reduce)
TP_PROFILE_KEY = "tensor_parallel"


def fit_allreduce(rows: list[dict], hw: HardwareSpec, tp: int) -> dict | None:
    """The cost model's all-reduce parameters fitted to measured (bytes, seconds) rows.

    The model prices one all-reduce over ``tp`` GPUs as ``fixed + 2 (tp-1)/tp * bytes /
    (hw.link_bytes_per_s * allreduce_bandwidth_efficiency)`` with ``fixed =
    allreduce_latency_s + 2 (tp-1) * collective_step_latency_s`` (sim/cost_model.py). Both
    coefficients are fitted by least squares in relative error (the small messages,
    latency-bound, count as much as the large ones). One TP size cannot tell the two
    latencies apart: the step latency keeps its default and ``allreduce_latency_s`` takes
    the rest (when the fixed part is below the default steps' share, the step latency
    takes all of it). None for fewer than two rows."""
    pts = [(float(r["bytes"]), float(r["seconds"])) for r in rows
           if str(r.get("seconds", "")).strip() not in ("", "nan", "None")]
    if len(pts) < 2 or tp < 2:
        return None
    ring = 2.0 * (tp - 1) / tp
    b = np.array([p[0] for p in pts]) * ring / hw.link_bytes_per_s
    t = np.array([p[1] for p in pts])
    A = np.stack([np.ones_like(b), b], axis=1) / t[:, None]  # rows scaled by 1/t: relative error
    from scipy.optimize import lsq_linear

    fixed, inv_eff = lsq_linear(A, np.ones_like(t), bounds=([0.0, 1e-3], [np.inf, np.inf])).x
    steps = 2 * (tp - 1)
    step = float(RooflineConfig().collective_step_latency_s)
    out = {"allreduce_latency_s": float(fixed - steps * step), "allreduce_bandwidth_efficiency": float(1.0 / inv_eff)}
    if out["allreduce_latency_s"] < 0:
        out.update(allreduce_latency_s=0.0, collective_step_latency_s=float(fixed / steps))
    return out


GEMM_PRECISIONS = ("fp8",)  # quantised GEMM sweeps a calibration can measure (gpu_backend.profiler.gemm_sweep)


def gemm_curves(rows: list[dict]) -> dict | None:
    """`RooflineConfig.gemm_times` from GEMM-sweep rows (`gpu_backend.profiler.gemm_sweep`,
    or its CSV beside a grid): per linear its k, n and seconds by row count."""
    curves: dict[str, dict] = {}
    for r in sorted(rows, key=lambda r: (r["linear"], int(r["tokens"]))):
        c = curves.setdefault(r["linear"], {"k": int(r["k"]), "n": int(r["n"]), "tokens": [], "seconds": []})
        c["tokens"].append(int(r["tokens"]))
        c["seconds"].append(float(r["seconds"]))
    return curves or None


def read_power_runs(path: Path) -> tuple[list[dict], float | None]:
    """The grid runs' energies written beside a calibration grid (none if absent)."""
    runs = _read_csv(path)
    if not runs:
        return [], None
    idle = next((float(r["idle_w"]) for r in runs if r.get("idle_w") not in (None, "", "None")), None)
    return runs, idle


def main(argv: list[str] | None = None) -> int:
    """``python -m servesim.sim.calibrate convert PROFILE...``: servesim-profile/2 files
    rewritten in place as servesim-profile/3 (residuals into their sidecar Parquet)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or args[0] != "convert":
        print("usage: python -m servesim.sim.calibrate convert PROFILE.yaml ...", file=sys.stderr)
        return 2
    try:
        for a in args[1:]:
            out = convert_profile(Path(a))
            print(f"converted {out} (residuals: {residuals_path(out)})")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
