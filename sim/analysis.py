"""`servesim.analysis`: a small API for reading runs, sweeps and comparisons in notebooks.

    from servesim import analysis as sa
    run = sa.load_run("runs/ifb_vs_static/online-ifb-guaranteed")
    sa.latency_cdfs({"ifb": run}, "ttft_s")            # matplotlib Axes
    sa.over_time(run)                                 # throughput, batch, KV use per time bin
    sweep = sa.load_sweep("runs/sweeps/azure_rate_batch")  # results.parquet as a DataFrame
    sa.knees(sweep)                                   # the knee of every latency-vs-load curve
    cmp = sa.load_compare("runs/x/sim")               # compare.json: tidy DataFrames

Everything reads the files the CLI writes, through the project's readers (the declared
schemas of sim/schemas.py, the metrics of sim/metrics.py), so a number here is the number
``summary.json`` or ``sim compare`` printed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .metrics import request_latencies
from .schemas import read_run_table
from .types import ConfigError


@dataclass
class Run:
    """A finished run folder: its tables (pyarrow), summary and resolved config."""

    path: Path
    requests: object  # pa.Table
    iterations: object  # pa.Table
    summary: dict
    config: dict

    @property
    def name(self) -> str:
        return self.path.name

    def requests_df(self) -> pd.DataFrame:
        """The requests table without the per-token list column (cheap to build)."""
        cols = [c for c in self.requests.column_names if c not in ("token_times", "block_hashes", "prompt_tokens")]
        return self.requests.select(cols).to_pandas()

    def iterations_df(self) -> pd.DataFrame:
        cols = [c for c in self.iterations.column_names if not c.startswith("draft_") or c in (
            "draft_tokens_proposed", "draft_tokens_accepted")]
        return self.iterations.select(cols).to_pandas()

    def latencies(self) -> dict[str, np.ndarray]:
        """Per finished request: ttft_s, tpot_s, e2e_s, queue_s; itl_s: every gap between tokens."""
        lat = request_latencies(self.requests)
        return {k: v for k, v in lat.items() if k != "fin_mask"}


def load_run(path: str | Path) -> Run:
    """A run folder as `sim run` writes it, read by `sim compare`'s reader (ConfigError naming
    what is missing, unfinished or unreadable)."""
    from .compare import load_run as _load

    problems: list = []
    r = _load(Path(path), problems)
    if problems:
        raise ConfigError(problems)
    return Run(r.path, r.requests, r.iterations, r.summary_file, r.config)


def load_experiment_runs(path: str | Path) -> dict[str, Run]:
    """Every finished variant of an experiment's output folder (``runs/<experiment>``)."""
    p = Path(path)
    return {d.name: load_run(d) for d in sorted(p.iterdir())
            if d.is_dir() and not d.name.startswith(".") and (d / "summary.json").is_file()}


def summaries(runs: dict[str, Run]) -> pd.DataFrame:
    """One row a run: the comparison.csv columns (flat summary metrics)."""
    from .metrics import flat_row

    return pd.DataFrame([{"run": k, **{c: v for c, v in flat_row(r.summary).items()
                                       if not isinstance(v, (dict, list))}} for k, r in runs.items()]).set_index("run")


def cdf(x: np.ndarray, points: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """(values, cumulative fraction) of the finite values of `x`, at `points` quantiles."""
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    if not len(x):
        return np.array([]), np.array([])
    q = np.linspace(0, 1, min(points, len(x)))
    return np.quantile(x, q), q


def latency_cdfs(runs: dict[str, Run], metric: str = "ttft_s", ax=None, scale: float = 1.0, log: bool = True):
    """The CDF of `metric` (ttft_s, tpot_s, itl_s, e2e_s, queue_s) per run, on one Axes."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    for name, run in runs.items():
        x, q = cdf(run.latencies()[metric] * scale)
        ax.plot(x, q, label=name, lw=1.5)
    ax.set_xlabel(metric + ("" if scale == 1 else f" x{scale:g}"))
    ax.set_ylabel("fraction of requests" if metric != "itl_s" else "fraction of token gaps")
    if log:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def over_time(run: Run, bins: int = 100) -> pd.DataFrame:
    """Per time bin of the run: output tokens/s and finished requests/s (from the token
    times), the running batch (time-weighted mean of generation + context requests) and KV
    use (share of the pool held, time-weighted, averaged over replicas)."""
    from .plots import _step_means

    it = run.iterations_df()
    dur = float(run.summary.get("duration_s") or 0.0) or float((it.start_s + it.duration_s).max())
    edges = np.linspace(0.0, dur, bins + 1)
    width = edges[1] - edges[0]
    tt = run.requests.column("token_times").combine_chunks().values.to_numpy()
    tok = np.histogram(tt, edges)[0] / width
    fin = run.requests_df()
    fin = fin[fin.status == "finished"]
    done = np.histogram(fin.finish_s.to_numpy(), edges)[0] / width
    rep, start = it.replica.to_numpy(), it.start_s.to_numpy()
    end = start + it.duration_s.to_numpy()
    batch = _step_means(rep, start, end, (it.num_gen_requests + it.num_ctx_requests).to_numpy(), edges, hold=False)
    total = run.summary.get("kv_pool_blocks") or run.config.get("derived", {}).get("kv_pool_blocks")
    kv = _step_means(rep, start, end, it.kv_blocks_used.to_numpy(), edges, hold=True)
    return pd.DataFrame({"t_s": (edges[:-1] + edges[1:]) / 2, "out_tok_s": tok, "finished_req_s": done,
                         "batch": batch, "kv_use": kv / total if total else np.nan})


def plot_over_time(run: Run, bins: int = 100, axes=None):
    """Three stacked panels of :func:`over_time`: tokens/s, running batch, KV use."""
    import matplotlib.pyplot as plt

    df = over_time(run, bins)
    if axes is None:
        _, axes = plt.subplots(3, 1, figsize=(8, 6), sharex=True)
    axes[0].plot(df.t_s, df.out_tok_s)
    axes[0].set_ylabel("output tok/s")
    axes[1].plot(df.t_s, df.batch)
    axes[1].set_ylabel("running batch")
    axes[2].plot(df.t_s, df.kv_use * 100)
    axes[2].set_ylabel("KV use %")
    axes[2].set_xlabel("time (s)")
    for ax in axes:
        ax.grid(alpha=0.3)
    return axes


# --------------------------------------------------------------------------- sweeps


def load_sweep(path: str | Path) -> pd.DataFrame:
    """A sweep's results.parquet (a folder of `sim sweep` or the file itself) as a DataFrame;
    ``df.attrs["sweep"]``: its name, parameters, load key and knee rule."""
    import pyarrow.parquet as pq

    p = Path(path)
    f = p / "results.parquet" if p.is_dir() else p
    if not f.is_file():
        raise ConfigError("no results.parquet: not a `sim sweep` output folder", str(p))
    t = pq.read_table(f)
    df = t.to_pandas()
    meta = (t.schema.metadata or {}).get(b"servesim.sweep")
    df.attrs["sweep"] = json.loads(meta) if meta else {}
    return df


def curves(df: pd.DataFrame, load_key: str | None = None) -> dict[tuple, pd.DataFrame]:
    """The sweep's latency-vs-load curves: {values of the other parameters: rows by load}."""
    info = df.attrs.get("sweep", {})
    load_key = load_key or info.get("load_key")
    if load_key is None:
        raise ConfigError("the sweep has no load key (set load_key in the sweep file)", "load_key")
    other = [k for k in info.get("params", []) if k != load_key]
    ok = df[df.status == "ok"]
    if not other:
        return {(): ok.sort_values(load_key)}
    return {(k if isinstance(k, tuple) else (k,)): g.sort_values(load_key) for k, g in ok.groupby(other)}


def knees(df: pd.DataFrame) -> pd.DataFrame:
    """Per curve: its knee load (the first saturated point, None if none), the sustainable load
    before it, and the p99 TTFT at both (see sim/sweep.py for the rule)."""
    info = df.attrs.get("sweep", {})
    load_key = info.get("load_key")
    other = [k for k in info.get("params", []) if k != load_key]
    rows = []
    for key, g in curves(df).items():
        sat = g[g.knee == True]  # noqa: E712
        knee = sat[load_key].iloc[0] if len(sat) else None
        before = g[g[load_key] < knee] if knee is not None else g
        rows.append({**dict(zip(other, key)), "knee_load": knee,
                     "sustainable_load": before[load_key].max() if len(before) else None,
                     "ttft_p99_at_sustainable": before.ttft_s_p99.iloc[-1] if len(before) else None,
                     "ttft_p99_at_knee": sat.ttft_s_p99.iloc[0] if len(sat) else None})
    return pd.DataFrame(rows)


def pareto(df: pd.DataFrame) -> pd.DataFrame:
    """The sweep's Pareto front (output tokens/s per GPU up, p99 TTFT down), by throughput."""
    return df[df.pareto == True].sort_values("out_tok_s_per_gpu")  # noqa: E712


def load_search(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """A `sim search` folder: (search.parquet as a DataFrame, choice.json)."""
    import pyarrow.parquet as pq

    p = Path(path)
    if not (p / "search.parquet").is_file():
        raise ConfigError("no search.parquet: not a `sim search` output folder", str(p))
    return pq.read_table(p / "search.parquet").to_pandas(), json.loads((p / "choice.json").read_text())


# --------------------------------------------------------------------------- sim vs GPU


def load_compare(path: str | Path) -> dict:
    """`sim compare`'s compare.json (a folder holding it, or the file) as tidy pieces:
    ``metrics`` (one row per metric and statistic: a, b, rel_err), ``iterations``
    (the per-iteration duration errors), ``throughput`` (tokens/s over time, both runs),
    ``raw`` (the whole document)."""
    p = Path(path)
    f = p / "compare.json" if p.is_dir() else p
    if not f.is_file():
        raise ConfigError("no compare.json: run `sim compare RUN_A RUN_B` first", str(p))
    doc = json.loads(f.read_text())
    rows = []
    for m in doc.get("metrics", []):
        rows.append(m if isinstance(m, dict) else {"metric": m})
    tot = doc.get("throughput_over_time") or {}
    return {"metrics": pd.DataFrame(rows), "iterations": doc.get("iterations", {}),
            "throughput": pd.DataFrame({k: v for k, v in tot.items() if isinstance(v, list)}) if tot else
            pd.DataFrame(), "requests": doc.get("requests", {}), "raw": doc}


def paired_latencies(a: Run, b: Run, metric: str = "ttft_s") -> pd.DataFrame:
    """Per request finished in both runs: `metric` in A, in B, and B's relative error."""
    la, lb = request_latencies(a.requests), request_latencies(b.requests)
    ia = a.requests.column("request_id").to_numpy()[la["fin_mask"]]
    ib = b.requests.column("request_id").to_numpy()[lb["fin_mask"]]
    da = pd.Series(la[metric], index=ia, name="a")
    db = pd.Series(lb[metric], index=ib, name="b")
    df = pd.concat([da, db], axis=1, join="inner")
    df["rel_err"] = (df.b - df.a) / df.a
    return df


__all__ = ["Run", "load_run", "load_experiment_runs", "summaries", "cdf", "latency_cdfs", "over_time",
           "plot_over_time", "load_sweep", "curves", "knees", "pareto", "load_search", "load_compare",
           "paired_latencies"]
