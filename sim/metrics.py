"""Summary metrics (summary.json) computed from the output tables.

Both backends go through this one function, so a sim run and a GPU run of the same
requests are summarised identically.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .schemas import arrow_array, numpy_of

LATENCY_KEYS = ("ttft_s", "tpot_s", "itl_s", "e2e_s")
# a request waited "long" when its queueing delay (arrival to first scheduled) exceeds this
# many times the run's median end-to-end latency: a sign of starvation, warned about
LONG_WAIT_FACTOR = 10.0


def dist(x: np.ndarray, own: bool = False) -> dict[str, float | None]:
    """Mean and percentiles of the finite values of `x`. `own`: `x` is the caller's to
    reorder (a temporary): the percentiles partition it in place instead of a copy (the
    same floats; the mean is taken first, over the values in their order)."""
    finite = np.isfinite(x)
    if not finite.all():  # (all finite: the values as they are, no copy)
        x = x[finite]
        own = True
    if len(x) == 0:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    mean = float(x.mean())
    p50, p90, p99 = np.percentile(x, [50, 90, 99], overwrite_input=own)
    return {"mean": mean, "p50": float(p50), "p90": float(p90), "p99": float(p99)}


PERCENTILES = (50, 90, 99)
# pooled inter-token latencies up to this many are gathered and sorted in memory; beyond,
# their percentiles are selected exactly in passes over the column (select_ranks)
ITL_IN_MEMORY = 1 << 22
SLICE = 1 << 20  # values a selection pass handles at once (bounds its temporaries)


def _slices(chunks):
    for x in chunks():
        for a in range(0, len(x), SLICE):
            yield x[a:a + SLICE]


def itl_values(tt) -> np.ndarray:
    """The inter-token latencies of a token_times list column (gaps inside each list)."""
    tt = tt.combine_chunks() if isinstance(tt, pa.ChunkedArray) else tt
    offsets = numpy_of(tt.offsets)
    values = numpy_of(tt.values)[offsets[0]:offsets[-1]] if len(offsets) else np.zeros(0)
    offsets = offsets - offsets[0] if len(offsets) else offsets
    return gaps_within(values, offsets)


def gaps_within(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The gaps between consecutive values inside each list of a flattened list column
    (`values`, list i being ``values[offsets[i]:offsets[i + 1]]``, offsets from 0)."""
    d = np.diff(values)
    # a gap belongs to a request when it does not cross into the next request's list
    starts = offsets[1:-1]  # index where each later list begins
    mask = np.ones(len(d), dtype=bool)
    valid = starts[(starts > 0) & (starts <= len(d))]
    mask[valid - 1] = False
    return d[mask] if len(d) else d


def request_latencies(req: pa.Table, with_itl: bool = True) -> dict[str, np.ndarray]:
    """TTFT, TPOT, E2E per finished request and the pooled inter-token latencies."""
    fin = _equals(req.column("status"), "finished")
    arrival = numpy_of(req.column("arrival_s"))[fin]
    first = numpy_of(req.column("first_token_s"))[fin]
    last = numpy_of(req.column("finish_s"))[fin]
    out = numpy_of(req.column("output_len"))[fin]
    itl = itl_values(req.column("token_times")) if with_itl and "token_times" in req.column_names else None
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(out > 1, (last - first) / np.maximum(out - 1, 1), np.nan)
    sched = numpy_of(req.column("first_scheduled_s"))[fin]
    return {"ttft_s": first - arrival, "tpot_s": tpot, "itl_s": itl, "e2e_s": last - arrival,
            "queue_s": sched - arrival, "fin_mask": fin}


def _sort_keys(x: np.ndarray) -> np.ndarray:
    """uint64 keys that sort as the float64 values do (NaN excluded beforehand)."""
    u = np.ascontiguousarray(x, dtype=np.float64).view(np.uint64)
    return np.where(u >> np.uint64(63), ~u, u | np.uint64(1 << 63))


FIRST_BITS = 20  # the first level of the selection: sign, exponent and 8 mantissa bits (1/256 octave)


def _prefix_hist(keys: np.ndarray, bits: int = FIRST_BITS) -> np.ndarray:
    return np.bincount((keys >> np.uint64(64 - bits)).astype(np.int64), minlength=1 << bits)


def select_ranks(chunks, ranks, collect_limit: int = 1 << 22, bits: int = 16, first: np.ndarray | None = None,
                 first_bits: int = FIRST_BITS) -> dict[int, float]:
    """The values at 0-based `ranks` of the sorted multiset of finite values that
    ``chunks()`` yields (a fresh iterator of float arrays each call): exact, without holding
    them all. A radix selection on the values' sort keys: each pass over the chunks counts,
    for every rank still open, the values under its key prefix by the next `bits` bits,
    until a prefix holds at most `collect_limit` values, which are then gathered and
    sorted. `first`: the histogram of all keys' top `first_bits` bits, if already counted
    (it saves the first pass)."""
    state = {k: (0, 0, k, None) for k in sorted(set(int(r) for r in ranks))}  # prefix, nbits, rank in it, count
    if first is not None:
        cum = np.cumsum(first)
        for k in state:
            b = int(np.searchsorted(cum, k, side="right"))
            state[k] = (b, first_bits, k - (int(cum[b - 1]) if b else 0), int(first[b]))
    out: dict[int, float] = {}
    while len(out) < len(state):
        groups: dict[tuple[int, int], list[int]] = {}
        for k, (p, nb, r, c) in state.items():
            if k not in out:
                groups.setdefault((p, nb), []).append(k)
        collect = {g for g in groups if g[1] >= 64 or (state[groups[g][0]][3] is not None
                                                       and state[groups[g][0]][3] <= collect_limit)}
        step = {g: min(bits, 64 - g[1]) for g in groups}
        hist = {g: np.zeros(1 << step[g], dtype=np.int64) for g in groups if g not in collect}
        got: dict[tuple[int, int], list[np.ndarray]] = {g: [] for g in collect}
        for x in _slices(chunks):
            x = x[np.isfinite(x)]
            if not len(x):
                continue
            keys = _sort_keys(x)
            prefixes = {nb: (keys >> np.uint64(64 - nb)) if 0 < nb < 64 else None for _, nb in groups}
            for (p, nb) in groups:
                if nb == 0:
                    m = None
                elif nb >= 64:
                    m = keys == np.uint64(p)
                else:
                    m = prefixes[nb] == np.uint64(p)
                if (p, nb) in collect:
                    got[(p, nb)].append(x if m is None else x[m])
                    continue
                sel = keys if m is None else keys[m]
                st_ = step[(p, nb)]
                digit = (sel >> np.uint64(64 - nb - st_)) & np.uint64((1 << st_) - 1)
                hist[(p, nb)] += np.bincount(digit.astype(np.int64), minlength=1 << st_)
        for g, ks in groups.items():
            if g in collect:
                v = np.sort(np.concatenate(got[g])) if got[g] else np.zeros(0)
                for k in ks:
                    out[k] = float(v[state[k][2]])
                continue
            cum = np.cumsum(hist[g])
            p, nb = g
            for k in ks:
                r = state[k][2]
                b = int(np.searchsorted(cum, r, side="right"))
                below = int(cum[b - 1]) if b else 0
                state[k] = ((p << step[g]) | b, nb + step[g], r - below, int(hist[g][b]))
    return {k: out[k] for k in ranks}


def percentiles_from_ranks(n: int, value_at) -> list[float]:
    """np.percentile's default ('linear') PERCENTILES of n sorted values, from the order
    statistics `value_at(rank)` (the same arithmetic as numpy's, so the same floats)."""
    q = np.true_divide(np.asarray(PERCENTILES, dtype=np.float64), 100)
    virtual = (n - 1) * q
    prev = np.floor(virtual).astype(np.intp)
    nxt = np.minimum(prev + 1, n - 1)
    gamma = virtual - prev
    a = np.array([value_at(int(i)) for i in prev])
    b = np.array([value_at(int(i)) for i in nxt])
    diff = b - a
    res = np.add(a, diff * gamma)
    np.subtract(b, diff * (1 - gamma), out=res, where=gamma >= 0.5)
    return [float(v) for v in res]


def dist_of_chunks(chunks, limit: int | None = None) -> dict[str, float | None]:
    """`dist` of the values ``chunks()`` yields, exact: gathered when there are at most
    `limit` of them (the same floats as `dist` of their concatenation), else the mean from
    per-chunk sums and the percentiles by `select_ranks` (more passes over the chunks).
    `limit`: ITL_IN_MEMORY by default."""
    limit = ITL_IN_MEMORY if limit is None else limit
    held: list[np.ndarray] | None = []
    n = 0
    total = 0.0
    # the selection's first level, counted meanwhile: once the values are too many to hold
    # (integer counts: the same histogram whichever chunk is counted when)
    first = None
    for x in _slices(chunks):
        x = x[np.isfinite(x)]
        n += len(x)
        total += float(x.sum())
        if held is not None:
            held.append(x)
            if n > limit:
                first = np.zeros(1 << FIRST_BITS, dtype=np.int64)
                for y in held:
                    if len(y):
                        first += _prefix_hist(_sort_keys(y))
                held = None
        elif len(x):
            first += _prefix_hist(_sort_keys(x))
    if held is not None:
        return dist(np.concatenate(held) if held else np.zeros(0))
    ranks = set()
    q = (n - 1) * np.true_divide(np.asarray(PERCENTILES, dtype=np.float64), 100)
    for v in q:
        ranks.update({int(np.floor(v)), min(int(np.floor(v)) + 1, n - 1)})
    vals = select_ranks(chunks, sorted(ranks), first=first)
    p50, p90, p99 = percentiles_from_ranks(n, vals.__getitem__)
    return {"mean": total / n, "p50": p50, "p90": p90, "p99": p99}


def long_waits(queue_s: np.ndarray, e2e_s: np.ndarray, factor: float = LONG_WAIT_FACTOR) -> dict:
    """Requests whose queueing delay exceeded `factor` x the median end-to-end latency."""
    if not len(e2e_s):
        return {"factor": factor, "threshold_s": None, "count": 0, "max_wait_s": None}
    thr = factor * float(np.median(e2e_s))
    return {"factor": factor, "threshold_s": thr, "count": int((queue_s > thr).sum()),
            "max_wait_s": float(queue_s.max())}


def _equals(col, value: str) -> np.ndarray:
    """Rows of a string column equal to `value`, as a bool array (no Python string per row:
    a run of millions of requests)."""
    if isinstance(col, pa.ChunkedArray):
        return (np.concatenate([_equals(c, value) for c in col.chunks]) if col.num_chunks != 1
                else _equals(col.chunk(0), value)) if col.num_chunks else np.zeros(0, dtype=bool)
    if col.type != pa.string():
        import pyarrow.compute as pc

        return numpy_of(pc.equal(col, pa.scalar(value, col.type))).astype(bool, copy=False)
    # from the buffers (pyarrow.compute's scalar conversion imports pandas): a row equals
    # `value` when its length is the value's and so are its bytes
    want = np.frombuffer(value.encode(), dtype=np.uint8)
    n = len(col)
    if n == 0:
        return np.zeros(0, dtype=bool)
    validity, offs, data = col.buffers()
    offsets = np.frombuffer(offs, dtype=np.int32, count=n + 1, offset=col.offset * 4)
    out = np.diff(offsets) == len(want)
    if col.null_count:
        out &= numpy_of(col.is_valid())
    idx = np.flatnonzero(out)
    if len(idx) and len(want):
        raw = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, dtype=np.uint8)
        out[idx] = (raw[offsets[idx, None] + np.arange(len(want))] == want).all(axis=1)
    return out


def string_counts(col, mask: np.ndarray | None = None) -> dict[str, int]:
    """How often each non-null value of a string column (of its rows where `mask`) occurs, in
    order of first occurrence: pyarrow.compute's `value_counts`, whose import is ~0.04 s of
    a `sim run`, from the buffers (one Python string per non-empty row while few)."""
    if isinstance(col, pa.ChunkedArray):
        out: dict[str, int] = {}
        a = 0
        for c in col.chunks:
            for k, v in string_counts(c, None if mask is None else mask[a:a + len(c)]).items():
                out[k] = out.get(k, 0) + v
            a += len(c)
        return out
    n = len(col)
    if n == 0 or col.null_count == n or (mask is not None and not mask.any()):
        return {}
    if col.type != pa.string():
        import pyarrow.compute as pc

        counts = pc.value_counts(col if mask is None else col.filter(arrow_array(mask, pa.bool_())))
        return {v: int(c) for v, c in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())
                if v is not None}
    validity, offs, data = col.buffers()
    offsets = np.frombuffer(offs, dtype=np.int32, count=n + 1, offset=col.offset * 4)
    rows = np.arange(n)
    if col.null_count:
        bits = np.unpackbits(np.frombuffer(validity, dtype=np.uint8), bitorder="little", count=col.offset + n)
        rows = rows[bits[col.offset:].astype(bool)]
    if mask is not None:
        rows = rows[mask[rows]]
    lens = np.diff(offsets)[rows]
    full = lens > 0
    if int(full.sum()) > 4096:  # many non-empty strings: pyarrow's counts (the same)
        import pyarrow.compute as pc

        counts = pc.value_counts(col if mask is None else col.filter(arrow_array(mask, pa.bool_())))
        return {v: int(c) for v, c in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())
                if v is not None}
    first: dict[str, int] = {}  # value -> the row it first occurs at
    out: dict[str, int] = {}
    empty = np.flatnonzero(~full)
    if len(empty):
        first[""] = int(empty[0])
        out[""] = int(len(empty))
    raw = data.to_pybytes() if data is not None else b""
    idx = np.flatnonzero(full)
    for j, a, ln in zip(idx.tolist(), offsets[rows[idx]].tolist(), lens[idx].tolist()):
        k = raw[a:a + ln].decode()
        if k not in out:
            first[k] = j
            out[k] = 0
        out[k] += 1
    return {k: out[k] for k in sorted(out, key=first.__getitem__)}


def _by_tenant_hit(req: pa.Table, fin: np.ndarray) -> dict[str, float]:
    """Prefix hit rate per tenant (empty when the workload has a single tenant)."""
    import pyarrow.compute as pc

    tenant = req.column("tenant").filter(arrow_array(fin, pa.bool_()))
    names = sorted(pc.unique(tenant).to_pylist())
    if len(names) < 2:
        return {}
    prompt = numpy_of(req.column("prompt_len"))[fin]
    cached = numpy_of(req.column("cached_tokens"))[fin]
    out = {}
    for t in names:
        m = _equals(tenant, t)
        out[str(t)] = float(cached[m].sum() / prompt[m].sum())
    return out


def _rejected_by_reason(req: pa.Table) -> dict[str, int]:
    if "reject_reason" not in req.column_names:  # a run of schema version 1
        return {}
    import pyarrow.compute as pc

    counts = pc.value_counts(req.column("reject_reason"))
    out = {v: int(c) for v, c in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()) if v}
    return dict(sorted(out.items()))


def _hit_rate_all(req: pa.Table) -> float:
    prompt = int(numpy_of(req.column("prompt_len")).sum())
    return float(numpy_of(req.column("cached_tokens")).sum() / prompt) if prompt else 0.0


class IterationStats:
    """The sums over iteration rows the summary needs, added one row group at a time
    (`add`): a run streamed to disk adds each group it writes, a table held in memory is
    cut into the same groups (`of_table`), so both give the same floats."""

    INT_COLUMNS = ("ctx_tokens", "evictions", "offloads", "onboards", "draft_tokens_proposed",
                   "draft_tokens_accepted")

    def __init__(self):
        self.rows = 0
        self.duration_s = 0.0  # sum of durations
        self.used_duration = 0.0  # sum of kv_blocks_used x duration
        self.ints = {c: 0 for c in self.INT_COLUMNS}
        self.has = {c: True for c in self.INT_COLUMNS}
        self.has_lists = False
        self.P = np.zeros(0, dtype=np.int64)  # per draft position sums of the list columns
        self.A = np.zeros(0, dtype=np.int64)

    @classmethod
    def of_table(cls, it: pa.Table, group_rows: int | None = None) -> "IterationStats":
        from .schemas import ROW_GROUP_ROWS

        g = group_rows or ROW_GROUP_ROWS
        st = cls()
        for a in range(0, max(it.num_rows, 1), g):
            st.add(it.slice(a, g))
        return st

    def add(self, it: pa.Table) -> None:
        names = it.column_names
        self.rows += it.num_rows
        if it.num_rows:
            dur = numpy_of(it.column("duration_s"))
            used = numpy_of(it.column("kv_blocks_used"))
            self.duration_s += float(dur.sum())
            self.used_duration += float((used * dur).sum())
        for c in self.INT_COLUMNS:
            if c in names:
                self.ints[c] += int(numpy_of(it.column(c)).sum())
            else:
                self.has[c] = False
        if "draft_proposed_by_position" in names:
            self.has_lists = True
            self.P = _add_padded(self.P, _sum_lists(it.column("draft_proposed_by_position")))
            self.A = _add_padded(self.A, _sum_lists(it.column("draft_accepted_by_position")))


def _add_padded(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    n = max(len(a), len(b))
    out = np.zeros(n, dtype=np.int64)
    out[:len(a)] += a
    out[:len(b)] += b
    return out


def speculation_summary(it) -> dict:
    """Speculative decoding's outcome: accepted / proposed drafts, tokens a generation
    request emits per step in which it drafted, and the acceptance rate per draft position
    (of the requests that drafted it). None when nothing was drafted. `it`: an iterations
    table or its IterationStats."""
    st = it if isinstance(it, IterationStats) else IterationStats.of_table(it)
    proposed = st.ints["draft_tokens_proposed"]
    out = {"spec_acceptance_rate": None, "spec_tokens_per_step": None, "spec_acceptance_by_position": None}
    if not proposed:
        return out
    accepted = st.ints["draft_tokens_accepted"]
    out["spec_acceptance_rate"] = accepted / proposed
    if st.has_lists:
        P, A = st.P, st.A
        if len(P) and P[0]:
            out["spec_tokens_per_step"] = 1.0 + accepted / float(P[0])
            out["spec_acceptance_by_position"] = [float(a / p) if p else None for a, p in zip(A, P)]
    return out


def _sum_lists(col) -> np.ndarray:
    """Element-wise sum of a list<int> column's rows (rows may be shorter)."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if len(col) == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = numpy_of(col.offsets)
    values = numpy_of(col.values)[offsets[0]:offsets[-1]].astype(np.int64)
    lens = np.diff(offsets)
    if not len(values):
        return np.zeros(0, dtype=np.int64)
    pos = np.arange(len(values)) - np.repeat(offsets[:-1] - offsets[0], lens)
    # (float64 weights: exact for these counts, far below 2**53)
    return np.bincount(pos, weights=values, minlength=int(lens.max())).round().astype(np.int64)



def cache_traffic_and_run(ints: dict, evictions_by_priority: dict | None, kv_block_bytes: int, st,
                          backend: str, wall_s: float) -> dict:
    """The summary's last keys, the same for a run held in memory and a streamed one: KV
    evictions and host traffic, speculation counts, backend and wall time."""
    return {
        "evictions": ints["evictions"],
        "evictions_by_priority": {str(k): v for k, v in sorted((evictions_by_priority or {}).items())},
        "offloaded_blocks": ints["offloads"],
        "onboarded_blocks": ints["onboards"],
        "offloaded_bytes": ints["offloads"] * kv_block_bytes,
        "onboarded_bytes": ints["onboards"] * kv_block_bytes,
        **speculation_summary(st),
        "backend": backend,
        "wall_s": float(wall_s),
    }

def summarize(req: pa.Table, it, *, kv_total_blocks: int, backend: str, wall_s: float,
              num_preemptions: int = 0, num_swaps: int = 0, kv_block_bytes: int = 0,
              evictions_by_priority: dict[int, int] | None = None, itl: dict | None = None) -> dict:
    """The summary of a run. `req`: its requests table (token_times may be left out when
    `itl`, the inter-token latencies' `dist`, is given); `it`: its iterations table or their
    IterationStats."""
    lat = request_latencies(req, with_itl=itl is None)
    st = it if isinstance(it, IterationStats) else IterationStats.of_table(it)
    fin = lat["fin_mask"]
    n_fin = int(fin.sum())
    arrival = numpy_of(req.column("arrival_s"))
    finish = numpy_of(req.column("finish_s"))[fin]
    out = numpy_of(req.column("output_len"))[fin]
    prompt = numpy_of(req.column("prompt_len"))[fin]
    cached = numpy_of(req.column("cached_tokens"))[fin]
    if n_fin:
        duration = float(finish.max() - arrival.min())
    else:
        duration = 0.0
    slo_ttft = numpy_of(req.column("slo_ttft_s"))[fin]
    slo_tpot = numpy_of(req.column("slo_tpot_s"))[fin]
    with np.errstate(invalid="ignore"):
        ok_ttft = np.isnan(slo_ttft) | (lat["ttft_s"] <= slo_ttft)
        ok_tpot = np.isnan(slo_tpot) | np.isnan(lat["tpot_s"]) | (lat["tpot_s"] <= slo_tpot)
    good = int((ok_ttft & ok_tpot).sum())
    kv_util = float(st.used_duration / (st.duration_s * kv_total_blocks)) if st.rows else 0.0
    per = lambda x: x / duration if duration > 0 else 0.0  # noqa: E731
    summary = {
        "num_requests": int(req.num_rows),
        "num_finished": n_fin,
        "num_rejected": int(req.num_rows - n_fin),
        "rejected_by_reason": _rejected_by_reason(req),
        "num_iterations": int(st.rows),
        "num_preemptions": int(num_preemptions),
        "num_swaps": int(num_swaps),
        "duration_s": duration,
    }
    for k in LATENCY_KEYS:
        summary[k] = itl if (k == "itl_s" and itl is not None) else dist(lat[k])
    summary["queue_s"] = dist(lat["queue_s"])
    summary["long_waits"] = long_waits(lat["queue_s"], lat["e2e_s"])
    ints = st.ints
    summary.update({
        "throughput_req_s": per(n_fin),
        "throughput_out_tok_s": per(float(out.sum())),
        "goodput_req_s": per(good),
        "kv_util_mean": kv_util,
        # over the prompt tokens of finished requests (a rejected request never ran)...
        "prefix_hit_rate": float(cached.sum() / prompt.sum()) if n_fin else 0.0,
        # ... and over every request's prompt tokens, rejected ones included
        "prefix_hit_rate_all_requests": _hit_rate_all(req),
        "prefix_hit_rate_by_tenant": _by_tenant_hit(req, fin),
        "reused_tokens": int(cached.sum()),
        # context tokens computed beyond each prompt's uncached part: preemption recompute
        "recomputed_tokens": int(ints["ctx_tokens"] - (prompt - cached).sum())
        if n_fin == req.num_rows else None,
        **cache_traffic_and_run(ints, evictions_by_priority, kv_block_bytes, st, backend, wall_s),
    })
    return summary


def flat_row(summary: dict) -> dict:
    """One comparison.csv row: scalars as they are, distributions as key_stat columns."""
    row = {}
    for k, v in summary.items():
        if isinstance(v, list) and v and isinstance(v[0], dict):
            continue  # a table of its own (per_replica): summary.json has it
        if isinstance(v, dict):
            for s, x in v.items():
                row[f"{k}_{s}"] = x
        else:
            row[k] = v
    return row
