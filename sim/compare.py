"""`sim compare RUN_DIR_A RUN_DIR_B`: two runs of the same requests, number by number.

RUN_A is the reference (typically the GPU run), RUN_B the one being judged (typically the
simulator); every relative error is (B - A) / A. What is compared:

- summary metrics (TTFT, TPOT, ITL, E2E at mean/p50/p90/p99, request and output-token
  throughput, goodput, KV utilisation, energy per token when both runs report it), each
  recomputed from the run's parquet files with `metrics.summarize` (the function that wrote
  summary.json), so both sides are summarised identically even if a summary.json is stale;
- per-request paired errors (TTFT, TPOT, E2E of requests finished in both runs);
- per-iteration duration for iterations of the same batch composition, keyed by
  (num_ctx_requests, num_gen_requests, ctx_tokens, gen_tokens): MAPE of the mean durations
  weighted by RUN_A's iteration counts, overall and by phase, plus median duration per
  decode batch size;
- the same per-iteration table keyed also by the context the iteration attends to: the
  context chunks' cached tokens (cached prefix + earlier chunks, `ctx_cached_tokens`) and
  the generation requests' KV (`decode_kv_tokens`), each in log2 buckets, so that an
  iteration of a replay that diverged (same batch, other contexts) is not read as the cost
  model's error; its MAPE overall, by phase and by chunk-context bucket;
- per request, where the time went: queueing (arrival -> first scheduled), the prefill span
  (first scheduled -> first token) and the decode span (first token -> finish), each's
  distribution in both runs, and the mean E2E difference split exactly into the three;
- output tokens/s over time, in common time bins.

Writes compare.json and compare.png (to `out`, default RUN_B) and prints a table. Bad input
(not a run directory, unreadable file, different requests) raises ConfigError naming the
file and, for mismatched requests, the first request and field that differ.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from .metrics import LATENCY_KEYS, dist, summarize
from .rundir import RUN_FILES, check_output_dir, unfinished_problems
from .schemas import read_run_table
from .types import ConfigError

SCHEMA_VERSION = 1  # of compare.json (the run tables have theirs: sim/schemas.py)
REQUEST_COLUMNS = ("request_id", "status", "arrival_s", "first_scheduled_s", "first_token_s", "finish_s", "prompt_len",
                   "output_len", "cached_tokens", "slo_ttft_s", "slo_tpot_s", "token_times")
ITERATION_COLUMNS = ("start_s", "duration_s", "num_ctx_requests", "num_gen_requests", "ctx_tokens",
                     "gen_tokens", "kv_blocks_used", "ctx_cached_tokens", "decode_kv_tokens")
ITERATION_KEY = ("num_ctx_requests", "num_gen_requests", "ctx_tokens", "gen_tokens")
# the context an iteration attends to, bucketed (log2_bucket): the key's extension
CONTEXT_KEY = ("ctx_attended_bucket", "decode_kv_bucket")
# per-request phases: name -> (start column, end column)
REQUEST_PHASES = {"queueing_s": ("arrival_s", "first_scheduled_s"),
                  "prefill_span_s": ("first_scheduled_s", "first_token_s"),
                  "decode_span_s": ("first_token_s", "finish_s")}
PHASES = ("prefill", "decode", "mixed")
STATS = ("mean", "p50", "p90", "p99")
SCALARS = ("throughput_req_s", "throughput_out_tok_s", "goodput_req_s", "kv_util_mean")
ENERGY = "energy_per_token_j"
# arrival times of the same request in two runs may differ by float noise, nothing more
ARRIVAL_ATOL_S = 1e-6
HIGHLIGHT = 0.05  # |relative error| above this is printed in red

# metric -> (label, unit scale, value format) for the printed table
_DISPLAY = {
    "ttft_s": ("TTFT (s)", 1.0, "{:.4f}"),
    "tpot_s": ("TPOT (ms)", 1e3, "{:.3f}"),
    "itl_s": ("ITL (ms)", 1e3, "{:.3f}"),
    "e2e_s": ("E2E (s)", 1.0, "{:.4f}"),
    "throughput_req_s": ("throughput (req/s)", 1.0, "{:.3f}"),
    "throughput_out_tok_s": ("throughput (out tok/s)", 1.0, "{:,.1f}"),
    "goodput_req_s": ("goodput (req/s)", 1.0, "{:.3f}"),
    "kv_util_mean": ("KV utilisation", 100.0, "{:.2f}%"),
    ENERGY: ("energy per token (J)", 1.0, "{:.4g}"),
}


@dataclass
class Run:
    path: Path
    requests: pa.Table  # as stored (summarize reads it in this order)
    iterations: pa.Table
    summary_file: dict  # summary.json as written
    config: dict  # config.yaml as written
    summary: dict  # recomputed from the parquet files


# --------------------------------------------------------------------------- loading


def _read_parquet(path: Path, kind: str, columns: tuple[str, ...], problems: list) -> pa.Table | None:
    try:
        return read_run_table(path, kind, columns)
    except ConfigError as e:
        problems.extend(e.problems)
        return None


def _read_json(path: Path, problems: list) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.append((str(path), f"cannot read this JSON file ({e})"))
        return None
    if not isinstance(data, dict):
        problems.append((str(path), "expected a JSON object of summary metrics"))
        return None
    return data


def _read_yaml(path: Path, problems: list) -> dict | None:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        problems.append((str(path), f"cannot read this YAML file ({e})"))
        return None
    if not isinstance(data, dict):
        problems.append((str(path), "expected the resolved run config (a mapping with a `config` key)"))
        return None
    return data


def _kv_total_blocks(summary_file: dict, config: dict, it: pa.Table) -> int:
    n = summary_file.get("kv_pool_blocks")
    if not isinstance(n, (int, float)) or n <= 0:
        n = (config.get("derived") or {}).get("kv_pool_blocks")
    if (not isinstance(n, (int, float)) or n <= 0) and it.num_rows and "kv_blocks_free" in it.column_names:
        n = int((it.column("kv_blocks_used").to_numpy() + it.column("kv_blocks_free").to_numpy()).max())
    return int(n) if isinstance(n, (int, float)) and n > 0 else 1


def load_run(path: Path, problems: list) -> Run | None:
    """Read one run directory; append (location, message) problems instead of raising."""
    path = Path(path)
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a directory"
        problems.append((str(path), f"not a run directory: it {what} (expected a directory with "
                                    f"{', '.join(RUN_FILES)}, as `sim run` writes)"))
        return None
    unfinished = unfinished_problems(path)  # interrupted (.partial) or without its files
    if unfinished:
        problems.extend(unfinished)
        return None
    n0 = len(problems)
    req = _read_parquet(path / "requests.parquet", "requests", REQUEST_COLUMNS, problems)
    it = _read_parquet(path / "iterations.parquet", "iterations", ITERATION_COLUMNS, problems)
    summary_file = _read_json(path / "summary.json", problems)
    config = _read_yaml(path / "config.yaml", problems)
    if len(problems) > n0:
        return None
    tt = req.schema.field("token_times").type
    if not (pa.types.is_list(tt) or pa.types.is_large_list(tt)):
        problems.append((str(path / "requests.parquet"),
                         f"column token_times should be a list of emission times, not {tt}"))
        return None
    try:
        summary = summarize(req, it, kv_total_blocks=_kv_total_blocks(summary_file, config, it),
                            backend=str(summary_file.get("backend", "?")),
                            wall_s=float(summary_file.get("wall_s") or 0.0))
    except Exception as e:  # wrong column types and the like
        problems.append((str(path), f"cannot compute the summary metrics from its parquet files "
                                    f"({type(e).__name__}: {e})"))
        return None
    return Run(path, req, it, summary_file, config, summary)


# --------------------------------------------------------------------------- checks


def check_same_requests(a: Run, b: Run) -> None:
    """Raise ConfigError unless both runs hold the same requests (ids, arrivals, lengths)."""
    fa, fb = a.path / "requests.parquet", b.path / "requests.parquet"
    ra, rb = a.requests.sort_by("request_id"), b.requests.sort_by("request_id")
    ida, idb = ra.column("request_id").to_numpy(), rb.column("request_id").to_numpy()
    for run_file, ids in ((fa, ida), (fb, idb)):
        dup = ids[1:][ids[1:] == ids[:-1]]
        if len(dup):
            raise ConfigError(f"request {dup[0]} appears more than once", str(run_file))
    if not np.array_equal(ida, idb):
        only_a, only_b = np.setdiff1d(ida, idb), np.setdiff1d(idb, ida)
        first = min(x for x in (only_a[:1].tolist() + only_b[:1].tolist()))
        has, lacks = (fa, fb) if first in only_a[:1] else (fb, fa)
        raise ConfigError(
            f"the runs are not of the same requests: request {first} is in {has} but not in this "
            f"file ({len(only_a)} request(s) only in RUN_A, {len(only_b)} only in RUN_B)", str(lacks))
    bad: dict[str, np.ndarray] = {}
    for col in ("arrival_s", "prompt_len", "output_len"):
        xa, xb = ra.column(col).to_numpy(), rb.column(col).to_numpy()
        if col == "arrival_s":
            diff = ~np.isclose(xa, xb, rtol=1e-9, atol=ARRIVAL_ATOL_S)
        else:
            diff = xa != xb
        bad[col] = diff
    any_bad = np.logical_or.reduce(list(bad.values()))
    if any_bad.any():
        i = int(np.argmax(any_bad))
        col = next(c for c, d in bad.items() if d[i])
        va, vb = ra.column(col)[i].as_py(), rb.column(col)[i].as_py()
        n = int(any_bad.sum())
        raise ConfigError(
            f"the runs are not of the same requests: request {ida[i]} has {col} = {va} in RUN_A "
            f"({fa}) but {vb} here" + (f"; {n - 1} more request(s) differ" if n > 1 else ""),
            f"{fb}: request_id={ida[i]}, {col}")


def _flatten(d, prefix: str = "") -> dict:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = d
    return out


def _config_diff(a: Run, b: Run) -> dict:
    fa, fb = _flatten(a.config.get("config") or {}), _flatten(b.config.get("config") or {})
    return {k: [fa.get(k), fb.get(k)] for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}


# --------------------------------------------------------------------------- numbers


def _num(x) -> float | None:
    if x is None or isinstance(x, bool):
        return None
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def rel_err(a, b) -> float | None:
    """(b - a) / a; 0 when both are 0; None when undefined."""
    a, b = _num(a), _num(b)
    if a is None or b is None:
        return None
    if a == 0:
        return 0.0 if b == 0 else None
    return (b - a) / a


def metric_rows(a: Run, b: Run) -> list[dict]:
    rows = []
    for k in LATENCY_KEYS:
        for s in STATS:
            va, vb = _num(a.summary[k][s]), _num(b.summary[k][s])
            rows.append({"metric": k, "stat": s, "a": va, "b": vb, "rel_err": rel_err(va, vb)})
    for k in SCALARS:
        va, vb = _num(a.summary[k]), _num(b.summary[k])
        rows.append({"metric": k, "stat": "value", "a": va, "b": vb, "rel_err": rel_err(va, vb)})
    ea, eb = _num(a.summary_file.get(ENERGY)), _num(b.summary_file.get(ENERGY))
    if ea is not None and eb is not None:
        rows.append({"metric": ENERGY, "stat": "value", "a": ea, "b": eb, "rel_err": rel_err(ea, eb)})
    return rows


def _stale_summary(run: Run) -> list[str]:
    """Metrics where summary.json disagrees with what its parquet files give."""
    out = []
    for k in LATENCY_KEYS:
        for s in STATS:
            f = (run.summary_file.get(k) or {}).get(s) if isinstance(run.summary_file.get(k), dict) else None
            if not _close(f, run.summary[k][s]):
                out.append(f"{k}.{s}")
    for k in SCALARS:
        if not _close(run.summary_file.get(k), run.summary[k]):
            out.append(k)
    return out


def _close(x, y) -> bool:
    x, y = _num(x), _num(y)
    if x is None or y is None:
        return x is None and y is None
    return math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-12)


def _per_request(run: Run) -> dict[str, np.ndarray]:
    r = run.requests.sort_by("request_id")
    col = lambda c: r.column(c).to_numpy(zero_copy_only=False)  # noqa: E731
    fin = col("status") == "finished"
    arrival, first, last = col("arrival_s"), col("first_token_s"), col("finish_s")
    out = col("output_len")
    nan = np.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(out > 1, (last - first) / np.maximum(out - 1, 1), nan)
    return {"fin": fin, "ttft_s": np.where(fin, first - arrival, nan),
            "tpot_s": np.where(fin, tpot, nan), "e2e_s": np.where(fin, last - arrival, nan)}


def paired_request_errors(a: Run, b: Run) -> dict:
    pa_, pb = _per_request(a), _per_request(b)
    both = pa_["fin"] & pb["fin"]
    res: dict = {
        "num_requests": int(len(both)),
        "finished_both": int(both.sum()),
        "finished_only_a": int((pa_["fin"] & ~pb["fin"]).sum()),
        "finished_only_b": int((pb["fin"] & ~pa_["fin"]).sum()),
    }
    for k in ("ttft_s", "tpot_s", "e2e_s"):
        xa, xb = pa_[k], pb[k]
        m = both & np.isfinite(xa) & np.isfinite(xb) & (xa > 0)
        r = (xb[m] - xa[m]) / xa[m]
        if len(r):
            ar = np.abs(r)
            res[k] = {"n": int(m.sum()), "median_abs_rel_err": float(np.median(ar)),
                      "p90_abs_rel_err": float(np.percentile(ar, 90)), "mean_rel_err": float(r.mean())}
        else:
            res[k] = {"n": 0, "median_abs_rel_err": None, "p90_abs_rel_err": None, "mean_rel_err": None}
    return res


def _iter_frame(it: pa.Table) -> pd.DataFrame:
    df = pd.DataFrame({c: it.column(c).to_numpy() for c in ITERATION_KEY + ("duration_s",)})
    df[list(ITERATION_KEY)] = df[list(ITERATION_KEY)].astype(np.int64)
    return df


def _phase(ctx_req: np.ndarray, gen_req: np.ndarray) -> np.ndarray:
    return np.select([(ctx_req > 0) & (gen_req == 0), (ctx_req == 0) & (gen_req > 0), (ctx_req > 0) & (gen_req > 0)],
                     list(PHASES), default="empty")


def _mape(rel: np.ndarray, w: np.ndarray) -> float | None:
    return float((np.abs(rel) * w).sum() / w.sum()) if w.sum() > 0 else None


def iteration_errors(a: Run, b: Run) -> dict:
    da, db = _iter_frame(a.iterations), _iter_frame(b.iterations)
    key = list(ITERATION_KEY)
    ga = da.groupby(key, sort=True)["duration_s"].agg(count="size", mean="mean", total="sum").reset_index()
    gb = db.groupby(key, sort=True)["duration_s"].agg(count="size", mean="mean", total="sum").reset_index()
    m = ga.merge(gb, on=key, suffixes=("_a", "_b"), how="inner")
    m = m[m["mean_a"] > 0]
    rel = ((m["mean_b"] - m["mean_a"]) / m["mean_a"]).to_numpy()
    w = m["count_a"].to_numpy().astype(np.float64)
    phase = _phase(m["num_ctx_requests"].to_numpy(), m["num_gen_requests"].to_numpy())
    n_a, n_b = len(da), len(db)
    res: dict = {
        "key": key,
        "weighting": "count_a",
        "num_iterations_a": n_a,
        "num_iterations_b": n_b,
        "num_keys_a": int(len(ga)),
        "num_keys_b": int(len(gb)),
        "matched_keys": int(len(m)),
        "coverage_a": float(m["count_a"].sum() / n_a) if n_a else None,
        "coverage_b": float(m["count_b"].sum() / n_b) if n_b else None,
        "coverage_time_a": (float(m["total_a"].sum() / da["duration_s"].sum())
                            if da["duration_s"].sum() > 0 else None),
        "mape": _mape(rel, w),
        "by_phase": {},
    }
    for p in PHASES:
        sel = phase == p
        res["by_phase"][p] = {
            "mape": _mape(rel[sel], w[sel]),
            "matched_keys": int(sel.sum()),
            "matched_iterations_a": int(m["count_a"].to_numpy()[sel].sum()),
            "matched_iterations_b": int(m["count_b"].to_numpy()[sel].sum()),
        }
    cols = [m[c].tolist() for c in key + ["count_a", "count_b", "mean_a", "mean_b"]]
    res["matched"] = [
        {**dict(zip(key, row[:4])), "phase": str(ph), "count_a": row[4], "count_b": row[5],
         "mean_s_a": row[6], "mean_s_b": row[7], "rel_err": float(r)}
        for row, ph, r in zip(zip(*cols), phase, rel.tolist())
    ]
    # the simpler view: median duration of decode-only iterations per batch size
    dec = []
    for d in (da, db):
        sel = d[(d["num_ctx_requests"] == 0) & (d["num_gen_requests"] > 0)]
        dec.append(sel.groupby("num_gen_requests")["duration_s"].agg(count="size", median="median"))
    t = dec[0].merge(dec[1], left_index=True, right_index=True, how="outer", suffixes=("_a", "_b")).sort_index()
    res["decode_median_by_batch_size"] = [
        {"batch_size": int(bs), "count_a": int(_num(row["count_a"]) or 0), "count_b": int(_num(row["count_b"]) or 0),
         "median_s_a": _num(row["median_a"]), "median_s_b": _num(row["median_b"]),
         "rel_err": rel_err(row["median_a"], row["median_b"])}
        for bs, row in t.iterrows()
    ]
    return res


def log2_bucket(x) -> np.ndarray:
    """0 for 0 tokens, else b with 2**(b-1) <= x < 2**b (1 -> 1, 2-3 -> 2, 4-7 -> 3, ...)."""
    x = np.asarray(x, dtype=np.int64)
    if (x < 0).any():
        raise ValueError("token counts must be >= 0")
    out = np.zeros(x.shape, dtype=np.int64)
    pos = x > 0
    # exact for integers: frexp gives x = m * 2**e with 0.5 <= m < 1, so e = floor(log2 x) + 1
    out[pos] = np.frexp(x[pos].astype(np.float64))[1]
    return out


def bucket_range(b: int) -> tuple[int, int]:
    """The token counts (lo, hi) inclusive of log2 bucket b."""
    return (0, 0) if b == 0 else (1 << (b - 1), (1 << b) - 1)


def iteration_errors_by_context(a: Run, b: Run) -> dict:
    """`iteration_errors` with the key extended by the attended context's log2 buckets (the
    chunks' cached tokens, the generation requests' KV): iterations of the same batch that
    attend to other contexts in the two runs are not paired."""
    frames = []
    for run in (a, b):
        d = _iter_frame(run.iterations)
        it = run.iterations
        d["ctx_attended_bucket"] = log2_bucket(it.column("ctx_cached_tokens").fill_null(0).to_numpy())
        d["decode_kv_bucket"] = log2_bucket(it.column("decode_kv_tokens").fill_null(0).to_numpy())
        frames.append(d)
    da, db = frames
    key = list(ITERATION_KEY + CONTEXT_KEY)
    ga = da.groupby(key, sort=True)["duration_s"].agg(count="size", mean="mean").reset_index()
    gb = db.groupby(key, sort=True)["duration_s"].agg(count="size", mean="mean").reset_index()
    m = ga.merge(gb, on=key, suffixes=("_a", "_b"), how="inner")
    m = m[m["mean_a"] > 0]
    rel = ((m["mean_b"] - m["mean_a"]) / m["mean_a"]).to_numpy()
    w = m["count_a"].to_numpy().astype(np.float64)
    phase = _phase(m["num_ctx_requests"].to_numpy(), m["num_gen_requests"].to_numpy())
    n_a = len(da)
    res: dict = {
        "key": key,
        "bucket": "log2: 0 tokens -> 0, else b with 2**(b-1) <= tokens < 2**b",
        "weighting": "count_a",
        "matched_keys": int(len(m)),
        "coverage_a": float(m["count_a"].sum() / n_a) if n_a else None,
        "coverage_b": float(m["count_b"].sum() / len(db)) if len(db) else None,
        "mape": _mape(rel, w),
        "by_phase": {p: {"mape": _mape(rel[phase == p], w[phase == p]),
                         "matched_iterations_a": int(w[phase == p].sum())} for p in PHASES},
    }
    # by the chunks' context (iterations with context chunks): where a prefill price goes wrong
    ctx_b = m["ctx_attended_bucket"].to_numpy()
    has_ctx = m["num_ctx_requests"].to_numpy() > 0
    a_ctx = da[da["num_ctx_requests"] > 0]
    n_by_bucket = a_ctx.groupby("ctx_attended_bucket").size()
    rows = []
    for bk, n in n_by_bucket.items():
        sel = has_ctx & (ctx_b == bk)
        lo, hi = bucket_range(int(bk))
        rows.append({"bucket": int(bk), "tokens_lo": lo, "tokens_hi": hi, "iterations_a": int(n),
                     "matched_iterations_a": int(w[sel].sum()), "mape": _mape(rel[sel], w[sel]),
                     "mean_rel_err": float((rel[sel] * w[sel]).sum() / w[sel].sum()) if w[sel].sum() else None})
    res["by_ctx_attended"] = rows
    return res


def _phase_spans(run: Run) -> dict[str, np.ndarray]:
    """Per finished request (by request_id): each REQUEST_PHASES span and E2E, in seconds."""
    r = run.requests.sort_by("request_id")
    col = lambda c: r.column(c).to_numpy(zero_copy_only=False).astype(np.float64)  # noqa: E731
    fin = r.column("status").to_numpy(zero_copy_only=False) == "finished"
    out = {k: np.where(fin, col(end) - col(start), np.nan) for k, (start, end) in REQUEST_PHASES.items()}
    out["e2e_s"] = np.where(fin, col("finish_s") - col("arrival_s"), np.nan)
    return out


def request_phases(a: Run, b: Run) -> dict:
    """Where each request's time went in both runs: queueing, prefill span, decode span
    (their distributions over the requests finished in both, and the relative errors),
    and the mean E2E difference split exactly into the three phases' mean differences
    (E2E = queueing + prefill span + decode span for every request)."""
    sa, sb = _phase_spans(a), _phase_spans(b)
    both = np.isfinite(sa["e2e_s"]) & np.isfinite(sb["e2e_s"])
    for k in REQUEST_PHASES:
        both &= np.isfinite(sa[k]) & np.isfinite(sb[k])
    e2e_a = float(sa["e2e_s"][both].mean()) if both.any() else None
    res: dict = {"n": int(both.sum()), "e2e_mean_s_a": e2e_a,
                 "e2e_mean_diff_s": float((sb["e2e_s"][both] - sa["e2e_s"][both]).mean()) if both.any() else None,
                 "phases": {}}
    for k in REQUEST_PHASES:
        xa, xb = sa[k][both], sb[k][both]
        da_, db_ = dist(xa), dist(xb)
        diff = float((xb - xa).mean()) if len(xa) else None
        res["phases"][k] = {
            "a": da_, "b": db_, "rel_err": {s: rel_err(da_[s], db_[s]) for s in STATS},
            "mean_diff_s": diff,
            # this phase's part of the mean E2E error, as a fraction of A's mean E2E
            "share_of_e2e_a": diff / e2e_a if diff is not None and e2e_a else None,
        }
    return res


def _token_times(run: Run) -> np.ndarray:
    tt = run.requests.column("token_times")
    if tt.num_chunks == 0:
        return np.zeros(0)
    v = pc.list_flatten(tt).to_numpy(zero_copy_only=False).astype(np.float64)
    return v[np.isfinite(v)]


def throughput_over_time(a: Run, b: Run, bins: int) -> dict:
    ta, tb = _token_times(a), _token_times(b)
    arr = a.requests.column("arrival_s").to_numpy()
    t0 = float(arr.min()) if len(arr) else 0.0
    ends = [float(x.max()) for x in (ta, tb) if len(x)]
    t1 = max(ends) if ends else t0
    if t1 <= t0:
        return {"t0_s": t0, "bin_s": None, "bin_start_s": [], "out_tok_s_a": [], "out_tok_s_b": []}
    edges = np.linspace(t0, t1, bins + 1)
    width = float(edges[1] - edges[0])
    ca, _ = np.histogram(ta, bins=edges)
    cb, _ = np.histogram(tb, bins=edges)
    return {"t0_s": t0, "bin_s": width, "bin_start_s": edges[:-1].tolist(),
            "out_tok_s_a": (ca / width).tolist(), "out_tok_s_b": (cb / width).tolist()}


def _run_info(run: Run) -> dict:
    cfg = run.config.get("config") or {}
    return {
        "path": str(run.path),
        "experiment": run.config.get("experiment"),
        "variant": run.config.get("variant"),
        "backend": run.summary_file.get("backend"),
        "model": cfg.get("model"),
        "hardware": cfg.get("hardware"),
        "code_version": run.config.get("code_version"),
        "num_requests": run.summary["num_requests"],
        "num_finished": run.summary["num_finished"],
        "num_iterations": run.summary["num_iterations"],
    }


def _clean(x):
    """JSON-safe: NaN/inf become null, numpy scalars become Python numbers."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return _num(x)
    return x


# --------------------------------------------------------------------------- entry point


def compare_runs(run_a: Path, run_b: Path, out: Path | None = None, *, bins: int = 60,
                 quiet: bool = False) -> dict:
    """Compare RUN_A (reference) with RUN_B; write compare.json and compare.png; return the dict."""
    run_a, run_b = Path(run_a), Path(run_b)
    problems: list = []
    a = load_run(run_a, problems)
    b = load_run(run_b, problems)
    if problems:
        raise ConfigError(problems)
    check_same_requests(a, b)
    # before the work: a folder compare.json and compare.png can be written to
    check_output_dir(Path(out) if out is not None else run_b,
                     "command line: --out" if out is not None else "command line: RUN_B (where compare.json goes "
                     "without --out)")
    out = Path(out) if out is not None else run_b

    warnings: list[str] = []
    ca, cb = a.config.get("config") or {}, b.config.get("config") or {}
    for k in ("model", "hardware"):
        if ca.get(k) != cb.get(k):
            warnings.append(f"the runs differ in {k}: {ca.get(k)!r} (A) vs {cb.get(k)!r} (B)")
    for name, run in (("A", a), ("B", b)):
        stale = _stale_summary(run)
        if stale:
            warnings.append(f"{run.path / 'summary.json'} ({name}) disagrees with its parquet files on "
                            f"{', '.join(stale[:4])}{' ...' if len(stale) > 4 else ''}; "
                            f"compare uses the values recomputed from the parquet files")
    requests = paired_request_errors(a, b)
    if requests["finished_only_a"] or requests["finished_only_b"]:
        warnings.append(f"{requests['finished_only_a']} request(s) finished only in A and "
                        f"{requests['finished_only_b']} only in B; per-request errors use the "
                        f"{requests['finished_both']} finished in both")
    iterations = iteration_errors(a, b)
    by_context = iteration_errors_by_context(a, b)
    phases = request_phases(a, b)
    if iterations["coverage_a"] is not None and iterations["coverage_a"] < 0.5:
        warnings.append(f"only {iterations['coverage_a']:.0%} of A's iterations have a batch composition "
                        f"that B also ran; the iteration MAPE covers those only")

    result = _clean({
        "schema_version": SCHEMA_VERSION,
        "reference": "a",
        "rel_err": "(b - a) / a",
        "run_a": _run_info(a),
        "run_b": _run_info(b),
        "warnings": warnings,
        "config_diff": _config_diff(a, b),
        "metrics": metric_rows(a, b),
        "requests": requests,
        "iterations": iterations,
        "iterations_by_context": by_context,
        "request_phases": phases,
        "throughput_over_time": throughput_over_time(a, b, bins),
    })
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    plot_compare(a, b, result, out / "compare.png")
    if not quiet:
        print_compare(result, out)
    return result


# --------------------------------------------------------------------------- output


def _console(stderr: bool = False):
    from rich.console import Console

    # like the CLI's console: when the output is a pipe or a file, do not wrap at 80 columns
    width = max(shutil.get_terminal_size((200, 40)).columns, 120)
    return Console(stderr=stderr, highlight=False, width=width)


def _label(info: dict) -> str:
    name = info.get("variant") or Path(info["path"]).name
    return f"{name} ({info.get('backend') or '?'})"


def _fmt_err(e: float | None, signed: bool = True) -> str:
    if e is None:
        return "[dim]-[/]"
    colour = "red" if abs(e) > HIGHLIGHT else "green"
    return f"[{colour}]{e:+.1%}[/]" if signed else f"[{colour}]{e:.1%}[/]"


PHASE_LABELS = {"queueing_s": "queueing (s)", "prefill_span_s": "prefill span (s)", "decode_span_s": "decode span (s)"}


def _secs(v: float | None, signed: bool = False) -> str:
    return "-" if v is None else (f"{v:+.4f}" if signed else f"{v:.4f}")


def print_compare(result: dict, out: Path) -> None:
    from rich.table import Table

    err = _console(stderr=True)
    for w in result["warnings"]:
        err.print(f"[bold yellow]warning:[/] {w}", soft_wrap=True)
    con = _console()
    ia, ib = result["run_a"], result["run_b"]
    con.print(f"[bold]A[/] (reference) {ia['path']}: {_label(ia)}", soft_wrap=True)
    con.print(f"[bold]B[/] {ib['path']}: {_label(ib)}", soft_wrap=True)
    t = Table(title="sim compare: A vs B", caption=f"relative error = (B - A) / A, red above {HIGHLIGHT:.0%}")
    t.add_column("metric")
    t.add_column("stat")
    t.add_column("A", justify="right")
    t.add_column("B", justify="right")
    t.add_column("rel. error", justify="right")
    last = None
    for r in result["metrics"]:
        label, scale, f = _DISPLAY[r["metric"]]
        show = lambda v: "-" if v is None else f.format(v * scale)  # noqa: E731
        t.add_row(label if r["metric"] != last else "", r["stat"], show(r["a"]), show(r["b"]),
                  _fmt_err(r["rel_err"]))
        last = r["metric"]
    t.add_section()
    req = result["requests"]
    for k, name in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "E2E")):
        t.add_row(f"per request: {name}", "median |rel err|", "", f"{req[k]['n']} pairs",
                  _fmt_err(req[k]["median_abs_rel_err"], signed=False))
    it = result["iterations"]
    t.add_row("iteration duration", "MAPE", f"{it['num_iterations_a']} its", f"{it['num_iterations_b']} its",
              _fmt_err(it["mape"], signed=False))
    for p in PHASES:
        ph = it["by_phase"][p]
        t.add_row("", f"MAPE {p}", f"{ph['matched_iterations_a']} matched", f"{ph['matched_iterations_b']} matched",
                  _fmt_err(ph["mape"], signed=False))
    ic = result["iterations_by_context"]
    t.add_row("same + attended context", "MAPE", f"{ic['coverage_a']:.0%} of A's its" if ic["coverage_a"] is not None
              else "", "", _fmt_err(ic["mape"], signed=False))
    for p in PHASES:
        ph = ic["by_phase"][p]
        t.add_row("", f"MAPE {p}", f"{ph['matched_iterations_a']} matched", "", _fmt_err(ph["mape"], signed=False))
    for r in ic["by_ctx_attended"]:
        t.add_row("", "chunks attend no cache" if r["bucket"] == 0 else
                  f"chunks attend {r['tokens_lo']:,}-{r['tokens_hi']:,}",
                  f"{r['matched_iterations_a']}/{r['iterations_a']} matched", _fmt_err(r["mean_rel_err"]),
                  _fmt_err(r["mape"], signed=False))
    t.add_section()
    rp = result["request_phases"]
    for k, name in PHASE_LABELS.items():
        ph = rp["phases"][k]
        for s in STATS:
            t.add_row(name if s == "mean" else "", s, _secs(ph["a"][s]), _secs(ph["b"][s]), _fmt_err(ph["rel_err"][s]))
        t.add_row("", "part of mean E2E err", _secs(ph["mean_diff_s"], signed=True), "of A's mean E2E",
                  _fmt_err(ph["share_of_e2e_a"]))
    con.print(t)
    con.print(f"[dim]-> {out / 'compare.json'}, {out / 'compare.png'}[/]", soft_wrap=True)


def plot_compare(a: Run, b: Run, result: dict, path: Path) -> None:
    """Throughput over time, TTFT and TPOT CDFs, iteration durations A vs B (one PNG)."""
    from .metrics import request_latencies
    from .plots import _cdf, plt

    la, lb = _label(result["run_a"]), _label(result["run_b"])
    fig, axes = plt.subplots(3, 2, figsize=(12, 12.5))
    ax = axes[0, 0]
    tot = result["throughput_over_time"]
    if tot["bin_s"]:
        mid = np.asarray(tot["bin_start_s"]) + tot["bin_s"] / 2
        ax.plot(mid, tot["out_tok_s_a"], label=f"A: {la}", lw=1.5)
        ax.plot(mid, tot["out_tok_s_b"], label=f"B: {lb}", lw=1.5, ls="--")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("output tokens / s")
    ax.set_title("throughput over time")
    for ax, k, scale, xlabel in ((axes[0, 1], "ttft_s", 1.0, "time to first token (s)"),
                                 (axes[1, 0], "tpot_s", 1e3, "time per output token (ms)")):
        for run, name in ((a, f"A: {la}"), (b, f"B: {lb}")):
            _cdf(ax, request_latencies(run.requests)[k] * scale, name)
        if k == "ttft_s":
            ax.set_xscale("log")
            xlabel += ", log scale"
        ax.set_xlabel(xlabel)
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{k.split('_')[0].upper()} CDF")
    ax = axes[1, 1]
    matched = result["iterations"]["matched"]
    colours = {"prefill": "tab:blue", "decode": "tab:orange", "mixed": "tab:green"}
    lo, hi = math.inf, 0.0
    for p in PHASES:
        xs = np.array([m["mean_s_a"] for m in matched if m["phase"] == p]) * 1e3
        ys = np.array([m["mean_s_b"] for m in matched if m["phase"] == p]) * 1e3
        n = np.array([m["count_a"] for m in matched if m["phase"] == p])
        if len(xs):
            mape = result["iterations"]["by_phase"][p]["mape"]
            ax.scatter(xs, ys, s=8 + 40 * np.sqrt(n / n.max()), alpha=0.6, color=colours[p],
                       label=f"{p} ({len(xs)} keys, MAPE {mape:.1%})")
            lo, hi = min(lo, xs.min(), ys.min()), max(hi, xs.max(), ys.max())
    if hi > 0:
        line = np.array([lo, hi])
        ax.plot(line, line, color="gray", lw=1)
        ax.plot(line, line * 1.1, color="gray", lw=0.7, ls=":")
        ax.plot(line, line / 1.1, color="gray", lw=0.7, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
    mape = result["iterations"]["mape"]
    ax.set_title("iteration duration, same batch composition"
                 + (f" (MAPE {mape:.1%})" if mape is not None else ""))
    ax.set_xlabel("A: mean duration (ms)")
    ax.set_ylabel("B: mean duration (ms)")
    _plot_phases(axes[2, 0], result["request_phases"])
    _plot_context(axes[2, 1], result["iterations_by_context"])
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"A = {result['run_a']['path']}  vs  B = {result['run_b']['path']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_phases(ax, rp: dict) -> None:
    """Per-request phases: p50 and p99 of each in A and B (log scale), the phase's part of
    the mean E2E error in the labels."""
    names = list(PHASE_LABELS)
    x = np.arange(len(names))
    for j, (run, s, hatch) in enumerate((("a", "p50", ""), ("b", "p50", ""), ("a", "p99", "//"), ("b", "p99", "//"))):
        vals = [rp["phases"][k][run][s] or 0.0 for k in names]
        ax.bar(x + (j - 1.5) * 0.2, vals, width=0.2, hatch=hatch, color="tab:blue" if run == "a" else "tab:orange",
               alpha=0.9 if s == "p50" else 0.5, label=f"{run.upper()} {s}")
    shares = [rp["phases"][k]["share_of_e2e_a"] for k in names]
    ax.set_xticks(x, [f"{PHASE_LABELS[k].split(' (')[0]}\n{'-' if v is None else f'{v:+.1%}'} of E2E"
                      for k, v in zip(names, shares)])
    if any((rp["phases"][k][r][s] or 0) > 0 for k in names for r in "ab" for s in ("p50", "p99")):
        ax.set_yscale("log")
    ax.set_ylabel("seconds")
    ax.set_title("per request: queueing, prefill span, decode span")


def _plot_context(ax, ic: dict) -> None:
    """Iteration MAPE (same batch and attended context) by the chunks' attended context."""
    rows = [r for r in ic["by_ctx_attended"] if r["mape"] is not None]
    if rows:
        x = np.arange(len(rows))
        ax.bar(x, [100 * r["mape"] for r in rows], color="tab:green", alpha=0.8, label="MAPE")
        ax.plot(x, [100 * (r["mean_rel_err"] or 0.0) for r in rows], "ko-", ms=4, label="mean signed error")
        ax.set_xticks(x, ["none" if r["bucket"] == 0 else f"{r['tokens_lo']:,}-\n{r['tokens_hi']:,}" for r in rows],
                      fontsize=7)
        ax.axhline(0, color="gray", lw=0.7)
    ax.set_xlabel("tokens the chunks attend to (cached + earlier chunks)")
    ax.set_ylabel("%")
    mape = ic["mape"]
    ax.set_title("iterations with chunks, same batch + context" + (f"\n(every iteration: MAPE {mape:.1%})"
                                                                     if mape is not None else ""), fontsize=10)
