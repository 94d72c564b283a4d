"""Readers: workload files -> workload table (see :mod:`servesim.traces.schema`).

- :func:`read_azure` — Azure LLM inference traces (2023 and 2024 CSVs:
  ``TIMESTAMP, ContextTokens, GeneratedTokens``).
- :func:`read_mooncake` — Mooncake-style JSONL (``timestamp`` in ms, ``input_length``,
  ``output_length``, ``hash_ids``).
- :func:`read_table` — our own request table, CSV or Parquet (written by
  :func:`servesim.traces.writers.write_table`).
- :func:`read_trace` — any of the above by format name or by sniffing (``auto``).

Every reader raises :class:`ConfigError` naming the file and, for malformed content,
the 1-based line number (Parquet: the 0-based row). Each reader parses vectorised and
only walks the file line by line when something is wrong, to say where. One rule for
row order, in every reader: a file not sorted by arrival time is sorted, stably, and a
warning line on stderr says so. CSVs may start with a UTF-8 byte-order mark (an Excel
export).
"""

from __future__ import annotations

import csv
import json
import math
import re
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from servesim.sim.types import ConfigError
from servesim.traces import schema
from servesim.traces.schema import HASH_BLOCK_SIZE, MAX_LENGTH, make_workload, tuple_column

from ..sim.errors import at_line, existing_file, file_error, read_text

if TYPE_CHECKING:  # (imported where it is used: a bundled trace's binary copy needs no pandas)
    import pandas as pd

DATA_DIR = Path(__file__).resolve().parent / "data"
BUNDLED_TRACES: dict[str, tuple[str, str]] = {
    # name: (file in traces/data, format)
    "azure_conv": ("AzureLLMInferenceTrace_conv.csv", "azure"),
    "mooncake_conv": ("mooncake_conversation_trace.jsonl", "mooncake"),
}
# compact binary copies of bundled traces (numpy .npz of the workload columns), made from
# the shipped file by `python -m servesim.traces.bundle` and used only while the file's
# sha256 is the one recorded in the copy (else the file itself is read)
BUNDLED_BINARY: dict[str, str] = {"AzureLLMInferenceTrace_conv.csv": "azure_conv.npz"}
FORMATS = ("auto", "azure", "table", "mooncake")
AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
MOONCAKE_KEYS = ("timestamp", "input_length", "output_length", "hash_ids")
MOONCAKE_BLOCK_SIZE = 512


# ---------------------------------------------------------------------- helpers


def _read_csv(path: Path, skiprows: int = 0, str_columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """pandas' C parser with native type inference. Blank lines are kept (as rows of
    missing values) so that row i sits on line ``skiprows + i + 2``; trailing blank lines
    are dropped. Only an empty cell is missing (``NA`` is a string), and ``str_columns``
    are read as strings."""
    import pandas as pd

    try:
        with warnings.catch_warnings():
            # index_col=False: never take a first row with an extra field as an index
            # column; pandas then only warns (and drops the field), so make that an error.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            df = pd.read_csv(
                path,
                encoding="utf-8-sig",  # a UTF-8 byte-order mark (an Excel export) is no part of the header
                index_col=False,
                skip_blank_lines=False,
                skiprows=skiprows,
                skipinitialspace=True,
                keep_default_na=False,
                na_values=[""],
                dtype={c: str for c in str_columns},
            )
    except pd.errors.ParserWarning:
        line, want, got = _first_long_line(path, skiprows)
        raise ConfigError(f"malformed CSV: expected {want} fields, saw {got}", at_line(path, line)) from None
    except pd.errors.EmptyDataError:
        raise ConfigError("the file is empty (expected a CSV header line)", str(path)) from None
    except pd.errors.ParserError as e:
        m = re.search(r"line (\d+)", str(e))
        if m:
            detail = re.sub(r"^.*?C error: ", "", str(e)).strip()
            detail = re.sub(r"Expected (\d+) fields in line \d+, saw (\d+)", r"expected \1 fields, saw \2", detail)
            # pandas counts the skipped metadata lines too: its number is the file's line
            raise ConfigError(f"malformed CSV: {detail}", at_line(path, int(m.group(1)))) from None
        raise ConfigError(f"malformed CSV: {e}", str(path)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise file_error(path, e, "trace file") from None
    df.columns = [str(c).strip() for c in df.columns]
    if len(df):
        blank = df.isna().all(axis=1).to_numpy()
        if blank[-1]:
            keep = 0 if blank.all() else len(blank) - int(np.argmin(blank[::-1]))
            df = df.iloc[:keep]
    return df


def _first_long_line(path: Path, skiprows: int) -> tuple[int, int, int]:
    """(line, header fields, fields) of the first row longer than the header."""
    with path.open("r", encoding="utf-8-sig", newline="") as f:
        for _ in range(skiprows):
            f.readline()
        rows = csv.reader(f, skipinitialspace=True)
        width = len(next(rows))
        for row in rows:
            if len(row) > width:
                return skiprows + rows.line_num, width, len(row)
    return skiprows + 2, width, width + 1


def _describe_cell(v: object) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "an empty cell"
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        v = int(v)  # a column of ints with a blank cell elsewhere was parsed as floats
    return repr(str(v))


def _int_column(values: pd.Series, name: str, path: Path, first_line: int, *, min_value: int | None = 1,
                max_value: int | None = None) -> np.ndarray:
    """-> int64, raising at the first line that is not an integer in [min_value, max_value]
    (default: one that fits int64; a bigger one is named as written, never wrapped around).
    Cheap when the parser already produced int64; the slow path only runs to locate a bad
    cell."""
    import pandas as pd

    if values.dtype == np.int64:
        arr = values.to_numpy()
        if arr.size == 0 or ((min_value is None or arr.min() >= min_value)
                             and (max_value is None or arr.max() <= max_value)):
            return arr
    num = pd.to_numeric(values.astype(object), errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    ok = np.isfinite(num) & (num == np.round(num)) & (np.abs(num) < 2.0**63)
    if min_value is not None:
        ok &= num >= min_value
    if max_value is not None:
        ok &= num <= max_value
    if not ok.all():
        i = int(np.argmin(ok))
        want = "an integer" if min_value is None else f"an integer >= {min_value}"
        if max_value is not None and num[i] > max_value:  # as written: never wrapped around to a negative
            raise ConfigError(f"{name} must be at most {max_value:,}, got {_describe_cell(values.iat[i])}",
                              at_line(path, first_line + i))
        raise ConfigError(f"{name} must be {want}, got {_describe_cell(values.iat[i])}", at_line(path, first_line + i))
    return num.astype(np.int64)


def _float_column(values: pd.Series, name: str, path: Path, first_line: int, *, allow_empty: bool) -> np.ndarray:
    """-> float64; with ``allow_empty`` an empty cell is NaN."""
    import pandas as pd

    num = pd.to_numeric(values.astype(object), errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    ok = np.isfinite(num)
    if allow_empty:
        ok |= values.isna().to_numpy(dtype=bool)
    if not ok.all():
        i = int(np.argmin(ok))
        want = "a finite number" + (" or empty" if allow_empty else "")
        raise ConfigError(f"{name} must be {want}, got {_describe_cell(values.iat[i])}", at_line(path, first_line + i))
    return num


_SORT_WARNED: set[tuple] = set()  # files already reported unsorted in this process


def _sorted_by_arrival(df: pd.DataFrame, path: Path, first_line: int | None, renumber: bool = True) -> pd.DataFrame:
    """`df` in arrival order. One rule for every reader: a file whose rows are not sorted
    by arrival time is sorted, stably (requests arriving together keep the file's order),
    and a warning line on stderr says so (once per file and process). ``first_line``: the
    file line of row 0 (None: name rows). ``renumber``: request_id = 0..N-1 in the new
    order (ids the file did not give); else each row keeps its request_id."""
    arr = df["arrival_s"].to_numpy()
    if arr.size > 1:
        back = np.flatnonzero(np.diff(arr) < 0)
        if back.size:
            i = int(back[0]) + 1
            try:
                st = path.stat()
                key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
            except OSError:
                key = (str(path),)
            if key not in _SORT_WARNED:
                _SORT_WARNED.add(key)
                where = f"line {first_line + i}" if first_line is not None else f"row {i}"
                print(f"warning: {path}: the requests are not in arrival order ({back.size:,} step(s) back in "
                      f"time, the first at {where}: {arr[i]:g} s after {arr[i - 1]:g} s); sorted by arrival "
                      "time, stably (requests arriving together keep the file's order)", file=sys.stderr, flush=True)
            attrs = dict(df.attrs)
            df = df.iloc[np.argsort(arr, kind="stable")].reset_index(drop=True)
            if renumber:
                df["request_id"] = np.arange(len(df), dtype=np.int64)
            df.attrs = attrs
    return df


# ---------------------------------------------------------------------- Azure


def read_azure(path: str | Path) -> pd.DataFrame:
    """An Azure LLM inference trace (2023 or 2024 CSV) as a workload table.

    ``TIMESTAMP`` may be any ISO-8601 datetime (``2023-11-16 18:15:46.6805900``,
    ``2024-05-10 00:00:00.009930+00:00``, ``...Z``; zone-less values count as UTC), any
    other datetime pandas can parse, or a plain number of seconds. ``arrival_s`` is
    seconds since the earliest request; ``prompt_len = ContextTokens`` and
    ``output_len = GeneratedTokens`` (both must be >= 1). Extra columns are ignored;
    header names match case-insensitively.
    """
    path = existing_file(path, "trace file")
    fast = bundled_binary(path)
    if fast is not None:
        return fast
    raw = _read_csv(path)
    lower = {c.lower(): c for c in raw.columns}
    missing = [c for c in AZURE_COLUMNS if c.lower() not in lower]
    if missing:
        raise ConfigError(
            f"not an Azure LLM trace: missing column(s) {missing} in the header {list(raw.columns)}; "
            f"expected {list(AZURE_COLUMNS)}",
            at_line(path, 1),
        )
    if len(raw) == 0:
        raise ConfigError("the trace has a header but no requests", str(path))
    prompt = _int_column(raw[lower["contexttokens"]], "ContextTokens", path, 2, max_value=MAX_LENGTH)
    output = _int_column(raw[lower["generatedtokens"]], "GeneratedTokens", path, 2, max_value=MAX_LENGTH)
    seconds = _timestamps_to_seconds(raw[lower["timestamp"]], path)
    df = make_workload(seconds - seconds.min(), prompt, output)
    return _sorted_by_arrival(df, path, 2)


def bundled_binary(path: Path) -> pd.DataFrame | None:
    """The workload of a bundled trace from its binary copy (BUNDLED_BINARY), or None when
    `path` has none or the copy was not made from this very file (its sha256)."""
    cols = binary_columns(path)
    return None if cols is None else make_workload(cols["arrival_s"], cols["prompt_len"], cols["output_len"])


def binary_columns(path: Path) -> dict[str, np.ndarray] | None:
    """`bundled_binary`'s columns (arrival_s, prompt_len, output_len as stored), read with
    numpy alone, or None."""
    name = BUNDLED_BINARY.get(path.name)
    if name is None or path.parent.resolve() != DATA_DIR:
        return None
    copy = DATA_DIR / name
    if not copy.is_file():
        return None
    import hashlib

    try:
        with np.load(copy, allow_pickle=False) as z:
            if str(z["source_sha256"]) != hashlib.sha256(path.read_bytes()).hexdigest():
                return None
            return {k: z[k] for k in ("arrival_s", "prompt_len", "output_len")}
    except (OSError, KeyError, ValueError):
        return None


def _timestamps_to_seconds(ts: pd.Series, path: Path) -> np.ndarray:
    import pandas as pd

    if ts.dtype == np.float64 or ts.dtype == np.int64:  # plain seconds
        sec = ts.to_numpy(dtype=np.float64)
        bad = ~np.isfinite(sec)
    else:
        parsed = pd.to_datetime(ts, format="ISO8601", utc=True, errors="coerce")
        if parsed.isna().all():
            parsed = pd.to_datetime(ts, format="mixed", utc=True, errors="coerce")
        bad = parsed.isna().to_numpy()
        sec = ((parsed - parsed.min()) / pd.Timedelta(seconds=1)).to_numpy(dtype=np.float64, na_value=np.nan)
    if bad.any():
        i = int(np.argmax(bad))
        raise ConfigError(
            "TIMESTAMP must be a datetime (like 2023-11-16 18:15:46.6805900 or "
            f"2024-05-10 00:00:00.009930+00:00) or a number of seconds, got {_describe_cell(ts.iat[i])}",
            at_line(path, i + 2),
        )
    return sec


# ---------------------------------------------------------------------- Mooncake


def read_mooncake(path: str | Path, hash_block_size: int = MOONCAKE_BLOCK_SIZE) -> pd.DataFrame:
    """A Mooncake-style JSONL trace: one object a line with ``timestamp`` (ms),
    ``input_length``, ``output_length`` and ``hash_ids`` (one id per
    ``hash_block_size``-token prompt block, the last possibly partial, so
    ``len(hash_ids) == ceil(input_length / hash_block_size)``). Extra keys are ignored;
    blank lines are skipped. ``arrival_s = timestamp / 1000`` (not re-based);
    ``block_hashes`` = the tuple of ``hash_ids``."""
    path = existing_file(path, "trace file")
    df = _mooncake_fast(path, hash_block_size)
    if df is None:  # something is off: walk the lines to say where (always raises)
        _mooncake_diagnose(path, hash_block_size)
        raise ConfigError("could not read this file as Mooncake JSONL", str(path))
    return _sorted_by_arrival(df, path, None)


def _mooncake_fast(path: Path, bs: int) -> pd.DataFrame | None:
    """Vectorised read; None if the file needs the line-by-line diagnosis."""
    import pandas as pd

    if path.stat().st_size == 0:
        return None
    try:
        raw = pd.read_json(path, lines=True, engine="pyarrow")
    except Exception:  # pyarrow raises ArrowInvalid & co. for malformed JSON
        return None
    if any(k not in raw.columns for k in MOONCAKE_KEYS) or len(raw) == 0:
        return None
    ts, inp, out = raw["timestamp"], raw["input_length"], raw["output_length"]
    if ts.dtype not in (np.int64, np.float64) or inp.dtype != np.int64 or out.dtype != np.int64:
        return None
    ts_ms = ts.to_numpy(dtype=np.float64)
    inp_a, out_a = inp.to_numpy(), out.to_numpy()
    if not (np.isfinite(ts_ms).all() and ts_ms.min() >= 0 and inp_a.min() >= 1 and out_a.min() >= 1
            and max(inp_a.max(), out_a.max()) <= MAX_LENGTH):
        return None
    hashes = np.empty(len(raw), dtype=object)
    for i, h in enumerate(raw["hash_ids"].to_numpy(dtype=object)):
        if not isinstance(h, np.ndarray) or h.dtype != np.int64 or len(h) != -(-int(inp_a[i]) // bs):
            return None
        hashes[i] = tuple(h.tolist())
    df = make_workload(ts_ms / 1000.0, inp_a, out_a, hash_block_size=bs)
    df["block_hashes"] = hashes
    return df


def _mooncake_diagnose(path: Path, bs: int) -> None:
    text = read_text(path, "trace file")
    n = 0
    for ln, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        n += 1
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise file_error(path, e, "trace file", first_line=ln) from None
        if type(rec) is not dict:
            raise ConfigError(f"expected a JSON object, got {type(rec).__name__}", at_line(path, ln))
        missing = [k for k in MOONCAKE_KEYS if k not in rec]
        if missing:
            raise ConfigError(f"missing key(s) {missing}; expected {list(MOONCAKE_KEYS)}", at_line(path, ln))
        t, i_len, o_len, h = (rec[k] for k in MOONCAKE_KEYS)
        if type(t) not in (int, float) or not math.isfinite(t) or t < 0:
            raise ConfigError(f"timestamp must be a number of milliseconds >= 0, got {t!r}", at_line(path, ln))
        for key, v in (("input_length", i_len), ("output_length", o_len)):
            if type(v) is not int or not 1 <= v <= MAX_LENGTH:
                raise ConfigError(f"{key} must be an integer >= 1" + (f" and at most {MAX_LENGTH:,}" if type(v) is int
                                  and v > 1 else "") + f", got {v!r}", at_line(path, ln))
        if type(h) is not list or any(type(x) is not int for x in h):
            raise ConfigError("hash_ids must be a list of integers", at_line(path, ln))
        want = -(-i_len // bs)
        if len(h) != want:
            raise ConfigError(
                f"hash_ids has {len(h)} entries, expected ceil(input_length / {bs}) = {want}", at_line(path, ln)
            )
    if n == 0:
        raise ConfigError("the file is empty (expected one JSON object a line)", str(path))


# ---------------------------------------------------------------------- our table


def read_table(path: str | Path, hash_block_size: int | None = None) -> pd.DataFrame:
    """Our request table (the schema of :mod:`servesim.traces.schema`) from ``.csv`` or
    ``.parquet``.

    CSV: a header line of schema column names; ``request_id`` may be left out
    (0..N-1 is used); an empty ``slo_*`` cell means no SLO; ``block_hashes`` and
    ``prompt_tokens`` are space-separated integers (empty = None). Leading lines starting
    with ``#`` are metadata: ``# hash_block_size=16`` gives the block size of
    ``block_hashes``. A ``hash_block_size`` given here must agree with the file's.
    Rows out of arrival order are sorted (stably, with a warning on stderr), as every
    reader does; each keeps its request_id.
    """
    path = existing_file(path, "trace file")
    if path.suffix.lower() in (".parquet", ".pq"):
        (df, ids_given), first_line = _table_from_parquet(path), None
    else:
        df, first_line, ids_given = _table_from_csv(path)
    if hash_block_size is not None:
        have = df.attrs.get(HASH_BLOCK_SIZE)
        if have is not None and int(have) != hash_block_size:
            raise ConfigError(f"the file says hash_block_size={have} but {hash_block_size} was asked for", str(path))
        df.attrs[HASH_BLOCK_SIZE] = int(hash_block_size)
    if "block_hashes" in df.columns and HASH_BLOCK_SIZE not in df.attrs:
        raise ConfigError(
            "block_hashes needs its block size: add a first line '# hash_block_size=N' (CSV) "
            "or set workload.hash_block_size",
            str(path),
        )
    problem = schema.find_problem(df, require_sorted=False)  # sorted below
    if problem is not None:
        row, msg = problem
        if row is None:
            where = str(path)
        elif first_line is None:
            where = f"{path}, row {row}"
        else:
            where = at_line(path, first_line + row)
        raise ConfigError(msg, where)
    return _sorted_by_arrival(df, path, first_line, renumber=not ids_given)


def _table_from_csv(path: Path) -> tuple[pd.DataFrame, int, bool]:
    """(the table, the line of its first row, whether the file gives request_id)"""
    meta: dict[str, str] = {}
    skip = 0
    with path.open("r", encoding="utf-8-sig", errors="replace") as f:
        for line in f:
            if not line.startswith("#"):
                break
            skip += 1
            body = line[1:].strip()
            if "=" in body:
                k, v = body.split("=", 1)
                meta[k.strip()] = v.strip()
    raw = _read_csv(path, skiprows=skip, str_columns=("tenant",) + schema.TUPLE_COLUMNS)
    first = skip + 2  # the line of the first data row
    unknown = [c for c in raw.columns if c not in schema.COLUMNS]
    if unknown:
        raise ConfigError(f"unknown column(s) {unknown}; allowed: {list(schema.COLUMNS)}", at_line(path, skip + 1))
    missing = [c for c in schema.CORE_COLUMNS[1:] if c not in raw.columns]
    if missing:
        raise ConfigError(
            f"missing column(s) {missing}; a request table needs {list(schema.CORE_COLUMNS)}", at_line(path, skip + 1)
        )
    if len(raw) == 0:
        raise ConfigError("the table has a header but no requests", str(path))
    cols: dict[str, object] = {}
    for c in schema.INT_COLUMNS:
        if c in raw.columns:
            cols[c] = _int_column(raw[c], c, path, first, min_value=None,
                                  max_value=MAX_LENGTH if c in ("prompt_len", "output_len") else None)
    for c in schema.FLOAT_COLUMNS:
        if c in raw.columns:
            cols[c] = _float_column(raw[c], c, path, first, allow_empty=c != "arrival_s")
    if "tenant" in raw.columns:
        cols["tenant"] = raw["tenant"].fillna("").to_numpy(dtype=object)
    for c in schema.TUPLE_COLUMNS:
        if c in raw.columns:
            cols[c] = _parse_int_lists(raw[c], c, path, first)
    bs = None
    if HASH_BLOCK_SIZE in meta:
        try:
            bs = int(meta[HASH_BLOCK_SIZE])
            if bs <= 0:
                raise ValueError
        except ValueError:
            raise ConfigError(
                f"hash_block_size must be a positive integer, got {meta[HASH_BLOCK_SIZE]!r}", at_line(path, 1)
            ) from None
    optional = {k: v for k, v in cols.items() if k in schema.OPTIONAL_COLUMNS}
    df = make_workload(
        cols["arrival_s"],
        cols["prompt_len"],
        cols["output_len"],
        request_id=cols.get("request_id"),
        hash_block_size=bs,
        **optional,
    )
    return df, first, "request_id" in cols


def _parse_int_lists(values: pd.Series, name: str, path: Path, first_line: int) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    for i, s in enumerate(values.to_numpy(dtype=object)):
        if s is None or (isinstance(s, float) and math.isnan(s)) or not s.strip():
            out[i] = None
            continue
        try:
            out[i] = tuple(int(x) for x in s.split())
        except ValueError:
            raise ConfigError(
                f"{name} must be space-separated integers, got {s[:60]!r}", at_line(path, first_line + i)
            ) from None
    return out


def _table_from_parquet(path: Path) -> tuple[pd.DataFrame, bool]:
    """(the table, whether the file gives request_id)"""
    import pandas as pd

    try:
        df = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise ConfigError(f"cannot read Parquet: {e}", str(path)) from None
    unknown = [c for c in df.columns if c not in schema.COLUMNS]
    if unknown:
        raise ConfigError(f"unknown column(s) {unknown}; allowed: {list(schema.COLUMNS)}", str(path))
    ids_given = "request_id" in df.columns
    if not ids_given:
        df.insert(0, "request_id", np.arange(len(df), dtype=np.int64))
    for c in schema.TUPLE_COLUMNS:
        if c in df.columns:
            df[c] = tuple_column(None if v is None else v for v in df[c].to_numpy(dtype=object))
    if "tenant" in df.columns:
        df["tenant"] = df["tenant"].to_numpy(dtype=object)
    bs = df.attrs.get(HASH_BLOCK_SIZE)
    df = df[schema.present_columns(df)].reset_index(drop=True)
    df.attrs = {} if bs is None else {HASH_BLOCK_SIZE: int(bs)}
    return df, ids_given


# ---------------------------------------------------------------------- dispatch


def resolve_trace(trace: str | Path, base_dir: str | Path | None = None) -> tuple[Path, str | None]:
    """A bundled name (see :data:`BUNDLED_TRACES`) or a path (relative to ``base_dir``)
    -> (path, the bundled file's format or None)."""
    if isinstance(trace, str) and trace in BUNDLED_TRACES:
        fname, fmt = BUNDLED_TRACES[trace]
        return DATA_DIR / fname, fmt
    p = Path(trace).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = Path(base_dir) / p
    return p, None


def sniff_format(path: str | Path) -> str:
    """``azure``, ``table`` or ``mooncake`` from the extension and the CSV header."""
    path = existing_file(path, "trace file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "mooncake"
    if suffix in (".parquet", ".pq"):
        return "table"
    if suffix == ".csv":
        header = ""
        with path.open("r", encoding="utf-8-sig", errors="replace") as f:
            for line in f:
                if not line.startswith("#"):
                    header = line
                    break
        names = {h.strip().lower() for h in header.split(",")}
        if {c.lower() for c in AZURE_COLUMNS} <= names:
            return "azure"
        if {"arrival_s", "prompt_len", "output_len"} <= names:
            return "table"
        raise ConfigError(
            f"cannot tell the CSV format from its header {header.strip()!r}: expected the Azure columns "
            f"{list(AZURE_COLUMNS)} or a request table {list(schema.CORE_COLUMNS)}",
            str(path),
        )
    raise ConfigError(
        f"cannot tell the format of a {suffix or 'extension-less'} file: use .csv, .parquet or .jsonl, "
        "or set the format (azure|table|mooncake)",
        str(path),
    )


def read_trace(path: str | Path, format: str = "auto", hash_block_size: int | None = None) -> pd.DataFrame:
    """Read a workload file of the given format (``auto`` sniffs it)."""
    path = existing_file(path, "trace file")
    if format not in FORMATS:
        raise ConfigError(f"unknown trace format {format!r}; expected one of {list(FORMATS)}", str(path))
    fmt = sniff_format(path) if format == "auto" else format
    if fmt == "azure":
        return read_azure(path)
    if fmt == "mooncake":
        return read_mooncake(path, hash_block_size or MOONCAKE_BLOCK_SIZE)
    return read_table(path, hash_block_size)
