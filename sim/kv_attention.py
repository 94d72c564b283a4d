"""The decode attention kernel alone per KV-cache dtype: its calibration table and the fit of
the cost model's `kv_dequant_elements_per_s` (sim/cost_model.py).

A calibration table (CSV) holds one row per measured kernel: ``kv_dtype`` (bf16 / fp8),
``batch``, ``ctx``, ``us`` (one layer's paged decode attention, microseconds), ``config``
(the kernel's label) and ``source``. Per dtype the fit is a line ``us = fixed + slope x
tokens`` (tokens = batch x ctx, least squares); the fp8 kernel's elements per second is its
KV elements per token (``2 x kv_heads x head_dim``) over its slope -- a bound of its own
beside the bytes over the KV bandwidth, which the cost model takes the larger of. Only the
kernel table is read: the decode *step* ratios are the held-out test
(benchmarks/gpu_kv_fp8.py).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

COLUMNS = ("kv_dtype", "batch", "ctx", "us", "config", "source")
KV_DTYPES = ("bf16", "fp8")


def read_table(path: Path) -> list[dict]:
    """The rows of a calibration table; ValueError naming the file, row and column."""
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as e:
        raise ValueError(f"decode attention calibration {path}: {e}") from None
    out = []
    for i, r in enumerate(rows, start=2):
        missing = [c for c in COLUMNS[:4] if not (r.get(c) or "").strip()]
        if missing:
            raise ValueError(f"{path}:{i}: missing {', '.join(missing)}")
        if r["kv_dtype"] not in KV_DTYPES:
            raise ValueError(f"{path}:{i}: kv_dtype must be one of {KV_DTYPES}, got {r['kv_dtype']!r}")
        try:
            row = dict(r, batch=int(r["batch"]), ctx=int(r["ctx"]), us=float(r["us"]))
        except ValueError as e:
            raise ValueError(f"{path}:{i}: {e}") from None
        if row["batch"] < 1 or row["ctx"] < 1 or not row["us"] > 0:
            raise ValueError(f"{path}:{i}: batch, ctx and us must be positive")
        out.append(row)
    return out


def write_table(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def fit_line(rows: list[dict], kv_dtype: str) -> tuple[float, float]:
    """(fixed seconds, seconds per cached token) of one layer's kernel for ``kv_dtype``."""
    sel = [r for r in rows if r["kv_dtype"] == kv_dtype]
    if len({r["batch"] * r["ctx"] for r in sel}) < 2:
        raise ValueError(f"decode attention calibration: {kv_dtype} needs >= 2 KV sizes, has {len(sel)} row(s)")
    t = np.array([r["batch"] * r["ctx"] for r in sel], float)
    y = np.array([r["us"] for r in sel], float) * 1e-6
    a, s = np.linalg.lstsq(np.c_[np.ones_like(t), t], y, rcond=None)[0]
    return float(a), float(s)


def fit_dequant_rate(rows: list[dict], kv_heads: int, head_dim: int) -> float:
    """`kv_dequant_elements_per_s` of the fp8 kernel: its KV elements per cached token over
    its fitted seconds per token."""
    _, slope = fit_line(rows, "fp8")
    if not slope > 0:
        raise ValueError(f"decode attention calibration: the fp8 kernel's time does not grow with the KV "
                         f"(slope {slope:.3g} s/token)")
    return 2.0 * kv_heads * head_dim / slope
