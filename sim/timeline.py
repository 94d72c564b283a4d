"""Chrome traces of runs (open in https://ui.perfetto.dev or chrome://tracing).

* ``timeline.json``, written by `sim run` (``output.timeline``): the first 5,000 iterations,
  one slice per iteration (context / mixed / decode) per replica with the batch in its
  arguments, and a KV-use counter track (:func:`write_chrome_trace`).
* `sim timeline RUN_DIR` (:func:`write_run_trace`): the same for *every* iteration of a
  finished run, after the fact, plus each request as nested async spans -- ``request``
  (arrival to last token) holding ``queued`` (arrival to first scheduled), ``prefill``
  (first scheduled to first token) and ``decode`` (first token to last) -- on its
  replica's track. Both tables are read in record batches and the JSON written as it goes,
  so memory stays flat in the run's size (a 1M-request run is read 65,536 rows at a time).
  ``--start/--end`` keep what overlaps a time window, ``--replicas`` some replicas; an
  output name ending in ``.gz`` is gzip-compressed (Perfetto opens it as it is).
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import IO, Iterable, Iterator

import numpy as np
import pyarrow as pa

from .types import ConfigError

ITERATION_COLUMNS = ("replica", "iteration", "start_s", "duration_s", "num_ctx_requests", "num_gen_requests",
                     "ctx_tokens", "gen_tokens", "padded_tokens", "kv_blocks_used", "graph")
REQUEST_COLUMNS = ("request_id", "replica", "status", "arrival_s", "first_scheduled_s", "first_token_s",
                   "finish_s", "prompt_len", "output_len", "cached_tokens", "preemptions")
BATCH_ROWS = 65_536


def _us(x: np.ndarray) -> np.ndarray:
    return np.round(x * 1e6, 3)


def iteration_events(cols: dict[str, np.ndarray]) -> Iterator[dict]:
    """The slice and KV-counter events of a batch of iterations (columns by name). ``ts`` and
    the end are rounded and ``dur`` is their difference: back-to-back iterations meet exactly
    (rounding ts and dur separately made slices overlap by a nanosecond)."""
    ts = _us(cols["start_s"])
    end = _us(cols["start_s"] + cols["duration_s"])
    dur = np.round(end - ts, 3)
    ctx_r, gen_r = cols["num_ctx_requests"], cols["num_gen_requests"]
    for i in range(len(ts)):
        ctx, gen = int(ctx_r[i]), int(gen_r[i])
        name = "decode" if ctx == 0 else ("context" if gen == 0 else "mixed")
        pid = int(cols["replica"][i])
        yield {"name": name, "ph": "X", "pid": pid, "tid": 0, "ts": float(ts[i]), "dur": float(dur[i]),
               "args": {"iteration": int(cols["iteration"][i]), "ctx_requests": ctx, "gen_requests": gen,
                        "ctx_tokens": int(cols["ctx_tokens"][i]), "padded": int(cols["padded_tokens"][i]),
                        "graph": bool(cols["graph"][i])}}
        yield {"name": "KV blocks used", "ph": "C", "pid": pid, "ts": float(ts[i]),
               "args": {"used": int(cols["kv_blocks_used"][i])}}


def request_events(cols: dict[str, np.ndarray]) -> Iterator[dict]:
    """Each finished request of a batch as nested async spans on its replica's track:
    request > queued, prefill, decode (a phase of zero length is left out)."""
    t = {k: _us(cols[k]) for k in ("arrival_s", "first_scheduled_s", "first_token_s", "finish_s")}
    for i in range(len(t["arrival_s"])):
        if cols["status"][i] != "finished":
            continue
        a, s, f, e = (float(t[k][i]) for k in ("arrival_s", "first_scheduled_s", "first_token_s", "finish_s"))
        rid, pid = int(cols["request_id"][i]), int(cols["replica"][i])
        base = {"cat": "request", "id": rid, "pid": pid, "tid": 1}
        yield {**base, "name": "request", "ph": "b", "ts": a,
               "args": {"request_id": rid, "prompt_len": int(cols["prompt_len"][i]),
                        "output_len": int(cols["output_len"][i]), "cached_tokens": int(cols["cached_tokens"][i]),
                        "preemptions": int(cols["preemptions"][i])}}
        for name, lo, hi in (("queued", a, s), ("prefill", s, f), ("decode", f, e)):
            if hi > lo:
                yield {**base, "name": name, "ph": "b", "ts": lo}
                yield {**base, "name": name, "ph": "e", "ts": hi}
        yield {**base, "name": "request", "ph": "e", "ts": e}


class TraceWriter:
    """A Chrome trace written event by event: ``{"traceEvents": [...], ...}``."""

    def __init__(self, f: IO[str]):
        self.f = f
        self.n = 0
        f.write('{"traceEvents":[')

    def write(self, events: Iterable[dict]) -> None:
        dumps = json.JSONEncoder(separators=(",", ":")).encode
        buf = []
        for ev in events:
            buf.append(dumps(ev))
            if len(buf) >= 4096:
                self._flush(buf)
                buf = []
        self._flush(buf)

    def _flush(self, buf: list[str]) -> None:
        if not buf:
            return
        self.f.write(("," if self.n else "") + ",".join(buf))
        self.n += len(buf)

    def close(self, other: dict) -> None:
        self.f.write('],"displayTimeUnit":"ms","otherData":' + json.dumps(other) + "}")


def _process_names(replicas: Iterable[int]) -> list[dict]:
    return [{"name": "process_name", "ph": "M", "pid": int(r), "args": {"name": f"replica {r}"}} for r in replicas]


def write_chrome_trace(it: pa.Table, path: Path, max_iterations: int = 5_000) -> int:
    """`sim run`'s timeline.json: at most `max_iterations` iterations (the first ones);
    returns how many."""
    n = min(it.num_rows, max_iterations)
    cols = {c: it.column(c).to_numpy()[:n] for c in ITERATION_COLUMNS}
    with open(path, "w") as f:
        w = TraceWriter(f)
        w.write(_process_names(np.unique(cols["replica"])))
        w.write(iteration_events(cols))
        w.close({"iterations_written": n, "iterations_in_run": it.num_rows})
    return n


def _open_table(path: Path, kind: str, columns: tuple[str, ...]):
    """A ParquetFile of a run table, checked as `read_run_table` checks (without reading it)."""
    import pyarrow.parquet as pq

    from .schemas import READABLE_VERSIONS, file_version

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # ArrowInvalid, OSError: unreadable
        raise ConfigError(f"cannot read this Parquet file ({type(e).__name__}: {e})", str(path)) from None
    schema = pf.schema_arrow
    if file_version(schema) not in READABLE_VERSIONS:
        raise ConfigError(f"written with another output schema version; this servesim reads "
                          f"{', '.join(map(str, READABLE_VERSIONS))}", str(path))
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise ConfigError(f"missing column(s) {', '.join(missing)}; expected the {kind} columns a run writes "
                          "(sim/schemas.py)", str(path))
    return pf


def _batches(pf, columns: tuple[str, ...]) -> Iterator[dict[str, np.ndarray]]:
    for b in pf.iter_batches(batch_size=BATCH_ROWS, columns=list(columns)):
        yield {c: b.column(c).to_numpy(zero_copy_only=False) for c in columns}


def _select(cols: dict[str, np.ndarray], lo: np.ndarray, hi: np.ndarray, start: float | None, end: float | None,
            replicas: set[int] | None) -> dict[str, np.ndarray]:
    m = np.ones(len(lo), dtype=bool)
    if start is not None:
        m &= hi >= start
    if end is not None:
        m &= lo <= end
    if replicas is not None:
        m &= np.isin(cols["replica"], list(replicas))
    return cols if m.all() else {k: v[m] for k, v in cols.items()}


def write_run_trace(run_dir: Path, out: Path, *, start: float | None = None, end: float | None = None,
                    replicas: set[int] | None = None, requests: bool = True) -> dict:
    """The Chrome trace of a finished run (module doc). Returns the counts written."""
    from .rundir import check_finished_run

    run_dir = Path(run_dir)
    check_finished_run(run_dir)
    its = _open_table(run_dir / "iterations.parquet", "iterations", ITERATION_COLUMNS)
    reqs = _open_table(run_dir / "requests.parquet", "requests", REQUEST_COLUMNS) if requests else None
    seen: set[int] = set()
    counts = {"iterations_written": 0, "iterations_in_run": its.metadata.num_rows, "requests_written": 0,
              "requests_in_run": reqs.metadata.num_rows if reqs is not None else None}
    tmp = out.with_name(f".{out.name}.partial")
    opener = gzip.open if out.name.endswith(".gz") else open
    try:
        with opener(tmp, "wt") as f:
            w = TraceWriter(f)
            for cols in _batches(its, ITERATION_COLUMNS):
                cols = _select(cols, cols["start_s"], cols["start_s"] + cols["duration_s"], start, end, replicas)
                new = set(np.unique(cols["replica"]).tolist()) - seen
                w.write(_process_names(sorted(new)))
                seen |= new
                w.write(iteration_events(cols))
                counts["iterations_written"] += len(cols["start_s"])
            if reqs is not None:
                for cols in _batches(reqs, REQUEST_COLUMNS):
                    fin = cols["status"] == "finished"
                    cols = {k: v[fin] for k, v in cols.items()}
                    cols = _select(cols, cols["arrival_s"], cols["finish_s"], start, end, replicas)
                    w.write(request_events(cols))
                    counts["requests_written"] += len(cols["arrival_s"])
            w.close({**counts, "window_s": [start, end], "replicas": sorted(replicas) if replicas else None})
        tmp.replace(out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {e.filename or out}: {e.strerror or e}", "command line: --out") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return counts


def add_arguments(p) -> None:
    p.add_argument("run_dir", help="a finished run's folder (runs/<experiment>/<variant>)")
    p.add_argument("--out", help="trace file to write (default RUN_DIR/timeline_full.json; .gz: compressed)")
    p.add_argument("--start", type=float, metavar="S", help="keep what overlaps the window from S seconds")
    p.add_argument("--end", type=float, metavar="S", help="... to S seconds")
    p.add_argument("--replicas", metavar="N[,N]", help="keep these replicas only (comma-separated)")
    p.add_argument("--no-requests", action="store_true", help="iterations only (no request spans)")


def _replicas(text: str | None) -> set[int] | None:
    if text is None:
        return None
    try:
        out = {int(x) for x in text.split(",") if x.strip()}
    except ValueError:
        out = set()
    if not out or min(out) < 0:
        raise ConfigError(f"{text!r}: give replica numbers (0, 1, ...), comma-separated", "command line: --replicas")
    return out


def timeline_cli(args, console) -> int:
    problems = []
    for name in ("start", "end"):
        v = getattr(args, name)
        if v is not None and (not math.isfinite(v) or v < 0):
            problems.append((f"command line: --{name}", f"expected a time in seconds >= 0, got {v}"))
    if args.start is not None and args.end is not None and args.end <= args.start:
        problems.append(("command line: --end", f"--end ({args.end:g}) must be after --start ({args.start:g})"))
    try:
        reps = _replicas(args.replicas)
    except ConfigError as e:
        problems.extend(e.problems)
    if problems:
        raise ConfigError(problems)
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise ConfigError("not a run folder (sim run writes runs/<experiment>/<variant>/)", str(run_dir))
    out = Path(args.out) if args.out else run_dir / "timeline_full.json"
    c = write_run_trace(run_dir, out, start=args.start, end=args.end, replicas=reps, requests=not args.no_requests)
    req = (f", {c['requests_written']:,} of {c['requests_in_run']:,} requests" if c["requests_in_run"] is not None
           else "")
    console.print(f"[green]wrote[/] {out}: {c['iterations_written']:,} of {c['iterations_in_run']:,} iterations{req} "
                  "(open it in https://ui.perfetto.dev)")
    return 0


__all__ = ["write_chrome_trace", "write_run_trace", "iteration_events", "request_events", "TraceWriter",
           "add_arguments", "timeline_cli"]
