"""Workload transforms: each takes a workload table and returns a new one (the input
is never modified). They keep ``df.attrs`` (``hash_block_size``) and the row order."""

from __future__ import annotations

import numpy as np
import pandas as pd

from servesim.traces.schema import HASH_BLOCK_SIZE, present_columns


def _copy(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()  # tuple cells are immutable, a shallow copy of them is enough
    out.attrs = dict(df.attrs)
    return out


def mean_rate(df: pd.DataFrame) -> float:
    """Requests per second as ``(N - 1) / (last arrival - first arrival)``; NaN when the
    span is zero (offline, or a single request)."""
    arr = df["arrival_s"].to_numpy()
    span = float(arr[-1] - arr[0]) if arr.size else 0.0
    return (arr.size - 1) / span if span > 0 else float("nan")


def scale_rate(df: pd.DataFrame, rate_scale: float) -> pd.DataFrame:
    """Multiply the arrival rate by ``rate_scale``: gaps between arrivals shrink by that
    factor (2.0 halves the span); the first arrival stays where it is."""
    if not (rate_scale > 0 and np.isfinite(rate_scale)):
        raise ValueError(f"rate_scale must be a positive finite number, got {rate_scale}")
    out = _copy(df)
    if rate_scale != 1.0 and len(out):
        arr = out["arrival_s"].to_numpy()
        out["arrival_s"] = arr[0] + (arr - arr[0]) / rate_scale
    return out


def set_rate(df: pd.DataFrame, target_rate_req_s: float) -> pd.DataFrame:
    """Rescale arrivals so that :func:`mean_rate` equals ``target_rate_req_s``."""
    current = mean_rate(df)
    if not np.isfinite(current):
        raise ValueError("cannot set the arrival rate of a workload whose arrivals all coincide (span 0)")
    return scale_rate(df, target_rate_req_s / current)


def first_n(df: pd.DataFrame, n: int) -> pd.DataFrame:
    """The first ``n`` requests (all of them if there are fewer)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out = _copy(df.iloc[:n])
    return out.reset_index(drop=True)


def time_window(df: pd.DataFrame, start_s: float, end_s: float) -> pd.DataFrame:
    """Requests arriving in ``[start_s, end_s)``, re-based so that ``start_s`` becomes 0
    (the gap from the window's start to its first request is kept)."""
    if not end_s > start_s:
        raise ValueError(f"the window needs start < end, got [{start_s}, {end_s})")
    arr = df["arrival_s"].to_numpy()
    keep = (arr >= start_s) & (arr < end_s)
    out = _copy(df.loc[keep]).reset_index(drop=True)
    out["arrival_s"] = out["arrival_s"].to_numpy() - float(start_s)
    return out


def make_offline(df: pd.DataFrame) -> pd.DataFrame:
    """Every request arrives at t = 0."""
    out = _copy(df)
    out["arrival_s"] = np.zeros(len(out), dtype=np.float64)
    return out


def with_arrivals(df: pd.DataFrame, arrival_s: np.ndarray) -> pd.DataFrame:
    """Replace the arrival times (requests keep their order; ``arrival_s`` must be
    sorted and as long as the table)."""
    arrival_s = np.asarray(arrival_s, dtype=np.float64)
    if arrival_s.shape != (len(df),):
        raise ValueError(f"need {len(df)} arrival times, got {arrival_s.shape}")
    out = _copy(df)
    out["arrival_s"] = arrival_s
    return out


def cap_lengths(df: pd.DataFrame, max_prompt_len: int | None = None, max_output_len: int | None = None) -> pd.DataFrame:
    """Truncate prompts and outputs to at most the given lengths. Truncated prompts keep
    their leading ``prompt_tokens`` and the ``block_hashes`` of the blocks that remain."""
    out = _copy(df)
    if max_output_len is not None:
        if max_output_len < 1:
            raise ValueError(f"max_output_len must be >= 1, got {max_output_len}")
        out["output_len"] = np.minimum(out["output_len"].to_numpy(), max_output_len)
    if max_prompt_len is not None:
        if max_prompt_len < 1:
            raise ValueError(f"max_prompt_len must be >= 1, got {max_prompt_len}")
        plen = out["prompt_len"].to_numpy()
        cut = np.flatnonzero(plen > max_prompt_len)
        out["prompt_len"] = np.minimum(plen, max_prompt_len)
        if cut.size and "prompt_tokens" in out.columns:
            col = out["prompt_tokens"].to_numpy(dtype=object).copy()
            for i in cut:
                if col[i] is not None:
                    col[i] = col[i][:max_prompt_len]
            out["prompt_tokens"] = col
        if cut.size and "block_hashes" in out.columns:
            bs = int(out.attrs[HASH_BLOCK_SIZE])
            nblocks = -(-max_prompt_len // bs)
            col = out["block_hashes"].to_numpy(dtype=object).copy()
            for i in cut:
                if col[i] is not None:
                    col[i] = col[i][:nblocks]
            out["block_hashes"] = col
    return out


def fill_slo(df: pd.DataFrame, ttft_s: float | None = None, tpot_s: float | None = None) -> pd.DataFrame:
    """Give rows without their own SLO (NaN or no column) the default ``ttft_s`` /
    ``tpot_s``; None leaves a column as it is."""
    out = _copy(df)
    for col, value in (("slo_ttft_s", ttft_s), ("slo_tpot_s", tpot_s)):
        if value is None:
            continue
        cur = out[col].to_numpy(dtype=np.float64) if col in out.columns else np.full(len(out), np.nan)
        out[col] = np.where(np.isnan(cur), float(value), cur)
    return _reorder(out)


def renumber(df: pd.DataFrame) -> pd.DataFrame:
    """request_id = 0..N-1 in row order."""
    out = _copy(df)
    out["request_id"] = np.arange(len(out), dtype=np.int64)
    return out


def _reorder(df: pd.DataFrame) -> pd.DataFrame:
    cols = present_columns(df)
    if list(df.columns) == cols:
        return df
    out = df[cols]
    out.attrs = dict(df.attrs)
    return out
