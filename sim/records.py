"""Materialise an engine's compact records into the output tables of DESIGN.md.

The engine keeps general iterations as `IterationRecord`s and decode stretches as
`StretchRecord`s (a handful of numbers each); here they become per-iteration rows (vectorised over all stretches) and
per-request rows with their per-token emission times (a list column), without a Python
loop over tokens or iterations.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from .schemas import ITERATIONS, OPTIONAL, arrow_array, build_table, empty_columns, fill_value
from .types import Phase, Request

# Columns the records derive rather than the engine: which replica, and the free blocks
# (total - used - cached).
DERIVED = ("replica", "kv_blocks_free")


class IterationRecord(NamedTuple):
    """One general iteration as the engine records it (every column of iterations.parquet
    but DERIVED; the schema, sim/schemas.py, gives their types and units)."""

    iteration: int
    start_s: float
    duration_s: float
    num_ctx_requests: int
    num_gen_requests: int
    ctx_tokens: int
    gen_tokens: int
    padded_tokens: int
    kv_blocks_used: int
    kv_blocks_cached: int
    kv_blocks_host: int
    evictions: int
    offloads: int
    onboards: int
    graph: bool
    decode_kv_tokens: int
    ctx_cached_tokens: int
    draft_tokens_proposed: int
    draft_tokens_accepted: int


class StretchRecord(NamedTuple):
    """A closed-form decode stretch: K iterations of the same n generation requests; the
    k-th (from 0) starts at t0 + k*fixed + per_kv*(k*kv0 + n*k*(k-1)/2) and lasts
    fixed + per_kv*(kv0 + n*k). Its per-iteration rows are materialised here, vectorised."""

    g0: int  # index of its first iteration
    K: int  # number of iterations
    t0: float  # start of its first iteration
    fixed: float  # affine decode price: fixed part (s)
    per_kv: float  # ... and seconds per KV token attended
    kv0: int  # decode_kv_tokens of its first iteration
    n: int  # generation requests
    used0: int  # KV blocks used before the stretch
    p0: int  # block-residue phase of its first iteration ((-g0) mod tokens_per_block)
    padded: int  # CUDA-graph batch size (0: eager)
    cached: int  # prefix-cache blocks (constant over the stretch)
    host: int  # host-tier blocks (constant over the stretch)
    evictions: int  # evicted at its start (all blocks it needs are taken then)
    offloads: int


ITERATION_COLUMNS = tuple(n for n in ITERATIONS.names if n not in OPTIONAL["iterations"])
if set(IterationRecord._fields) | set(DERIVED) != set(ITERATION_COLUMNS):
    raise ImportError("sim/records.py IterationRecord and the iterations schema (sim/schemas.py) disagree: "
                      f"{sorted(set(IterationRecord._fields) ^ (set(ITERATION_COLUMNS) - set(DERIVED)))}")
_NP = {f.name: np.dtype(f.type.to_pandas_dtype()) for f in ITERATIONS}


@dataclass
class IterationArrays:
    """Per-iteration columns of one replica, indexed by iteration number."""

    columns: dict[str, np.ndarray]
    # optional list columns (speculative decoding's per-position counts), one list per row
    lists: dict[str, list] | None = None

    @property
    def end_s(self) -> np.ndarray:
        return self.columns["start_s"] + self.columns["duration_s"]


def _as_matrix(rows: list[tuple], width: int) -> np.ndarray:
    """A list of equal-length numeric tuples as a float64 matrix (fromiter: a few times
    faster than np.array on tuples)."""
    return np.fromiter(chain.from_iterable(rows), dtype=np.float64, count=len(rows) * width).reshape(len(rows), width)


def _general_columns(rows: list[IterationRecord]) -> dict[str, np.ndarray]:
    # one conversion of the whole list (every field is a number; exact in float64)
    R = _as_matrix(rows, len(IterationRecord._fields))
    out = {}
    for j, name in enumerate(IterationRecord._fields):
        dt = _NP[name]
        col = R[:, j]
        out[name] = col != 0 if dt == np.bool_ else (col.copy() if dt == np.float64 else col.astype(dt))
    return out


def _stretch_columns(st: list[StretchRecord], hist_bytes: list[bytes], tpb: int) -> dict[str, np.ndarray]:
    S = _as_matrix(st, len(StretchRecord._fields))
    F = {name: S[:, j] for j, name in enumerate(StretchRecord._fields)}
    g0 = F["g0"].astype(np.int64)
    K = F["K"].astype(np.int64)
    t0, f, a, kv0 = F["t0"], F["fixed"], F["per_kv"], F["kv0"]
    n = F["n"].astype(np.int64)
    used0 = F["used0"].astype(np.int64)
    p0 = F["p0"].astype(np.int64)
    padded = F["padded"].astype(np.int64)
    hist = np.frombuffer(b"".join(hist_bytes), dtype=np.int64).reshape(len(st), tpb)
    total = int(K.sum())
    ev_first = np.zeros(total, dtype=np.int64)
    off_first = np.zeros(total, dtype=np.int64)
    sid = np.repeat(np.arange(len(st)), K)
    first = np.cumsum(K) - K
    k = np.arange(total, dtype=np.int64) - np.repeat(first, K)
    kf = k.astype(np.float64)

    def per_row(x):  # a stretch's value on each of its rows (x[sid], without the gather)
        return np.repeat(x, K)

    nn = per_row(n)
    ns = nn.astype(np.float64)
    f_, a_, kv0_ = per_row(f), per_row(a), per_row(kv0)
    start = per_row(t0) + kf * f_ + a_ * (kf * kv0_ + ns * kf * (kf - 1) / 2)
    dur = f_ + a_ * (kv0_ + ns * kf)
    new = hist[sid, (per_row(p0) - k) % tpb]
    cs = np.cumsum(new)
    before = (cs - new)[first]
    pad = per_row(padded)
    ev_first[first] = F["evictions"].astype(np.int64)  # stretch evictions at its start
    off_first[first] = F["offloads"].astype(np.int64)
    cols = {
        "iteration": per_row(g0) + k,
        "start_s": start,
        "duration_s": dur,
        "num_gen_requests": nn,
        "gen_tokens": nn,
        "padded_tokens": np.where(pad > 0, pad - nn, 0),
        "kv_blocks_used": per_row(used0 - before) + cs,
        "graph": pad > 0,
        "kv_blocks_cached": per_row(F["cached"].astype(np.int64)),
        "kv_blocks_host": per_row(F["host"].astype(np.int64)),
        "evictions": ev_first,
        "offloads": off_first,
        "decode_kv_tokens": per_row(kv0.astype(np.int64)) + nn * k,
    }
    for name in IterationRecord._fields:  # what a decode-only iteration never has: its fill
        if name not in cols:
            v = fill_value(ITERATIONS, name)
            if v is None:
                raise AssertionError(f"column {name}: no formula for decode stretches and no fill value")
            cols[name] = np.full(total, v)
    return {name: cols[name].astype(_NP[name], copy=False) for name in IterationRecord._fields}


def iteration_columns(rows: list[IterationRecord], stretches: list[StretchRecord], stretch_hist: list[bytes],
                      tpb: int, first: int = 0) -> dict[str, np.ndarray]:
    """The engine columns (every iteration column but DERIVED) of the iterations these
    records cover, which must be exactly ``first, first + 1, ...``: in iteration order."""
    parts = []
    if rows:
        parts.append(_general_columns(rows))
    if stretches:
        parts.append(_stretch_columns(stretches, stretch_hist, tpb))
    if not parts:
        return {name: v for name, v in empty_columns("iterations").items() if name not in DERIVED}
    if len(parts) == 1:
        cols = parts[0]
        m = len(cols["iteration"])
        if m and not np.array_equal(cols["iteration"], np.arange(first, first + m)):
            raise AssertionError("iteration records are not contiguous")
        return cols
    # general iterations and stretches interleave: place each row at its iteration
    pos = [p["iteration"] - first for p in parts]
    m = sum(len(x) for x in pos)
    if min(int(x.min()) for x in pos) < 0 or max(int(x.max()) for x in pos) >= m:
        raise AssertionError("iteration records are not contiguous")
    cols = {}
    for c in parts[0]:
        out = np.empty(m, dtype=parts[0][c].dtype)
        if c == "iteration":
            out.fill(-1)
        for p, x in zip(parts, pos):
            out[x] = p[c]
        cols[c] = out
    if not np.array_equal(cols["iteration"], np.arange(first, first + m)):
        raise AssertionError("iteration records are not contiguous")
    return cols


def add_derived(cols: dict[str, np.ndarray], kv_total: int, replica: int) -> dict[str, np.ndarray]:
    """The DERIVED columns: free blocks and the replica."""
    cols["kv_blocks_free"] = kv_total - cols["kv_blocks_used"] - cols["kv_blocks_cached"]
    cols["replica"] = np.full(len(cols["iteration"]), replica, dtype=np.int32)
    return cols


def draft_lists(draft_positions, first: int, m: int) -> dict[str, list]:
    """Speculative decoding's per-position list columns of iterations first..first+m-1."""
    prop: list = [[] for _ in range(m)]
    acc: list = [[] for _ in range(m)]
    for it, p, a in draft_positions:
        prop[it - first] = list(p)
        acc[it - first] = list(a)
    return {"draft_proposed_by_position": prop, "draft_accepted_by_position": acc}


def iteration_arrays(engine) -> IterationArrays:
    """All iterations of one engine, sorted by iteration index (general + stretches)."""
    cols = add_derived(iteration_columns(engine.rows, engine.stretches, engine.stretch_hist, engine.tpb),
                       engine.kv.total, engine.replica)
    lists = None
    if engine.cfg.speculation is not None:
        lists = draft_lists(engine.draft_positions, 0, len(cols["iteration"]))
    return IterationArrays(cols, lists)


def iterations_table(its: list[IterationArrays], extra: dict[str, np.ndarray] | None = None) -> pa.Table:
    """The iterations table of all replicas; `extra`: optional columns of the schema (a GPU
    run's host times), in the same row order."""
    cols = {c: np.concatenate([i.columns[c] for i in its]) for c in ITERATION_COLUMNS}
    if any(i.lists for i in its):
        for name in ("draft_proposed_by_position", "draft_accepted_by_position"):
            cols[name] = [x for i in its for x in (i.lists[name] if i.lists else [[]] * len(i.columns["iteration"]))]
    return build_table("iterations", {**cols, **(extra or {})})


@dataclass
class RequestArrays:
    table: pa.Table  # the requests.parquet table
    token_times: np.ndarray  # flat emission times of finished requests
    token_offsets: np.ndarray  # per finished request, into token_times (len n+1)
    finished: np.ndarray  # bool per row


def token_times(requests: list[Request], ends: list[np.ndarray], bases: list[int] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Emission times of the finished requests' tokens, gathered from iteration end times
    through their spans (a disaggregated request's first token from its prefill replica's
    iteration): ``ends[r][i - bases[r]]`` is the end of replica r's iteration i. Returns
    (flat times, offsets per request into them; len(requests) + 1)."""
    lens = [len(e) for e in ends]
    base = np.cumsum([0] + lens)[:-1] - (np.asarray(bases, dtype=np.int64) if bases is not None else 0)
    all_ends = np.concatenate(ends) if ends else np.zeros(0)
    span_start: list[int] = []
    span_len: list[int] = []
    per_req = np.zeros(len(requests), dtype=np.int64)
    for i, r in enumerate(requests):
        if r.phase != Phase.FINISHED:
            continue
        b = base[r.replica]
        tot = 0
        if r.first_token_at is not None:
            span_start.append(base[r.first_token_at[0]] + r.first_token_at[1])
            span_len.append(1)
            tot += 1
        for first, cnt in r.spans:
            span_start.append(b + first)
            span_len.append(cnt)
            tot += cnt
        per_req[i] = tot
    ss = np.asarray(span_start, dtype=np.int64)
    sl = np.asarray(span_len, dtype=np.int64)
    total = int(sl.sum())
    first_in_span = np.cumsum(sl) - sl
    idx = np.arange(total, dtype=np.int64)  # token j of a span: its first iteration + j - the span's offset
    idx += np.repeat(ss - first_in_span, sl)
    if total and (idx.min() < 0 or idx.max() >= len(all_ends)):
        raise AssertionError("a finished request's tokens lie outside the iterations recorded")
    times = all_ends[idx] if total else np.zeros(0)
    return times, np.concatenate([[0], np.cumsum(per_req)]).astype(np.int64)


def request_table(requests: list[Request], times: np.ndarray, offsets: np.ndarray,
                  disaggregated: bool = False) -> pa.Table:
    """The requests.parquet rows of `requests` (in the order given) with their token times
    (`disaggregated`: and the prefill replica and KV transfer time of each)."""
    total = len(times)
    finished = np.array([r.phase == Phase.FINISHED for r in requests], dtype=bool)
    nan = np.nan
    first_tok = np.where(finished, times[np.minimum(offsets[:-1], max(total - 1, 0))] if total else nan, nan)
    last_tok = np.where(finished, times[np.maximum(offsets[1:] - 1, 0)] if total else nan, nan)
    n = len(requests)

    def col(attr, dtype):
        return np.fromiter((getattr(r, attr) for r in requests), dtype=dtype, count=n)

    def opt(attr):
        return np.fromiter((nan if getattr(r, attr) is None else getattr(r, attr) for r in requests),
                           dtype=np.float64, count=n)

    status = np.where(finished, "finished", "rejected")
    extra = {}
    if disaggregated:
        extra = {"prefill_replica": col("prefill_replica", np.int32),
                 "kv_transfer_s": [r.kv_transfer_s for r in requests]}
    return build_table("requests", {
        "request_id": col("request_id", np.int64),
        "replica": col("replica", np.int32),
        "status": status,
        "reject_reason": [r.reject_reason for r in requests],
        "arrival_s": col("arrival_s", np.float64),
        "first_scheduled_s": col("first_scheduled_s", np.float64),
        "first_token_s": first_tok,
        "finish_s": last_tok,
        "prompt_len": col("prompt_len", np.int64),
        "output_len": col("output_len", np.int64),
        "cached_tokens": col("cached_tokens", np.int64),
        "preemptions": col("preemptions", np.int32),
        "priority": col("priority", np.int32),
        "tenant": [r.tenant for r in requests],
        "slo_ttft_s": opt("slo_ttft_s"),
        "slo_tpot_s": opt("slo_tpot_s"),
        "token_times": pa.ListArray.from_arrays(arrow_array(offsets, pa.int32()), arrow_array(times, pa.float64())),
        **extra,
    })


def request_arrays(requests: list[Request], its: list[IterationArrays], disaggregated: bool = False) -> RequestArrays:
    """Per-request rows; token times gathered from iteration end times via the spans (a
    disaggregated request's first token from its prefill replica's iteration)."""
    requests = sorted(requests, key=lambda r: r.request_id)
    times, offsets = token_times(requests, [i.end_s for i in its])
    table = request_table(requests, times, offsets, disaggregated)
    finished = np.array([r.phase == Phase.FINISHED for r in requests], dtype=bool)
    return RequestArrays(table, times, offsets, finished)


class RequestSource:
    """A workload's requests made as the run reaches them, `chunk` at a time, instead of
    all up front (a streamed run of millions of requests): a sequence read in order.
    ``make(lo, hi)`` makes requests lo..hi-1; `arrival_times` are all of their arrivals."""

    def __init__(self, arrival_times: np.ndarray, make, chunk: int = 1 << 14):
        self.arrival_times = np.asarray(arrival_times, dtype=np.float64)
        self.make = make
        self.chunk = chunk
        self.lo = 0
        self.items: list[Request] = []

    def __len__(self) -> int:
        return len(self.arrival_times)

    def __getitem__(self, i: int) -> Request:
        if not self.lo <= i < self.lo + len(self.items):
            if not 0 <= i < len(self):
                raise IndexError(i)
            self.lo = i
            self.items = self.make(i, min(i + self.chunk, len(self)))
        return self.items[i - self.lo]
