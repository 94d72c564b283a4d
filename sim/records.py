"""Materialise an engine's compact records into the output tables of DESIGN.md.

The engine keeps general iterations as tuples and decode stretches as a handful of
numbers each; here they become per-iteration rows (vectorised over all stretches) and
per-request rows with their per-token emission times (a list column), without a Python
loop over tokens or iterations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from .types import Phase, Request

ITERATION_COLUMNS = [
    "replica", "iteration", "start_s", "duration_s", "num_ctx_requests", "num_gen_requests",
    "ctx_tokens", "gen_tokens", "padded_tokens", "kv_blocks_used", "kv_blocks_cached",
    "kv_blocks_free", "kv_blocks_host", "evictions", "offloads", "onboards",
    "draft_tokens_proposed", "draft_tokens_accepted", "graph", "decode_kv_tokens", "ctx_cached_tokens",
]


@dataclass
class IterationArrays:
    """Per-iteration columns of one replica, indexed by iteration number."""

    columns: dict[str, np.ndarray]

    @property
    def end_s(self) -> np.ndarray:
        return self.columns["start_s"] + self.columns["duration_s"]


def iteration_arrays(engine) -> IterationArrays:
    """All iterations of one engine, sorted by iteration index (general + stretches)."""
    tpb = engine.tpb
    total_blocks = engine.kv.total
    rows = engine.rows
    if rows:
        # one conversion of the whole list (every field is a number; exact in float64)
        R = np.array(rows, dtype=np.float64)
        ints = lambda j, t=np.int64: R[:, j].astype(t)  # noqa: E731
        gen = {
            "iteration": ints(0),
            "start_s": R[:, 1].copy(),
            "duration_s": R[:, 2].copy(),
            "num_ctx_requests": ints(3, np.int32),
            "num_gen_requests": ints(4, np.int32),
            "ctx_tokens": ints(5),
            "gen_tokens": ints(6),
            "padded_tokens": ints(7, np.int32),
            "kv_blocks_used": ints(8),
            "graph": R[:, 9] != 0,
            "kv_blocks_cached": ints(10),
            "kv_blocks_host": ints(11),
            "evictions": ints(12),
            "offloads": ints(13),
            "onboards": ints(14),
            "decode_kv_tokens": ints(15),
            "ctx_cached_tokens": ints(16),
        }
    else:
        gen = None
    st = engine.stretches
    if st:
        S = np.array(st, dtype=np.float64)
        g0 = S[:, 0].astype(np.int64)
        K = S[:, 1].astype(np.int64)
        t0, f, a, kv0 = S[:, 2], S[:, 3], S[:, 4], S[:, 5]
        n = S[:, 6].astype(np.int64)
        used0 = S[:, 7].astype(np.int64)
        p0 = S[:, 8].astype(np.int64)
        padded = S[:, 9].astype(np.int64)
        cached = S[:, 10].astype(np.int64)
        host = S[:, 11].astype(np.int64)
        hist = np.frombuffer(b"".join(engine.stretch_hist), dtype=np.int64).reshape(len(st), tpb)
        ev_first = np.zeros(int(K.sum()), dtype=np.int64)
        off_first = np.zeros(int(K.sum()), dtype=np.int64)
        sid = np.repeat(np.arange(len(st)), K)
        first = np.cumsum(K) - K
        k = np.arange(int(K.sum()), dtype=np.int64) - np.repeat(first, K)
        kf = k.astype(np.float64)
        ns = n[sid].astype(np.float64)
        start = t0[sid] + kf * f[sid] + a[sid] * (kf * kv0[sid] + ns * kf * (kf - 1) / 2)
        dur = f[sid] + a[sid] * (kv0[sid] + ns * kf)
        new = hist[sid, (p0[sid] - k) % tpb]
        cs = np.cumsum(new)
        before = (cs - new)[first]
        used = used0[sid] + cs - before[sid]
        pad = padded[sid]
        nn = n[sid]
        ev_first[first] = S[:, 12].astype(np.int64)  # stretch evictions at its start
        off_first[first] = S[:, 13].astype(np.int64)
        stretch = {
            "iteration": g0[sid] + k,
            "start_s": start,
            "duration_s": dur,
            "num_ctx_requests": np.zeros(len(k), dtype=np.int32),
            "num_gen_requests": nn.astype(np.int32),
            "ctx_tokens": np.zeros(len(k), dtype=np.int64),
            "gen_tokens": nn,
            "padded_tokens": np.where(pad > 0, pad - nn, 0).astype(np.int32),
            "kv_blocks_used": used,
            "graph": pad > 0,
            "kv_blocks_cached": cached[sid],
            "kv_blocks_host": host[sid],
            "evictions": ev_first,
            "offloads": off_first,
            "onboards": np.zeros(len(k), dtype=np.int64),
            "decode_kv_tokens": kv0[sid].astype(np.int64) + n[sid] * k,
            "ctx_cached_tokens": np.zeros(len(k), dtype=np.int64),
        }
    else:
        stretch = None
    parts = [p for p in (gen, stretch) if p is not None]
    if not parts:
        cols = {c: np.zeros(0) for c in ("iteration", "start_s", "duration_s")}
        cols.update({c: np.zeros(0, dtype=np.int64) for c in (
            "num_ctx_requests", "num_gen_requests", "ctx_tokens", "gen_tokens",
            "padded_tokens", "kv_blocks_used", "kv_blocks_cached", "kv_blocks_host", "evictions",
            "offloads", "onboards", "decode_kv_tokens", "ctx_cached_tokens")})
        cols["graph"] = np.zeros(0, dtype=bool)
    elif len(parts) == 1:
        cols = parts[0]
    else:
        cols = {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
        order = np.argsort(cols["iteration"], kind="stable")
        cols = {c: v[order] for c, v in cols.items()}
    m = len(cols["iteration"])
    if m and not np.array_equal(cols["iteration"], np.arange(m)):
        raise AssertionError("iteration records are not contiguous")
    cols["kv_blocks_free"] = total_blocks - cols["kv_blocks_used"] - cols["kv_blocks_cached"]
    zeros = np.zeros(m, dtype=np.int64)
    for c in ("draft_tokens_proposed", "draft_tokens_accepted"):
        cols.setdefault(c, zeros)
    cols["replica"] = np.full(m, engine.replica, dtype=np.int32)
    return IterationArrays(cols)


def iterations_table(its: list[IterationArrays]) -> pa.Table:
    cols = {c: np.concatenate([i.columns[c] for i in its]) for c in ITERATION_COLUMNS}
    return pa.table(cols)


@dataclass
class RequestArrays:
    table: pa.Table  # the requests.parquet table
    token_times: np.ndarray  # flat emission times of finished requests
    token_offsets: np.ndarray  # per finished request, into token_times (len n+1)
    finished: np.ndarray  # bool per row


def request_arrays(requests: list[Request], its: list[IterationArrays]) -> RequestArrays:
    """Per-request rows; token times gathered from iteration end times via the spans."""
    requests = sorted(requests, key=lambda r: r.request_id)
    ends = [i.end_s for i in its]
    base = np.cumsum([0] + [len(e) for e in ends])[:-1]
    all_ends = np.concatenate(ends) if ends else np.zeros(0)
    span_start: list[int] = []
    span_len: list[int] = []
    per_req = np.zeros(len(requests), dtype=np.int64)
    for i, r in enumerate(requests):
        if r.phase != Phase.FINISHED:
            continue
        b = base[r.replica]
        tot = 0
        for first, cnt in r.spans:
            span_start.append(b + first)
            span_len.append(cnt)
            tot += cnt
        per_req[i] = tot
    ss = np.asarray(span_start, dtype=np.int64)
    sl = np.asarray(span_len, dtype=np.int64)
    total = int(sl.sum())
    first_in_span = np.cumsum(sl) - sl
    idx = np.repeat(ss, sl) + (np.arange(total, dtype=np.int64) - np.repeat(first_in_span, sl))
    times = all_ends[idx] if total else np.zeros(0)
    offsets = np.concatenate([[0], np.cumsum(per_req)]).astype(np.int64)
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
    table = pa.table({
        "request_id": col("request_id", np.int64),
        "replica": col("replica", np.int32),
        "status": status,
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
        "token_times": pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(times)),
    })
    return RequestArrays(table, times, offsets, finished)
