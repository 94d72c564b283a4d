"""Bounded-memory runs: records stream to the run directory's Parquet files as the run goes.

`simulate(setup, out_dir=DIR)` (sim/runner.py) attaches a :class:`RunRecorder` to every
engine. Every so many records (FLUSH_RECORDS iterations and stretches, or FLUSH_DONE
finished requests) the engine hands them over (:meth:`RunRecorder.flush`, called from
`Engine.step`): its iterations and closed-form stretches since the last flush become
per-iteration rows (sim/records.py, the same code as a run held in memory), its finished
requests get their token times and become rows, and both are written to Parquet in row
groups; the engine drops the records and the finished Request objects.
What stays in memory is bounded by the batch, not by the run's length:

* the end times of a replica's iterations back to the first token of its oldest live
  request (a request's token times are gathered from them when it finishes);
* finished requests waiting for an earlier request id to finish (requests.parquet is in
  request-id order, as a run held in memory writes it);
* one row group of each table being filled.

Row groups: iterations.parquet in groups of ROW_GROUP_ROWS rows (what pyarrow's
`write_table` makes of a table held in memory, so the file is byte-identical to that
path's), requests.parquet in groups of REQUEST_GROUP_ROWS requests (byte-identical up to
that many requests; beyond, the same rows in smaller groups).

The summary comes from the written files and per-group sums: request metrics from the
scalar columns read back (exact percentiles), pooled inter-token latencies exactly by
`metrics.dist_of_chunks` over the token_times column group by group, iteration sums and the
energy per iteration row group (`IterationStats`, `EnergyAccumulator`), the same
arithmetic a run held in memory does, so the summaries are the same floats.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .metrics import ITL_IN_MEMORY, IterationStats, dist, dist_of_chunks, gaps_within, itl_values
from .records import add_derived, draft_lists, iteration_columns, request_table, token_times
from .schemas import REQUEST_GROUP_ROWS, ROW_GROUP_ROWS, WRITE_OPTIONS, build_table, numpy_of

# an engine hands its records over when it holds this many iteration records (general
# iterations + stretches) or finished requests
FLUSH_RECORDS = 1 << 15
FLUSH_DONE = 1 << 13
# requests.parquet's columns the summary (metrics.summarize, bounds.run_bounds,
# cluster.per_replica_summary) never reads: left on disk when it reads the rest back
SUMMARY_UNREAD = frozenset({"token_times", "block_hashes", "prompt_tokens", "request_id", "preemptions", "priority"})


class GroupWriter:
    """Writes the tables it is given to one Parquet file in row groups of exactly
    `group_rows` rows (the last one shorter), as `pq.write_table` splits one table:
    ``on_group(table)`` sees each group as it is written."""

    def __init__(self, path: Path, group_rows: int, on_group=None):
        self.path = Path(path)
        self.group_rows = group_rows
        self.on_group = on_group
        self.buf: list[pa.Table] = []
        self.buffered = 0
        self.writer: pq.ParquetWriter | None = None
        self.schema: pa.Schema | None = None
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if self.schema is None:
            self.schema = table.schema
        elif table.schema != self.schema:
            table = table.cast(self.schema)
        if table.num_rows == 0:
            return
        self.buf.append(table)
        self.buffered += table.num_rows
        while self.buffered >= self.group_rows:
            self._emit(self.group_rows)

    def _emit(self, n: int) -> None:
        t = pa.concat_tables(self.buf) if len(self.buf) > 1 else self.buf[0]
        group, rest = t.slice(0, n), t.slice(n)  # (chunked or not: the same bytes, checked in the tests)
        self.buf = [rest] if rest.num_rows else []
        self.buffered = rest.num_rows
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, self.schema, **WRITE_OPTIONS)
        self.writer.write_table(group, row_group_size=self.group_rows)
        self.rows += group.num_rows
        if self.on_group is not None:
            self.on_group(group)

    def close(self, empty: pa.Table | None = None) -> None:
        """Write what is buffered; a file with no rows gets `empty`'s schema."""
        if self.buffered:
            self._emit(self.buffered)
        if self.writer is None:
            table = empty if self.schema is None else self.schema.empty_table()
            pq.write_table(table, self.path, row_group_size=self.group_rows, **WRITE_OPTIONS)
            if self.on_group is not None:
                self.on_group(table)
        else:
            self.writer.close()


class _Background:
    """``fn(*args)`` on a thread of its own; `join` waits for it and raises what it raised."""

    def __init__(self, fn, *args):
        import threading

        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn, args), name="servesim-writer", daemon=True)
        self.thread.start()

    def _run(self, fn, args) -> None:
        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the thread that joins
            self.error = e

    def join(self, quiet: bool = False) -> None:
        """Wait for it; its error raised (`quiet`: not, the caller has one of its own to raise)."""
        self.thread.join()
        if self.error is not None and not quiet:
            raise self.error


class _Replica:
    """A replica's record state: iterations written so far and the end-time window."""

    def __init__(self, engine, writer):
        self.engine = engine
        self.g = 0  # iterations materialised
        self.base = 0  # iteration index of ends[0]
        self.ends = np.zeros(0)
        self.writer = writer  # its iterations (the final file with one replica, a part file with several)


class RunRecorder:
    """Streams a run's records into `out_dir`'s requests.parquet and iterations.parquet
    (module doc). `request_ids`: every id of the workload; `workload`: its table (for the
    prompt identity columns, sim/runner.py `with_prompt_identity`)."""

    def __init__(self, out_dir: Path, engines, request_ids: np.ndarray, workload, energy=None, *,
                 group_rows: int | None = None, request_group_rows: int | None = None,
                 flush_records: int | None = None, flush_done: int | None = None):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        # (the module's sizes, looked up now: a test sets small ones)
        self.group_rows = group_rows = group_rows or ROW_GROUP_ROWS
        self.request_group_rows = request_group_rows = request_group_rows or REQUEST_GROUP_ROWS
        self.flush_records = flush_records or FLUSH_RECORDS
        self.flush_done = flush_done or FLUSH_DONE
        self.workload = workload
        ids = np.asarray(request_ids, dtype=np.int64)
        self.sorted_ids = np.sort(ids)
        self.dense = bool(len(ids) == 0 or (self.sorted_ids[0] == 0 and self.sorted_ids[-1] == len(ids) - 1
                                            and np.all(np.diff(self.sorted_ids) == 1)))
        if self.dense:  # ids 0..n-1 are their own positions: no sorted copy held for the run
            self.sorted_ids = None
        self.stats = IterationStats()
        self.energy = energy  # EnergyAccumulator or None
        self.speculation = engines[0].cfg.speculation is not None if engines else False
        one = len(engines) == 1
        self.it_path = self.out / "iterations.parquet"
        self.final_it = GroupWriter(self.it_path, group_rows, self._on_iteration_group)
        self.replicas = []
        for e in engines:
            w = self.final_it if one else GroupWriter(self.out / f".iterations.replica{e.replica}.part.parquet",
                                                       group_rows)
            self.replicas.append(_Replica(e, w))
            e.recorder = self
        self.by_engine = {id(r.engine): r for r in self.replicas}
        self.req_path = self.out / "requests.parquet"
        self.req_writer = GroupWriter(self.req_path, request_group_rows)
        self.pending: dict[int, tuple] = {}  # position -> (request, its token times)
        self.next_pos = 0
        self.ready: list[tuple] = []
        self.itl_held: list[np.ndarray] | None = []
        self.itl_count = 0
        self.closed = False

    # ------------------------------------------------------------------ from the engines
    def flush(self, engine) -> None:
        """Take the engine's records since the last flush (iterations, finished requests)."""
        rep = self.by_engine[id(engine)]
        e = engine
        if e.rows or e.stretches:
            cols = iteration_columns(e.rows, e.stretches, e.stretch_hist, e.tpb, rep.g)
            m = len(cols["iteration"])
            add_derived(cols, e.kv.total, e.replica)
            if self.speculation:
                cols.update(draft_lists(e.draft_positions, rep.g, m))
                e.draft_positions.clear()
            e.rows.clear()
            e.stretches.clear()
            e.stretch_hist.clear()
            rep.g += m
            end = cols["start_s"] + cols["duration_s"]
            rep.ends = np.concatenate([rep.ends, end]) if len(rep.ends) else end
            rep.writer.write(build_table("iterations", cols))
        if e.done:
            done = e.done
            e.done = []
            e.num_done_flushed += len(done)
            R = len(self.replicas)
            ends = [np.zeros(0)] * R
            bases = [0] * R
            ends[e.replica], bases[e.replica] = rep.ends, rep.base
            times, offsets = token_times(done, ends, bases)
            ids = np.fromiter((r.request_id for r in done), dtype=np.int64, count=len(done))
            pos = ids if self.dense else np.searchsorted(self.sorted_ids, ids)
            for j, r in enumerate(done):
                self.pending[int(pos[j])] = (r, times[offsets[j]:offsets[j + 1]])
            self._emit_ready(final=False)
        self._trim(rep)

    def _trim(self, rep: _Replica) -> None:
        """Drop the end times no live request of the replica can still need."""
        e = rep.engine
        lo = rep.g
        for coll in (e.decoding.values(), e.context, e.waiting):
            for r in coll:
                if r.spans:
                    lo = min(lo, r.spans[0][0])
        if lo - rep.base > max(len(rep.ends) // 2, 1 << 16):
            rep.ends = rep.ends[lo - rep.base:].copy()
            rep.base = lo

    def _emit_ready(self, final: bool) -> None:
        pending = self.pending
        while self.next_pos in pending:
            r, t = pending.pop(self.next_pos)
            self.next_pos += 1
            self.ready.append((r, t))
            if len(self.ready) >= self.request_group_rows:
                self._write_requests()
        if final and self.ready:
            self._write_requests()

    def _write_requests(self) -> None:
        from .runner import with_prompt_identity

        reqs = [r for r, _ in self.ready]
        times = [t for _, t in self.ready]
        self.ready = []
        flat = np.concatenate(times) if times else np.zeros(0)
        offsets = np.concatenate([[0], np.cumsum([len(t) for t in times])]).astype(np.int64)
        table = request_table(reqs, flat, offsets)
        if self.itl_held is not None:  # while few: the pooled ITLs kept, not read back
            itl = gaps_within(flat, offsets)  # (the token_times column's values and offsets)
            self.itl_count += len(itl)
            self.itl_held = None if self.itl_count > ITL_IN_MEMORY else self.itl_held + [itl]
        self.req_writer.write(with_prompt_identity(table, self.workload))

    # ------------------------------------------------------------------ the end
    def _on_iteration_group(self, group: pa.Table) -> None:
        self.stats.add(group)
        if self.energy is not None:
            self.energy.add(group)

    def close(self) -> None:
        """After the run (and every engine's `finish`): the rest of the records, the files
        completed (several replicas' iterations merged in replica order). The iterations'
        file is finished on a thread of its own while the requests' is (both are encoded
        and written by pyarrow without holding the GIL: ~0.05 s of the Azure trace's ~0.15 s
        close overlapped on a second core); each file's bytes are what they are written alone."""
        for rep in self.replicas:
            self.flush(rep.engine)
            rep.engine.recorder = None
        empty_it = build_table("iterations", {**add_derived(iteration_columns([], [], [], 1), 0, 0),
                                              **(draft_lists([], 0, 0) if self.speculation else {})})
        iterations = _Background(self._close_iterations, empty_it)
        try:
            self._emit_ready(final=True)
            if self.pending:
                raise RuntimeError(f"{len(self.pending)} finished request(s) never written: a request of the "
                                   "workload did not finish")
            from .runner import with_prompt_identity

            self.req_writer.close(empty=with_prompt_identity(
                request_table([], np.zeros(0), np.zeros(1, dtype=np.int64)), self.workload))
        except BaseException:
            iterations.join(quiet=True)
            raise
        iterations.join()
        self.closed = True

    def _close_iterations(self, empty_it: pa.Table) -> None:
        """iterations.parquet completed, and the sums of its rows (`stats`, `energy`)."""
        if len(self.replicas) > 1:
            for rep in self.replicas:
                rep.writer.close(empty=empty_it)
            if self.energy is not None:
                self.energy.clamp = sum(rep.g > 0 for rep in self.replicas) <= 1
            for rep in self.replicas:
                pf = pq.ParquetFile(rep.writer.path)
                for i in range(pf.num_row_groups):
                    self.final_it.write(pf.read_row_group(i))
                pf.close()
                os.unlink(rep.writer.path)
        self.final_it.close(empty=empty_it)
        if self.energy is not None:
            self.energy.close()

    def itl_dist(self) -> dict:
        """`dist` of the pooled inter-token latencies: of those kept while writing (at most
        ITL_IN_MEMORY), else exact in passes over the written column (same floats)."""
        if self.itl_held is not None:
            # the values held are handed over (reordered by the percentiles): asked again, from the file
            held, self.itl_held = self.itl_held, None
            return dist(held[0] if len(held) == 1 else np.concatenate(held) if held else np.zeros(0), own=True)
        return dist_of_chunks(self.itl_chunks)

    def itl_chunks(self):
        """A fresh iterator over the pooled inter-token latencies, a batch of requests at a time."""
        return token_time_gaps(self.req_path)

    def scalar_requests(self) -> pa.Table:
        """requests.parquet without its list columns and the columns no summary reads
        (SUMMARY_UNREAD: what the summary reads, held for the run's length)."""
        pf = pq.ParquetFile(self.req_path)
        return pf.read(columns=[n for n in pf.schema_arrow.names if n not in SUMMARY_UNREAD])



def token_time_gaps(path: Path, batch_rows: int = 8192):
    """The pooled inter-token latencies of a requests file, `batch_rows` requests at a time
    (the batches `iter_batches` makes of 64Ki-row groups). A row group at a time, and Arrow's
    pool handed back its freed memory after each: `iter_batches` over a 4M-request file
    (800M token times) let the pool grow by ~1 GB within one pass (the allocator keeps freed
    pages a while), which was the peak of such a run."""
    pool = pa.default_memory_pool()
    pf = pq.ParquetFile(path)
    try:
        for i in range(pf.num_row_groups):
            group = pf.read_row_group(i, columns=["token_times"])
            for batch in group.to_batches(max_chunksize=batch_rows):
                yield itl_values(batch.column(0))
            del group, batch
            pool.release_unused()
    finally:
        pf.close()


class EnergyAccumulator:
    """A run's modelled energy (sim/power.py's `energy`), one iteration row group at a
    time: the group's watts from its own rows, each iteration charged up to the next one's
    start (one replica: `clamp`), a group's last row up to the next group's first start,
    so a group is settled when the next one arrives (or at `close`)."""

    def __init__(self, setup, clamp: bool):
        from .runner import power_params

        self.setup = setup
        self.p = power_params(setup)
        self.clamp = clamp
        self.work_j = 0.0  # sum over iterations of watts x (clamped) duration
        self.busy_s = 0.0  # sum of the clamped durations
        self.pending: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def add(self, it: pa.Table) -> None:
        from .power import iteration_power, roofline_work

        if it.num_rows == 0:
            return
        s = self.setup
        tp = s.cfg.cluster.tensor_parallel * s.cfg.cluster.pipeline_parallel
        dur = numpy_of(it.column("duration_s"))
        w = iteration_power(dur, *roofline_work(it, s.model, s.hardware), self.p, self.p["max_w"]) * tp
        start = numpy_of(it.column("start_s"))
        if self.pending is not None:
            self._settle(start[0])
        self.pending = (start, dur, w)

    def _settle(self, next_start: float) -> None:
        start, dur, w = self.pending
        self.pending = None
        if self.clamp:
            nxt = np.empty_like(dur)
            if len(start) > 1 and np.any(np.diff(start) < 0):  # (never in one replica's order)
                order = np.argsort(start, kind="stable")
                nxt[order[:-1]] = start[order[1:]]
                nxt[order[-1]] = next_start
            else:
                nxt[:-1] = start[1:]
                nxt[-1] = next_start
            dur = np.minimum(dur, np.maximum(nxt - start, 0.0))
        self.busy_s += float(dur.sum())
        self.work_j += float((w * dur).sum())

    def close(self) -> None:
        if self.pending is not None:
            self._settle(np.inf)

    @classmethod
    def of_table(cls, setup, it: pa.Table) -> "EnergyAccumulator":
        """A table held in memory, in the row groups a streamed run settles."""
        clamp = "replica" not in it.column_names or len(set(numpy_of(it.column("replica")).tolist())) <= 1
        acc = cls(setup, clamp)
        for a in range(0, it.num_rows, ROW_GROUP_ROWS):
            acc.add(it.slice(a, ROW_GROUP_ROWS))
        acc.close()
        return acc

    def joules(self, span_s: float, gpus: int) -> float:
        return self.work_j + self.p["idle_w"] * max(span_s * gpus - self.busy_s, 0.0)


def stream_run(setup, engines, source, router, out_dir: Path, t0: float, progress=None):
    """Run `engines` on the requests of `source` (records.RequestSource) with a
    RunRecorder in `out_dir`; the summary from what was written. sim/runner.py `simulate`."""
    import time

    from .bounds import run_bound_k, run_bounds
    from .driver import run_simulation
    from .stream_summary import RequestPasses, bound_sums_file, summarize_file
    from .runner import StreamedRunResult, energy_summary

    energy = EnergyAccumulator(setup, clamp=len(engines) == 1)
    from servesim.traces.schema import WorkloadColumns

    rec = RunRecorder(out_dir, engines, WorkloadColumns.of(setup.workload).column("request_id"), setup.workload,
                      energy)
    try:
        run_simulation(source, engines, router, progress=progress)
        rec.close()
    except BaseException:
        for e in engines:
            e.recorder = None
        raise
    wall = time.perf_counter() - t0
    itl = rec.itl_dist()
    pa.default_memory_pool().release_unused()
    evp: dict[int, int] = {}
    for e in engines:
        if e.cache is not None:
            for k, v in e.cache.stats.evictions_by_priority.items():
                evp[k] = evp.get(k, 0) + v
    # the summary in batches of the written rows (sim/stream_summary.py: bounded memory, the same floats)
    passes = RequestPasses(rec.req_path)
    summary = summarize_file(rec.req_path, rec.stats, kv_total_blocks=setup.num_blocks, backend="sim",
                             wall_s=wall, num_preemptions=sum(e.num_preemptions for e in engines),
                             num_swaps=sum(e.num_swaps for e in engines),
                             kv_block_bytes=engines[0].cfg.kv_block_bytes, evictions_by_priority=evp, itl=itl,
                             passes=passes)
    summary.update(energy_summary(setup, energy, summary))
    summary["bounds"] = run_bounds(setup, None, summary,
                                   sums=bound_sums_file(rec.req_path, run_bound_k(setup), passes=passes))
    del passes
    if len(engines) > 1:  # (identical replicas: a run of groups or pools is held in memory)
        from .cluster import per_replica_summary

        req = rec.scalar_requests()
        it = pq.read_table(rec.it_path, columns=["replica", "duration_s"])
        summary["per_replica"] = per_replica_summary(req, it, summary["duration_s"], {e.replica: "" for e in engines})
    return StreamedRunResult(summary, setup, out_dir)
