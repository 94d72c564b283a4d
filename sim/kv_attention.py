"""The decode attention kernel alone per KV-cache dtype: its calibration table, the fit of
the roofline's `kv_dequant_elements_per_s`, and a calibrated profile's per-batch kernel lines
(`DecodeAttentionKernel`, sim/cost_model.py's ``decode_attention_kernel``).

A calibration table (CSV) holds one row per measured kernel: ``kv_dtype`` (bf16 / fp8),
``batch``, ``ctx``, ``us`` (one layer's paged decode attention, microseconds), ``config``
(the kernel's label) and ``source``. Per dtype the fit is a line ``us = fixed + slope x
tokens`` (tokens = batch x ctx, least squares); the fp8 kernel's elements per second is its
KV elements per token (``2 x kv_heads x head_dim``) over its slope -- a bound of its own
beside the bytes over the KV bandwidth, which the cost model takes the larger of. Only the
kernel table is read: the decode *step* ratios are the held-out test
(benchmarks/gpu_kv_fp8.py).

A calibrated profile prices decode attention from its serving grid: the fitted per-KV-token
term (``kv_bandwidth_efficiency``) is what a cached token cost in the grid's served steps,
of the grid's own KV dtype -- the attention kernel plus whatever else grows with the KV
there (on the H200 1.30 ns / token / layer against the kernel's 1.09 alone). Only the
kernel depends on the KV dtype, so a profile that carries the kernel alone per dtype
(`DecodeAttentionKernel`: per measured batch a line ``fixed + per_token x tokens`` of one
layer, `fit_kernel`) prices another dtype's step as the grid's plus the kernel-alone
difference at that batch (`kernel_delta`: linear in the batch between the measured ones,
the nearest beyond them); the remainder stays as fitted. A profile without it prices as
before.

At long contexts (`LongContextKernel`, the calibration's kv-long sweep) the kernel's per-token
slope is corrected per batch, and the kernel's split bound (`SplitBound`: the split count the
GPU's tuning table gives the batch, kernels/tuning_table.py) bounds a decode step's KV part
from below by the SM that walks the batch's longest sequence's program.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

COLUMNS = ("kv_dtype", "batch", "ctx", "us", "config", "source", "kv_sum", "kv_max")  # the last two optional
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
        for c in ("kv_sum", "kv_max"):  # the lengths drawn (sum, longest): recorded since the split bound's fit
            if (r.get(c) or "").strip():
                row[c] = int(r[c])
            else:
                row.pop(c, None)
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


# ------------------------------------------------------------------------ calibrated profiles

def _check_batches(b: list[int]) -> list[int]:
    """A kernel table's measured batch sizes: >= 1 and strictly increasing (else ValueError)."""
    if b[0] < 1 or any(y <= x for x, y in zip(b, b[1:])):
        raise ValueError("batches must be >= 1 and strictly increasing")
    return b

class DecodeAttentionKernel(BaseModel):
    """A calibrated profile's decode attention kernel alone, per KV dtype (see the module doc)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    grid_kv_dtype: Literal["bf16", "fp8", "int8"] = Field(
        description="the KV-cache dtype of the serving grid the profile's other terms were fitted to")
    batches: list[int] = Field(min_length=1, description="batch sizes measured, strictly increasing, >= 1")
    fixed_s: dict[Literal["bf16", "fp8"], list[float]] = Field(
        description="per KV dtype, one layer's kernel seconds at no cached tokens, at each batch (>= 0)")
    per_token_s: dict[Literal["bf16", "fp8"], list[float]] = Field(
        description="per KV dtype, one layer's kernel seconds per cached token, at each batch (>= 0)")
    source: str = Field("", description="where the kernel table came from")

    @model_validator(mode="after")
    def _check(self):
        b = _check_batches(self.batches)
        if set(self.fixed_s) != set(self.per_token_s):
            raise ValueError("fixed_s and per_token_s must hold the same KV dtypes")
        for what in (self.fixed_s, self.per_token_s):
            for dt, v in what.items():
                if len(v) != len(b) or min(v) < 0:
                    raise ValueError(f"{dt}: one non-negative value per batch ({len(b)}) expected")
        return self


def fit_kernel(rows: list[dict], grid_kv_dtype: str, source: str = "") -> dict:
    """`DecodeAttentionKernel` fields from a calibration table: per KV dtype and batch the
    least-squares line of one layer's time over its cached tokens (batch x ctx), at the
    batches every dtype measured at two or more contexts (a negative fitted value, noise
    at a tiny kernel, is clipped to 0). ValueError when no batch qualifies."""
    dts = sorted({r["kv_dtype"] for r in rows})
    ctxs = {(dt, B): {r["ctx"] for r in rows if r["kv_dtype"] == dt and r["batch"] == B}
            for dt in dts for B in {r["batch"] for r in rows}}
    batches = sorted({B for (_, B) in ctxs if all(len(ctxs.get((dt, B), ())) >= 2 for dt in dts)})
    if not batches:
        raise ValueError("decode attention calibration: no batch measured at >= 2 contexts in every KV dtype")
    fixed: dict[str, list[float]] = {}
    slope: dict[str, list[float]] = {}
    for dt in dts:
        for B in batches:
            sel = [r for r in rows if r["kv_dtype"] == dt and r["batch"] == B]
            a, s = fit_line(sel, dt)
            fixed.setdefault(dt, []).append(max(a, 0.0))
            slope.setdefault(dt, []).append(max(s, 0.0))
    return DecodeAttentionKernel(grid_kv_dtype=grid_kv_dtype, batches=batches, fixed_s=fixed, per_token_s=slope,
                                 source=source).model_dump()


def kernel_delta(kernel: DecodeAttentionKernel | None, kv_dtype: str, layers: int):
    """``f(n) -> (seconds, seconds per cached token)`` over ``layers`` layers: the decode
    attention kernel of ``kv_dtype`` minus the grid's at batch ``n``; None where nothing
    changes (no table, the grid's own dtype, or a dtype the table did not measure)."""
    if kernel is None or kv_dtype == kernel.grid_kv_dtype or kv_dtype not in kernel.fixed_s \
            or kernel.grid_kv_dtype not in kernel.fixed_s:
        return None
    g = kernel.grid_kv_dtype
    xs = np.asarray(kernel.batches, float)
    da = layers * (np.asarray(kernel.fixed_s[kv_dtype]) - np.asarray(kernel.fixed_s[g]))
    ds = layers * (np.asarray(kernel.per_token_s[kv_dtype]) - np.asarray(kernel.per_token_s[g]))
    cache: dict[int, tuple[float, float]] = {}

    def delta(n: int) -> tuple[float, float]:
        r = cache.get(n)
        if r is None:
            r = cache[n] = (float(np.interp(n, xs, da)), float(np.interp(n, xs, ds)))
        return r

    return delta


# ------------------------------------------------------------------------ long contexts
SHORT_CTX_MAX = 2048  # the calibration grid's decode rows at batch >= 9 attend <= 2k tokens a request
LONG_CTX_MIN = 8192


class LongContextKernel(BaseModel):
    """A calibrated profile's decode attention kernel alone in the model's own KV dtype at
    short and at long contexts, per decode batch: one layer's seconds per cached token of the
    line through the short-context points (<= SHORT_CTX_MAX tokens a request, what the grid's
    decode rows attend) and of the line through the long-context ones (>= LONG_CTX_MIN)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    kv_dtype: Literal["bf16", "fp8"] = Field(description="the KV-cache dtype measured (the model's own)")
    batches: list[int] = Field(min_length=1, description="batch sizes measured, strictly increasing, >= 1")
    short_per_token_s: list[float] = Field(description="per batch, one layer's seconds per cached token at short "
                                           "contexts (>= 0)")
    long_per_token_s: list[float] = Field(description="per batch, one layer's seconds per cached token at long "
                                          "contexts (>= 0)")
    per_sm_token_s: list[float] | None = Field(None, description="per batch, the split bound's rate "
                                               "(`SplitBound`): one layer's seconds per token an SM's programs walk, "
                                               "fitted from the long contexts' rows with the lengths they drew "
                                               "(> 0); null: no split bound priced")
    source: str = Field("", description="where the kernel table came from")

    @model_validator(mode="after")
    def _check(self):
        b = _check_batches(self.batches)
        for v in (self.short_per_token_s, self.long_per_token_s):
            if len(v) != len(b) or min(v) < 0:
                raise ValueError(f"one non-negative value per batch ({len(b)}) expected")
        if self.per_sm_token_s is not None and (len(self.per_sm_token_s) != len(b) or min(self.per_sm_token_s) <= 0):
            raise ValueError(f"per_sm_token_s: one positive value per batch ({len(b)}) expected")
        return self


def fit_long(rows: list[dict], kv_dtype: str, source: str = "", short_max: int | None = None,
             long_min: int | None = None, kv_heads: int | None = None, sms: int | None = None) -> dict | None:
    """`LongContextKernel` fields from the calibration's ``.kv-long.csv`` (kv_attention_sweep's
    LONG_SIZES): per batch measured at >= 2 short and >= 2 long contexts in ``kv_dtype``, the
    least-squares slopes of one layer's time over its cached tokens (batch x ctx) through each
    (a negative slope, noise, clipped to 0); with ``kv_heads`` (a GPU's) and ``sms``, the split
    bound's rate (`fit_split_rate`) from the long rows. None when no row is of ``kv_dtype``;
    ValueError when no batch qualifies."""
    short_max = SHORT_CTX_MAX if short_max is None else short_max  # module constants: the CPU smoke's are small
    long_min = LONG_CTX_MIN if long_min is None else long_min
    sel = [r for r in rows if r["kv_dtype"] == kv_dtype]
    if not sel:
        return None
    batches, short, long = [], [], []
    for B in sorted({r["batch"] for r in sel}):
        lo = [r for r in sel if r["batch"] == B and r["ctx"] <= short_max]
        hi = [r for r in sel if r["batch"] == B and r["ctx"] >= long_min]
        if len({r["ctx"] for r in lo}) < 2 or len({r["ctx"] for r in hi}) < 2:
            continue
        batches.append(B)
        short.append(max(fit_line(lo, kv_dtype)[1], 0.0))
        long.append(max(fit_line(hi, kv_dtype)[1], 0.0))
    if not batches:
        raise ValueError(f"decode attention long-context table: no batch measured at >= 2 contexts of <= "
                         f"{short_max} and >= 2 of >= {long_min} tokens in {kv_dtype}")
    r = fit_split_rate([x for x in sel if x["ctx"] >= long_min], batches, kv_heads, sms) if kv_heads and sms else None
    return LongContextKernel(kv_dtype=kv_dtype, batches=batches, short_per_token_s=short, long_per_token_s=long,
                             per_sm_token_s=r, source=source).model_dump()


def long_context_delta(kernel: LongContextKernel | None, kv_dtype: str, layers: int):
    """``f(n) -> seconds per cached token`` over ``layers`` layers that decode attention over
    a batch of ``n`` costs at long contexts beyond what it costs at the grid's short ones: the
    kernel's long-context slope minus its short-context slope at that batch (linear in the
    batch between the measured ones, the nearest beyond them). The kernel's split bound is
    tuned per batch at short contexts; at long ones the programs of the longest sequences set
    the time where it runs few splits (positive), and a batch of many splits streams the KV
    better than at short contexts (negative). None without a table of ``kv_dtype``."""
    if kernel is None or kernel.kv_dtype != kv_dtype:
        return None
    xs = np.asarray(kernel.batches, float)
    d = layers * (np.asarray(kernel.long_per_token_s, float) - np.asarray(kernel.short_per_token_s, float))
    cache: dict[int, float] = {}

    def delta(n: int) -> float:
        r = cache.get(n)
        if r is None:
            r = cache[n] = float(np.interp(n, xs, d))
        return r

    return delta


# ------------------------------------------------------------------------ the split bound
_TUNED_KV = {"bf16": None, "fp8": "float8_e4m3fn"}  # the tuning table's name of a KV cache dtype (None: q's)


def tuned_rows(table: dict | None, group: int, kv_heads: int, head_dim: int, kv_dtype: str,
               block_size: int = 32) -> list[dict] | None:
    """The tuning table's rows for a decode attention call's shapes (bf16 q), the key of
    ``block_size`` tokens a block where the table has it, else the smallest block size it has;
    None where it has none (or no table)."""
    if table is None or kv_dtype not in _TUNED_KV:
        return None
    from servesim.kernels import tuning_table as tt

    entries = table.get("entries", {})
    sms = int(table["sms"])
    key = tt.table_key("bfloat16", group, kv_heads, head_dim, block_size, sms, _TUNED_KV[kv_dtype])
    if key in entries:
        return entries[key]
    others = sorted((bs, k) for bs in range(1, 4097)
                    if (k := tt.table_key("bfloat16", group, kv_heads, head_dim, bs, sms, _TUNED_KV[kv_dtype]))
                    in entries)
    return entries[others[0][1]] if others else None


_SPLITS = re.compile(r"^S(\d+)/")  # a DecodeConfig label's split bound (kernels/decode_attention.py)


def sm_load(kv_sum: int, kv_max: int, n: int, kv_heads: int, splits: int, sms: int) -> float:
    """Tokens the SM holding the batch's longest sequence's program walks: that program (``kv_max
    / splits``) and, beside it, its share of the others -- the grid's ``n x kv_heads x splits``
    programs spread over ``sms`` SMs, each of the mean length (``kv_sum / n / splits``). Equal
    lengths: the KV spread evenly over the SMs (``kv_heads x kv_sum / sms``, streaming)."""
    others = n * kv_heads * splits / sms - 1.0
    return kv_max / splits + (others if others > 0 else 0.0) * kv_sum / (n * splits)


def fit_split_rate(rows: list[dict], batches: list[int], kv_heads: int, sms: int) -> list[float] | None:
    """`SplitBound`'s seconds per SM-token of one layer at each of ``batches``, from kv-long rows
    with the lengths they drew (``kv_sum``, ``kv_max``) and the split bound that ran (their
    config label ``S<n>/...``): the least-squares slope of the time over `sm_load` (the
    intercept takes the launch and the merge, which the grid's fixed terms price). None where a
    batch has no two such rows of distinct load (or a slope <= 0)."""
    out = []
    for B in batches:
        pts = []
        for r in rows:
            m = _SPLITS.match(str(r.get("config") or ""))
            if r["batch"] == B and m is not None and "kv_sum" in r and "kv_max" in r:
                pts.append((sm_load(r["kv_sum"], r["kv_max"], B, kv_heads, int(m.group(1)), sms), r["us"] * 1e-6))
        x = np.array([p[0] for p in pts])
        if len(pts) < 2 or np.ptp(x) == 0:
            return None
        slope = float(np.polyfit(x, [p[1] for p in pts], 1)[0])
        if not slope > 0:
            return None
        out.append(slope)
    return out


class SplitBound:
    """The decode attention kernel's split bound (kernels/decode_attention.py): each
    (sequence, KV head) is walked by ``s`` programs, ``s`` the tuning table's split bound at
    the (padded) batch (`kernels.tuning_table.split_bound`, what the GPU runs), each ``length /
    s`` tokens. The SM that holds one of the longest sequence's programs walks it and its share
    of the rest (`sm_load`: ``kv_max / s`` + (``n x kv_heads x s / sms`` - 1) mean programs), at
    ``per_sm_token_s`` a token a layer (per measured batch, linear in the batch between), so the step's decode attention lasts at least
    ``layers x per_sm_token_s x sm_load`` -- affine in the longest sequence and the KV sum at a
    batch: ``per_longest x kv_max + per_kv x kv_sum``. With equal lengths it is the KV streamed
    over the SMs; a batch of few splits (the H200's bf16 kernel: 2 at batch 24) and unequal
    lengths waits for its longest programs, which the KV sum does not see. (A sequence shorter
    than ``s x min_split_tokens`` uses fewer, longer splits; the term takes ``length / s`` for
    it, where it is negligible.) The rate is fitted from the calibration's kv-long sweep
    (`fit_split_rate`: its lengths are uniform in +-50% of each context)."""

    def __init__(self, rows: list[dict], kv_heads: int, sms: int, layers: int, batches: list[int],
                 per_sm_token_s: list[float]):
        self.rows, self.kv_heads, self.sms, self.layers = rows, kv_heads, sms, layers
        self.batches, self.per_sm_token_s = list(batches), list(per_sm_token_s)
        self._cache: dict[tuple[int, int], tuple[float, float]] = {}

    def rate(self, batch: int) -> float:
        """One layer's seconds per SM-token at ``batch``: linear in the batch between the
        measured ones, the nearest beyond them."""
        return float(np.interp(batch, self.batches, self.per_sm_token_s))

    def splits(self, batch: int) -> int:
        """The split bound a call at ``batch`` (the graph's padded batch) runs."""
        from servesim.kernels import tuning_table as tt

        return tt.split_bound(self.rows, batch)[0] or 1

    def rates(self, n: int, batch: int) -> tuple[float, float]:
        """(seconds per token of the longest sequence, seconds per token of the KV sum), all
        layers, of ``n`` requests run at ``batch`` (padded rows: no programs that work)."""
        key = (n, batch)
        r = self._cache.get(key)
        if r is None:
            s = self.splits(batch)
            k = self.layers * self.rate(batch)
            others = n * self.kv_heads * s / self.sms - 1.0
            r = self._cache[key] = (k / s, k * (others if others > 0 else 0.0) / (n * s))
        return r

    @classmethod
    def of(cls, kernel: LongContextKernel | None, rows: list[dict] | None, kv_heads: int, sms: int | None,
           layers: int) -> SplitBound | None:
        """From a profile's long-context kernel (its ``per_sm_token_s``) and the tuning table's
        rows (None without either)."""
        if kernel is None or kernel.per_sm_token_s is None or not rows or not sms:
            return None
        return cls(rows, kv_heads, sms, layers, kernel.batches, kernel.per_sm_token_s)
