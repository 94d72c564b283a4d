"""A streamed run's summary from its requests.parquet, a batch of rows at a time.

`metrics.summarize` reads whole columns; here the same summary comes from passes over the
written file's scalar columns in batches of BATCH_ROWS rows, so what the summary holds is
bounded by the batch and by `dist_of_chunks`' limit, not by the run's length:

* counts and integer sums (finished, rejected by reason, output / prompt / cached tokens,
  per tenant) are exact in any order;
* the latency distributions (TTFT, TPOT, E2E, queueing) go through `metrics.dist_of_chunks`:
  up to its limit (ITL_IN_MEMORY values) gathered, the same floats as `dist`; beyond, the
  mean from per-batch sums and the percentiles exact by `metrics.select_ranks`;
* the long-wait median is the exact middle order statistic(s) (`select_ranks`), as
  `np.median` takes them.

`summarize_file(path, ...)` returns what `summarize(table, ...)` returns for the same rows
(tests/test_stream_summary.py checks it, key by key).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .metrics import (LATENCY_KEYS, LONG_WAIT_FACTOR, IterationStats, _equals, cache_traffic_and_run,
                      dist_of_chunks, select_ranks, string_counts)
from .schemas import numpy_of

BATCH_ROWS = 1 << 16
# the columns the summary reads (request_latencies' and summarize's)
COLUMNS = ("status", "reject_reason", "arrival_s", "first_scheduled_s", "first_token_s", "finish_s", "prompt_len",
           "output_len", "cached_tokens", "tenant", "slo_ttft_s", "slo_tpot_s")


def _batches(path: Path, columns, batch_rows: int):
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = [c for c in columns if c in pf.schema_arrow.names]
    try:
        for b in pf.iter_batches(batch_size=batch_rows, columns=names):
            yield b
    finally:
        pf.close()


class RequestPasses:
    """The batches of a requests file's summary columns (COLUMNS), pass after pass
    (``passes()``: a fresh iterator of batches), and each batch's `_latencies`. A file of
    at most one batch is read once and its batch held (what one pass holds anyway: the
    summary's ~10 passes over the Azure trace's file were ~0.04 s of reading again);
    a longer file is read again each pass (bounded memory)."""

    def __init__(self, path: str | Path, batch_rows: int = BATCH_ROWS):
        import pyarrow.parquet as pq

        self.path = Path(path)
        self.batch_rows = batch_rows
        self.held: list | None = None
        pf = pq.ParquetFile(self.path)
        try:
            if pf.metadata.num_rows <= batch_rows:
                names = [c for c in COLUMNS if c in pf.schema_arrow.names]
                self.held = [(b, None) for b in pf.iter_batches(batch_size=batch_rows, columns=names)]
        finally:
            pf.close()

    def __call__(self):
        """The batches, with their latencies: (batch, `_latencies(batch)`) pairs."""
        if self.held is None:
            for b in _batches(self.path, COLUMNS, self.batch_rows):
                yield b, _latencies(b)
            return
        for i, (b, lat) in enumerate(self.held):
            if lat is None:
                lat = _latencies(b)
                self.held[i] = (b, lat)
            yield b, lat


def _latencies(b) -> dict[str, np.ndarray]:
    """metrics.request_latencies of one batch (finished rows only), the same arithmetic."""
    fin = _equals(b.column("status"), "finished")
    arrival = numpy_of(b.column("arrival_s"))[fin]
    first = numpy_of(b.column("first_token_s"))[fin]
    last = numpy_of(b.column("finish_s"))[fin]
    out = numpy_of(b.column("output_len"))[fin]
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(out > 1, (last - first) / np.maximum(out - 1, 1), np.nan)
    sched = numpy_of(b.column("first_scheduled_s"))[fin]
    return {"ttft_s": first - arrival, "tpot_s": tpot, "e2e_s": last - arrival, "queue_s": sched - arrival,
            "fin_mask": fin}


def _median_of_chunks(chunks, n: int) -> float:
    """np.median of the n finite values ``chunks()`` yields (exact order statistics)."""
    lo, hi = (n - 1) // 2, n // 2
    v = select_ranks(chunks, sorted({lo, hi}))
    return float(np.mean([v[lo], v[hi]]))


def summarize_file(path: str | Path, it, *, kv_total_blocks: int, backend: str, wall_s: float,
                   num_preemptions: int = 0, num_swaps: int = 0, kv_block_bytes: int = 0,
                   evictions_by_priority: dict[int, int] | None = None, itl: dict,
                   batch_rows: int = BATCH_ROWS, limit: int | None = None,
                   passes: RequestPasses | None = None) -> dict:
    """`metrics.summarize` of the requests in the Parquet file `path` (module doc); `itl`:
    the pooled inter-token latencies' `dist` (RunRecorder.itl_dist); `limit`:
    `dist_of_chunks`' (ITL_IN_MEMORY by default); `passes`: the file's RequestPasses,
    if already made."""
    path = Path(path)
    passes = passes if passes is not None else RequestPasses(path, batch_rows)
    st = it if isinstance(it, IterationStats) else IterationStats.of_table(it)
    n_req = n_fin = good = 0
    out_sum = prompt_fin = cached_fin = prompt_all = cached_all = 0
    arr_min, fin_max = np.inf, -np.inf
    reasons: dict[str, int] = {}
    has_reason = False
    tenants: dict[str, list[int]] = {}  # finished requests' tenant -> [cached, prompt]
    for b, lat in passes():
        fin = lat["fin_mask"]
        k = int(fin.sum())
        n_req += b.num_rows
        n_fin += k
        arrival = numpy_of(b.column("arrival_s"))
        if len(arrival):
            arr_min = min(arr_min, float(arrival.min()))
        if k:
            fin_max = max(fin_max, float(numpy_of(b.column("finish_s"))[fin].max()))
        prompt = numpy_of(b.column("prompt_len"))
        cached = numpy_of(b.column("cached_tokens"))
        prompt_all += int(prompt.sum())
        cached_all += int(cached.sum())
        prompt_fin += int(prompt[fin].sum())
        cached_fin += int(cached[fin].sum())
        out_sum += int(numpy_of(b.column("output_len"))[fin].sum())
        slo_ttft = numpy_of(b.column("slo_ttft_s"))[fin]
        slo_tpot = numpy_of(b.column("slo_tpot_s"))[fin]
        with np.errstate(invalid="ignore"):
            ok_ttft = np.isnan(slo_ttft) | (lat["ttft_s"] <= slo_ttft)
            ok_tpot = np.isnan(slo_tpot) | np.isnan(lat["tpot_s"]) | (lat["tpot_s"] <= slo_tpot)
        good += int((ok_ttft & ok_tpot).sum())
        if "reject_reason" in b.schema.names:
            has_reason = True
            for v, c in string_counts(b.column("reject_reason")).items():
                if v:
                    reasons[v] = reasons.get(v, 0) + c
        if k:
            tenant = b.column("tenant")
            pf_, cf_ = prompt[fin], cached[fin]
            for t in string_counts(tenant, fin):
                m = _equals(tenant, t)[fin]
                acc = tenants.setdefault(str(t), [0, 0])
                acc[0] += int(cf_[m].sum())
                acc[1] += int(pf_[m].sum())
    duration = float(fin_max - arr_min) if n_fin else 0.0

    def chunks_of(key: str):
        def chunks():
            for _, lat in passes():
                yield lat[key]
        return chunks

    summary = {
        "num_requests": n_req,
        "num_finished": n_fin,
        "num_rejected": n_req - n_fin,
        "rejected_by_reason": dict(sorted(reasons.items())) if has_reason else {},
        "num_iterations": int(st.rows),
        "num_preemptions": int(num_preemptions),
        "num_swaps": int(num_swaps),
        "duration_s": duration,
    }
    for k in LATENCY_KEYS:
        summary[k] = itl if k == "itl_s" else dist_of_chunks(chunks_of(k), limit)
    summary["queue_s"] = dist_of_chunks(chunks_of("queue_s"), limit)
    summary["long_waits"] = _long_waits(chunks_of("queue_s"), chunks_of("e2e_s"), n_fin)
    kv_util = float(st.used_duration / (st.duration_s * kv_total_blocks)) if st.rows else 0.0
    per = lambda x: x / duration if duration > 0 else 0.0  # noqa: E731
    ints = st.ints
    summary.update({
        "throughput_req_s": per(n_fin),
        "throughput_out_tok_s": per(float(out_sum)),
        "goodput_req_s": per(good),
        "kv_util_mean": kv_util,
        "prefix_hit_rate": float(np.int64(cached_fin) / np.int64(prompt_fin)) if n_fin else 0.0,
        "prefix_hit_rate_all_requests": float(np.int64(cached_all) / np.int64(prompt_all)) if prompt_all else 0.0,
        "prefix_hit_rate_by_tenant": ({t: float(np.int64(c) / np.int64(p)) for t, (c, p) in sorted(tenants.items())}
                                      if len(tenants) >= 2 else {}),
        "reused_tokens": int(cached_fin),
        "recomputed_tokens": int(ints["ctx_tokens"] - (prompt_fin - cached_fin)) if n_fin == n_req else None,
        **cache_traffic_and_run(ints, evictions_by_priority, kv_block_bytes, st, backend, wall_s),
    })
    return summary


def _long_waits(queue_chunks, e2e_chunks, n: int, factor: float = LONG_WAIT_FACTOR) -> dict:
    """metrics.long_waits from passes over the finished requests' queueing and E2E times."""
    if not n:
        return {"factor": factor, "threshold_s": None, "count": 0, "max_wait_s": None}
    thr = factor * _median_of_chunks(e2e_chunks, n)
    count, mx = 0, -np.inf
    for q in queue_chunks():
        if len(q):
            count += int((q > thr).sum())
            mx = max(mx, float(q.max()))
    return {"factor": factor, "threshold_s": thr, "count": count, "max_wait_s": float(mx)}


def bound_sums_file(path: str | Path, k: int, batch_rows: int = BATCH_ROWS, passes: RequestPasses | None = None):
    """bounds.BoundSums (`k` drafts per step) of the finished requests in `path`, a batch at
    a time (`passes`: the file's RequestPasses, if made: its held batch)."""
    from .bounds import BoundSums

    acc = BoundSums(k)
    if passes is not None and passes.held is not None:
        for b, _ in passes.held:
            acc.add_table(b)
        return acc
    for b in _batches(path, ("status", "prompt_len", "output_len", "cached_tokens"), batch_rows):
        acc.add_table(b)
    return acc
