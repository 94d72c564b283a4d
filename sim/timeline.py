"""timeline.json: a run's iterations as a Chrome trace (open in https://ui.perfetto.dev or
chrome://tracing): one slice per iteration (context / mixed / decode), per replica, with
the batch in its arguments, and a KV-use counter track."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa


def write_chrome_trace(it: pa.Table, path: Path, max_iterations: int = 5_000) -> int:
    """Writes at most `max_iterations` iterations (the first ones); returns how many."""
    n = min(it.num_rows, max_iterations)
    cols = {c: it.column(c).to_numpy()[:n] for c in (
        "replica", "iteration", "start_s", "duration_s", "num_ctx_requests", "num_gen_requests",
        "ctx_tokens", "gen_tokens", "padded_tokens", "kv_blocks_used", "graph")}
    # ts and end rounded, dur their difference: back-to-back iterations meet exactly (rounding
    # ts and dur separately made slices overlap by a nanosecond)
    ts = np.round(cols["start_s"] * 1e6, 3)
    end = np.round((cols["start_s"] + cols["duration_s"]) * 1e6, 3)
    dur = np.round(end - ts, 3)
    events = []
    for r in np.unique(cols["replica"]):
        events.append({"name": "process_name", "ph": "M", "pid": int(r), "args": {"name": f"replica {r}"}})
    for i in range(n):
        ctx, gen = int(cols["num_ctx_requests"][i]), int(cols["num_gen_requests"][i])
        name = "decode" if ctx == 0 else ("context" if gen == 0 else "mixed")
        pid = int(cols["replica"][i])
        events.append({"name": name, "ph": "X", "pid": pid, "tid": 0, "ts": float(ts[i]), "dur": float(dur[i]),
                       "args": {"iteration": int(cols["iteration"][i]), "ctx_requests": ctx, "gen_requests": gen,
                                "ctx_tokens": int(cols["ctx_tokens"][i]), "padded": int(cols["padded_tokens"][i]),
                                "graph": bool(cols["graph"][i])}})
        events.append({"name": "KV blocks used", "ph": "C", "pid": pid, "ts": float(ts[i]),
                       "args": {"used": int(cols["kv_blocks_used"][i])}})
    doc = {"traceEvents": events, "displayTimeUnit": "ms",
           "otherData": {"iterations_written": n, "iterations_in_run": it.num_rows}}
    path.write_text(json.dumps(doc, separators=(",", ":")))
    return n
