"""Summary metrics (summary.json) computed from the output tables.

Both backends go through this one function, so a sim run and a GPU run of the same
requests are summarised identically.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

LATENCY_KEYS = ("ttft_s", "tpot_s", "itl_s", "e2e_s")
# a request waited "long" when its queueing delay (arrival to first scheduled) exceeds this
# many times the run's median end-to-end latency: a sign of starvation, warned about
LONG_WAIT_FACTOR = 10.0


def dist(x: np.ndarray) -> dict[str, float | None]:
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    p50, p90, p99 = np.percentile(x, [50, 90, 99])
    return {"mean": float(x.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def request_latencies(req: pa.Table) -> dict[str, np.ndarray]:
    """TTFT, TPOT, E2E per finished request and the pooled inter-token latencies."""
    status = req.column("status").to_numpy(zero_copy_only=False)
    fin = status == "finished"
    arrival = req.column("arrival_s").to_numpy()[fin]
    first = req.column("first_token_s").to_numpy()[fin]
    last = req.column("finish_s").to_numpy()[fin]
    out = req.column("output_len").to_numpy()[fin]
    tt = req.column("token_times").combine_chunks()
    offsets = tt.offsets.to_numpy()
    values = tt.values.to_numpy()
    d = np.diff(values)
    # a gap belongs to a request when it does not cross into the next request's list
    starts = offsets[1:-1]  # index where each later list begins
    mask = np.ones(len(d), dtype=bool)
    valid = starts[(starts > 0) & (starts <= len(d))]
    mask[valid - 1] = False
    itl = d[mask] if len(d) else d
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(out > 1, (last - first) / np.maximum(out - 1, 1), np.nan)
    sched = req.column("first_scheduled_s").to_numpy()[fin]
    return {"ttft_s": first - arrival, "tpot_s": tpot, "itl_s": itl, "e2e_s": last - arrival,
            "queue_s": sched - arrival, "fin_mask": fin}


def long_waits(queue_s: np.ndarray, e2e_s: np.ndarray, factor: float = LONG_WAIT_FACTOR) -> dict:
    """Requests whose queueing delay exceeded `factor` x the median end-to-end latency."""
    if not len(e2e_s):
        return {"factor": factor, "threshold_s": None, "count": 0, "max_wait_s": None}
    thr = factor * float(np.median(e2e_s))
    return {"factor": factor, "threshold_s": thr, "count": int((queue_s > thr).sum()),
            "max_wait_s": float(queue_s.max())}


def _by_tenant_hit(req: pa.Table, fin: np.ndarray) -> dict[str, float]:
    """Prefix hit rate per tenant (empty when the workload has a single tenant)."""
    tenant = np.asarray(req.column("tenant").to_pylist(), dtype=object)[fin]
    names = sorted(set(tenant.tolist()))
    if len(names) < 2:
        return {}
    prompt = req.column("prompt_len").to_numpy()[fin]
    cached = req.column("cached_tokens").to_numpy()[fin]
    return {str(t): float(cached[tenant == t].sum() / prompt[tenant == t].sum()) for t in names}


def _rejected_by_reason(req: pa.Table) -> dict[str, int]:
    if "reject_reason" not in req.column_names:  # a run of schema version 1
        return {}
    reasons = req.column("reject_reason").to_pylist()
    out: dict[str, int] = {}
    for r in reasons:
        if r:
            out[r] = out.get(r, 0) + 1
    return dict(sorted(out.items()))


def _hit_rate_all(req: pa.Table) -> float:
    prompt = int(req.column("prompt_len").to_numpy().sum())
    return float(req.column("cached_tokens").to_numpy().sum() / prompt) if prompt else 0.0


def speculation_summary(it: pa.Table) -> dict:
    """Speculative decoding's outcome: accepted / proposed drafts, tokens a generation
    request emits per step in which it drafted, and the acceptance rate per draft position
    (of the requests that drafted it). None when nothing was drafted."""
    proposed = int(it.column("draft_tokens_proposed").to_numpy().sum()) if "draft_tokens_proposed" in \
        it.column_names else 0
    out = {"spec_acceptance_rate": None, "spec_tokens_per_step": None, "spec_acceptance_by_position": None}
    if not proposed:
        return out
    accepted = int(it.column("draft_tokens_accepted").to_numpy().sum())
    out["spec_acceptance_rate"] = accepted / proposed
    if "draft_proposed_by_position" in it.column_names:
        P = _sum_lists(it.column("draft_proposed_by_position"))
        A = _sum_lists(it.column("draft_accepted_by_position"))
        if len(P) and P[0]:
            out["spec_tokens_per_step"] = 1.0 + accepted / float(P[0])
            out["spec_acceptance_by_position"] = [float(a / p) if p else None for a, p in zip(A, P)]
    return out


def _sum_lists(col) -> np.ndarray:
    """Element-wise sum of a list<int> column's rows (rows may be shorter)."""
    rows = col.to_pylist()
    n = max((len(r) for r in rows if r), default=0)
    out = np.zeros(n, dtype=np.int64)
    for r in rows:
        if r:
            out[:len(r)] += r
    return out


def summarize(req: pa.Table, it: pa.Table, *, kv_total_blocks: int, backend: str, wall_s: float,
              num_preemptions: int = 0, num_swaps: int = 0, kv_block_bytes: int = 0,
              evictions_by_priority: dict[int, int] | None = None) -> dict:
    lat = request_latencies(req)
    fin = lat["fin_mask"]
    n_fin = int(fin.sum())
    arrival = req.column("arrival_s").to_numpy()
    finish = req.column("finish_s").to_numpy()[fin]
    out = req.column("output_len").to_numpy()[fin]
    prompt = req.column("prompt_len").to_numpy()[fin]
    cached = req.column("cached_tokens").to_numpy()[fin]
    if n_fin:
        duration = float(finish.max() - arrival.min())
    else:
        duration = 0.0
    slo_ttft = req.column("slo_ttft_s").to_numpy()[fin]
    slo_tpot = req.column("slo_tpot_s").to_numpy()[fin]
    with np.errstate(invalid="ignore"):
        ok_ttft = np.isnan(slo_ttft) | (lat["ttft_s"] <= slo_ttft)
        ok_tpot = np.isnan(slo_tpot) | np.isnan(lat["tpot_s"]) | (lat["tpot_s"] <= slo_tpot)
    good = int((ok_ttft & ok_tpot).sum())
    dur_it = it.column("duration_s").to_numpy()
    used = it.column("kv_blocks_used").to_numpy()
    kv_util = float((used * dur_it).sum() / (dur_it.sum() * kv_total_blocks)) if len(dur_it) else 0.0
    per = lambda x: x / duration if duration > 0 else 0.0  # noqa: E731
    summary = {
        "num_requests": int(req.num_rows),
        "num_finished": n_fin,
        "num_rejected": int(req.num_rows - n_fin),
        "rejected_by_reason": _rejected_by_reason(req),
        "num_iterations": int(it.num_rows),
        "num_preemptions": int(num_preemptions),
        "num_swaps": int(num_swaps),
        "duration_s": duration,
    }
    for k in LATENCY_KEYS:
        summary[k] = dist(lat[k])
    summary["queue_s"] = dist(lat["queue_s"])
    summary["long_waits"] = long_waits(lat["queue_s"], lat["e2e_s"])
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
        "recomputed_tokens": int(it.column("ctx_tokens").to_numpy().sum() - (prompt - cached).sum())
        if n_fin == req.num_rows else None,
        "evictions": int(it.column("evictions").to_numpy().sum()),
        "evictions_by_priority": {str(k): v for k, v in sorted((evictions_by_priority or {}).items())},
        "offloaded_blocks": int(it.column("offloads").to_numpy().sum()),
        "onboarded_blocks": int(it.column("onboards").to_numpy().sum()),
        "offloaded_bytes": int(it.column("offloads").to_numpy().sum()) * kv_block_bytes,
        "onboarded_bytes": int(it.column("onboards").to_numpy().sum()) * kv_block_bytes,
        **speculation_summary(it),
        "backend": backend,
        "wall_s": float(wall_s),
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
