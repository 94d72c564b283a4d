"""The output tables' schemas, declared once: `requests.parquet` and `iterations.parquet`.

Every writer (the simulator's records, the GPU driver through the same records) builds its
tables with `build_table`, by field name, and every reader (`sim compare`, the timeline,
the plots, the notebooks) opens files with `read_run_table`, which checks the file's
`servesim.schema_version`. Each field carries its unit and meaning in its metadata, so a
Parquet viewer shows them.

Adding a column: one `_field(...)` line here, plus its computation where the record is
made (sim/engine.py `IterationRecord`, and for the closed-form decode stretches its
vectorised formula in sim/records.py, unless the column's `fill` value holds for them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .types import ConfigError

# 1: the layout before schemas were declared (no version in the file). 2: declared
#    schemas, version in the metadata; draft_tokens_* filled by speculative decoding.
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
VERSION_KEY = b"servesim.schema_version"
TABLE_KEY = b"servesim.table"


def _field(name: str, type_: pa.DataType, unit: str, doc: str, *, nullable: bool = False,
           fill: object = None) -> pa.Field:
    """`fill`: the value a row that does not compute this field gets (closed-form decode
    stretches for iteration columns); None: every producer must compute it."""
    meta = {"unit": unit, "doc": doc}
    if fill is not None:
        meta["fill"] = json.dumps(fill)
    return pa.field(name, type_, nullable=nullable, metadata=meta)


ITERATIONS = pa.schema([
    _field("replica", pa.int32(), "", "replica (engine) that ran the iteration"),
    _field("iteration", pa.int64(), "", "index of the iteration in its replica, from 0"),
    _field("start_s", pa.float64(), "s", "start time (since the run's start)"),
    _field("duration_s", pa.float64(), "s",
           "duration; start_s + duration_s is when the iteration's tokens are emitted"),
    _field("num_ctx_requests", pa.int32(), "requests", "context chunks in the iteration", fill=0),
    _field("num_gen_requests", pa.int32(), "requests", "generation requests (one token each)"),
    _field("ctx_tokens", pa.int64(), "tokens", "new context (prefill) tokens computed", fill=0),
    _field("gen_tokens", pa.int64(), "tokens", "generation tokens computed"),
    _field("padded_tokens", pa.int32(), "tokens",
           "padding rows added to reach a CUDA graph's captured size"),
    _field("kv_blocks_used", pa.int64(), "blocks", "KV blocks held by live requests while it runs"),
    _field("kv_blocks_cached", pa.int64(), "blocks", "unreferenced blocks kept by the prefix cache"),
    _field("kv_blocks_free", pa.int64(), "blocks", "blocks neither used nor cached"),
    _field("kv_blocks_host", pa.int64(), "blocks", "blocks in the host offload tier"),
    _field("evictions", pa.int64(), "blocks", "cached blocks evicted (dropped or offloaded) by this step"),
    _field("offloads", pa.int64(), "blocks", "evicted blocks copied to the host tier by this step"),
    _field("onboards", pa.int64(), "blocks", "blocks copied back from the host before the iteration",
           fill=0),
    _field("graph", pa.bool_(), "", "ran as a captured CUDA graph (decode or piecewise)"),
    _field("decode_kv_tokens", pa.int64(), "tokens",
           "sum over generation requests of the KV length attended (new token included)"),
    _field("ctx_cached_tokens", pa.int64(), "tokens",
           "sum over context chunks of the tokens already in cache that they attend to", fill=0),
    _field("draft_tokens_proposed", pa.int64(), "tokens", "speculative decoding: draft tokens verified", fill=0),
    _field("draft_tokens_accepted", pa.int64(), "tokens", "speculative decoding: draft tokens accepted", fill=0),
    # speculative decoding on: per draft position i = 1..k, the requests that drafted it and
    # that had it accepted (empty lists in iterations without drafts)
    _field("draft_proposed_by_position", pa.list_(pa.int32()), "requests",
           "per draft position: requests that proposed it"),
    _field("draft_accepted_by_position", pa.list_(pa.int32()), "requests",
           "per draft position: requests that had it accepted"),
    # GPU runs: where an iteration's host time went (NaN where the executor did not run it)
    _field("host_prep_s", pa.float64(), "s", "GPU executor: host time packing inputs, up to the launch"),
    _field("host_exec_s", pa.float64(), "s", "GPU executor: wall time of its whole execute() call"),
    _field("pool", pa.string(), "", "disaggregated: the pool of the replica that ran it (prefill | decode)"),
], metadata={VERSION_KEY: str(SCHEMA_VERSION).encode(), TABLE_KEY: b"iterations"})

REQUESTS = pa.schema([
    _field("request_id", pa.int64(), "", "the workload's request id"),
    _field("replica", pa.int32(), "", "replica that served it (-1: never routed)"),
    _field("status", pa.string(), "", "finished | rejected (can never run: see reject_reason)"),
    _field("reject_reason", pa.string(), "",
           "rejected: kv_pool (never fits the pool) | token_budget (prompt over max_num_tokens, no "
           "chunking) | max_positions (beyond the model's max_position_embeddings); empty if finished"),
    _field("arrival_s", pa.float64(), "s", "arrival time"),
    _field("first_scheduled_s", pa.float64(), "s", "start of its first iteration (NaN: never scheduled)"),
    _field("first_token_s", pa.float64(), "s", "emission time of its first token (NaN: rejected)"),
    _field("finish_s", pa.float64(), "s", "emission time of its last token (NaN: rejected)"),
    _field("prompt_len", pa.int64(), "tokens", "prompt length"),
    _field("output_len", pa.int64(), "tokens", "output length (forced)"),
    _field("cached_tokens", pa.int64(), "tokens", "prompt tokens reused from the prefix cache"),
    _field("preemptions", pa.int32(), "", "times it was paused (recompute or swap)"),
    _field("priority", pa.int32(), "", "the workload's priority"),
    _field("tenant", pa.string(), "", "the workload's tenant"),
    _field("slo_ttft_s", pa.float64(), "s", "its TTFT objective (NaN: none)"),
    _field("slo_tpot_s", pa.float64(), "s", "its TPOT objective (NaN: none)"),
    _field("token_times", pa.list_(pa.float64()), "s", "emission time of each output token"),
    # the workload's prompt identity (replaying a run reuses the KV cache as it did)
    _field("block_hashes", pa.list_(pa.int64()), "", "the workload's prefix-block hashes", nullable=True),
    _field("prompt_tokens", pa.list_(pa.int64()), "", "the workload's prompt token ids", nullable=True),
    # disaggregated serving (sim/disagg.py): `replica` is the decode replica
    _field("prefill_replica", pa.int32(), "", "disaggregated: the prefill replica that ran its prompt and emitted "
           "its first token (-1: none)"),
    _field("kv_transfer_s", pa.float64(), "s", "disaggregated: time its prompt's KV took over the link to the decode "
           "pool, sharing included (null: it never moved)", nullable=True),
], metadata={VERSION_KEY: str(SCHEMA_VERSION).encode(), TABLE_KEY: b"requests"})

# columns a writer may leave out (the workload did not have them)
OPTIONAL = {"requests": ("block_hashes", "prompt_tokens", "prefill_replica", "kv_transfer_s"),
            "iterations": ("host_prep_s", "host_exec_s", "draft_proposed_by_position", "draft_accepted_by_position",
                           "pool")}
SCHEMAS = {"requests": REQUESTS, "iterations": ITERATIONS}


def fill_value(schema: pa.Schema, name: str):
    """The `fill` a field declares (see `_field`), or None."""
    meta = schema.field(name).metadata or {}
    v = meta.get(b"fill")
    return None if v is None else json.loads(v)


def build_table(kind: str, columns: Mapping[str, object], metadata: Mapping[bytes, bytes] | None = None) -> pa.Table:
    """The `kind` table ("requests" / "iterations") from columns given by name, in the
    schema's order and types. Raises ValueError naming a missing, unknown or null column."""
    schema = SCHEMAS[kind]
    unknown = set(columns) - set(schema.names)
    if unknown:
        raise ValueError(f"{kind}: columns not in the schema (sim/schemas.py): {', '.join(sorted(unknown))}")
    fields = []
    arrays = []
    for f in schema:
        if f.name not in columns:
            if f.name in OPTIONAL[kind]:
                continue
            raise ValueError(f"{kind}: column {f.name} missing")
        v = columns[f.name]
        a = v if isinstance(v, (pa.Array, pa.ChunkedArray)) else arrow_array(v, f.type)
        if a.type != f.type:
            a = a.cast(f.type)
        if not f.nullable and a.null_count:
            raise ValueError(f"{kind}: column {f.name} has nulls but is not nullable")
        fields.append(f)
        arrays.append(a)
    meta = dict(schema.metadata)
    if metadata:
        meta.update(metadata)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=meta))


# Arrow <-> numpy without pyarrow's pandas bridge: pyarrow's `pa.array` and `to_numpy`
# import pandas on their first call (~0.25 s, most of a `sim run`'s start-up), so the
# columns of a run are converted through their buffers here; what these do not cover
# (nulls in a numeric column, lists, other types) goes through pyarrow's own conversion.
_PRIMITIVE = {pa.int8(): np.int8, pa.int16(): np.int16, pa.int32(): np.int32, pa.int64(): np.int64,
              pa.uint8(): np.uint8, pa.uint32(): np.uint32, pa.uint64(): np.uint64, pa.float32(): np.float32,
              pa.float64(): np.float64}


def arrow_array(values, type: pa.DataType) -> pa.Array:
    """`values` (a numpy array or a sequence) as an Arrow array of `type`: `pa.array(values,
    type=type)`, the same array."""
    if type in _PRIMITIVE and isinstance(values, np.ndarray) and values.dtype.kind in "iuf":
        if values.dtype.kind == "f" and type != pa.float32() and type != pa.float64():
            return pa.array(values, type=type)  # (pyarrow checks the floats are whole numbers)
        dt = _PRIMITIVE[type]
        v = np.ascontiguousarray(values, dtype=dt)
        if v.dtype != values.dtype and not np.array_equal(v, values):
            return pa.array(values, type=type)  # (pyarrow's error for a value that does not fit)
        return pa.Array.from_buffers(type, len(v), [None, pa.py_buffer(v)])
    if type == pa.bool_() and isinstance(values, np.ndarray) and values.dtype == np.bool_:
        bits = np.packbits(values, bitorder="little")
        return pa.Array.from_buffers(type, len(values), [None, pa.py_buffer(bits)])
    if type == pa.string() and (isinstance(values, list) or (isinstance(values, np.ndarray)
                                                              and values.dtype.kind in "UO")):
        items = values.tolist() if isinstance(values, np.ndarray) else values
        if _all_str_or_none(items):
            enc = [b"" if x is None else x.encode() for x in items]
            offsets = np.zeros(len(enc) + 1, dtype=np.int64)
            np.cumsum(np.fromiter(map(len, enc), dtype=np.int64, count=len(enc)), out=offsets[1:])
            if offsets[-1] < 2**31:
                nulls = sum(x is None for x in items)
                valid = None
                if nulls:
                    valid = pa.py_buffer(np.packbits(np.fromiter((x is not None for x in items), dtype=bool,
                                                                 count=len(items)), bitorder="little"))
                return pa.Array.from_buffers(type, len(enc), [valid, pa.py_buffer(offsets.astype(np.int32)),
                                                              pa.py_buffer(b"".join(enc))], null_count=nulls)
    return pa.array(values, type=type)


def _all_str_or_none(items) -> bool:
    return all(x is None or type(x) is str for x in items)


def numpy_of(col) -> np.ndarray:
    """An Arrow column (Array or ChunkedArray) as numpy: `col.to_numpy(zero_copy_only=False)`,
    the same values (a view of its buffer where that one is, read-only as pyarrow's)."""
    if isinstance(col, pa.ChunkedArray):
        if col.num_chunks == 1:
            return numpy_of(col.chunk(0))
        if col.num_chunks == 0 and col.type in _PRIMITIVE:
            return np.zeros(0, dtype=_PRIMITIVE[col.type])
        if col.num_chunks == 0 or col.null_count or not (col.type in _PRIMITIVE or col.type == pa.bool_()):
            return col.to_numpy()
        return np.concatenate([numpy_of(c) for c in col.chunks])
    if col.null_count == 0:
        n, off = len(col), col.offset
        dt = _PRIMITIVE.get(col.type)
        if dt is not None:
            buf = col.buffers()[1]
            if buf is None or n == 0:
                return np.zeros(0, dtype=dt)
            return np.frombuffer(buf, dtype=dt, count=n, offset=off * np.dtype(dt).itemsize)
        if col.type == pa.bool_():
            buf = col.buffers()[1]
            if buf is None or n == 0:
                return np.zeros(0, dtype=bool)
            bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), bitorder="little", count=off + n)
            return bits[off:].astype(bool)
    return col.to_numpy(zero_copy_only=False)


def empty_columns(kind: str) -> dict[str, np.ndarray]:
    """Zero-length numpy columns of every required field (a run with no iterations)."""
    out = {}
    for f in SCHEMAS[kind]:
        if f.name in OPTIONAL[kind]:
            continue
        dt = _PRIMITIVE.get(f.type, np.bool_ if f.type == pa.bool_() else None)
        out[f.name] = np.zeros(0, dtype=dt) if dt is not None else pa.array([], type=f.type).to_numpy(zero_copy_only=False)
    return out


def file_version(schema: pa.Schema) -> int | None:
    """The schema version a file was written with (1 when it has none), None if unreadable."""
    meta = schema.metadata or {}
    v = meta.get(VERSION_KEY)
    if v is None:
        return 1
    try:
        return int(v)
    except ValueError:
        return None


def read_run_table(path: Path, kind: str, columns: tuple[str, ...] = ()) -> pa.Table:
    """Read one run table, checking its schema version and that `columns` are there.
    Raises ConfigError naming the file (unreadable, other version, missing columns)."""
    path = Path(path)
    try:
        table = pq.read_table(path)
    except Exception as e:  # ArrowInvalid, OSError, ...: whatever it is, the file is unreadable
        raise ConfigError(f"cannot read this Parquet file ({type(e).__name__}: {e})", str(path)) from None
    v = file_version(table.schema)
    if v not in READABLE_VERSIONS:
        got = (table.schema.metadata or {}).get(VERSION_KEY, b"?").decode(errors="replace")
        raise ConfigError(f"written with output schema version {got}; this servesim reads versions "
                          f"{', '.join(map(str, READABLE_VERSIONS))} (re-run it with this version, or read it "
                          "with the servesim that wrote it)", str(path))
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ConfigError(f"missing column(s) {', '.join(missing)}; expected the {kind} columns a run "
                          "writes (sim/schemas.py)", str(path))
    return table


# no dictionary encoding: 40% faster to write here, about the same size
WRITE_OPTIONS = {"use_dictionary": False}
# rows per Parquet row group: iterations (pyarrow's own default, so a table written at once
# and the same rows streamed in groups (sim/stream.py) are the same bytes), requests
# streamed (a group holds its token times: 64Ki requests of 200 tokens are ~100 MB)
ROW_GROUP_ROWS = 1 << 20
REQUEST_GROUP_ROWS = 1 << 16


def write_run_table(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS, **WRITE_OPTIONS)
