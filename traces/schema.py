"""The workload table: one row a request.

Columns (see DESIGN.md, "Data contracts"):

==================  =========  ================================================
column              dtype      meaning
==================  =========  ================================================
``request_id``      int64      unique
``arrival_s``       float64    arrival time in seconds, finite, non-decreasing,
                               at most MAX_ARRIVAL_S (1e9) from 0
                               (the origin is free: traces start at 0)
``prompt_len``      int64      prompt tokens, >= 1, <= MAX_LENGTH (10^9)
``output_len``      int64      tokens to generate (forced), >= 1, <= MAX_LENGTH
``priority``        int64      optional; larger is more important
``tenant``          str        optional; "" for none
``slo_ttft_s``      float64    optional; > 0, NaN = no SLO
``slo_tpot_s``      float64    optional; > 0, NaN = no SLO
``block_hashes``    object     optional; per row a tuple of ints, one id per
                               ``hash_block_size``-token block of the prompt
                               (the last block may be partial), so
                               ``len == ceil(prompt_len / hash_block_size)``;
                               or None when the row has no prefix information.
                               ``df.attrs["hash_block_size"]`` holds the size.
``prompt_tokens``   object     optional; per row a tuple of ``prompt_len`` token
                               ids, or None
==================  =========  ================================================

Any other column is an error (a misspelt ``slo_ttft`` must not be ignored silently).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from servesim.sim.types import ConfigError

if TYPE_CHECKING:  # (pandas is imported where a DataFrame is made: a `sim run` of a bundled trace needs none)
    import pandas as pd

CORE_COLUMNS: tuple[str, ...] = ("request_id", "arrival_s", "prompt_len", "output_len")
OPTIONAL_COLUMNS: tuple[str, ...] = (
    "priority",
    "tenant",
    "slo_ttft_s",
    "slo_tpot_s",
    "block_hashes",
    "prompt_tokens",
)
COLUMNS: tuple[str, ...] = CORE_COLUMNS + OPTIONAL_COLUMNS
INT_COLUMNS: tuple[str, ...] = ("request_id", "prompt_len", "output_len", "priority")
FLOAT_COLUMNS: tuple[str, ...] = ("arrival_s", "slo_ttft_s", "slo_tpot_s")
TUPLE_COLUMNS: tuple[str, ...] = ("block_hashes", "prompt_tokens")
HASH_BLOCK_SIZE = "hash_block_size"  # key in df.attrs
# The longest prompt or output accepted (tokens): far beyond any model's context, and small
# enough that sums over 10^8 requests stay exact in int64 (a length of 10^23 would wrap
# around to a negative number). Configs, generators and readers all refuse more.
MAX_LENGTH = 1_000_000_000
# The latest arrival accepted (seconds, ~31.7 years): a simulated clock later than this
# has too little floating-point resolution left for microsecond iterations (at 1e300 s an
# iteration would not move the clock at all).
MAX_ARRIVAL_S = 1e9


def make_workload(
    arrival_s: Sequence[float] | np.ndarray,
    prompt_len: Sequence[int] | np.ndarray,
    output_len: Sequence[int] | np.ndarray,
    *,
    request_id: Sequence[int] | np.ndarray | None = None,
    hash_block_size: int | None = None,
    **optional: Any,
) -> pd.DataFrame:
    """Build a workload frame with the schema's dtypes (no validation; call
    :func:`validate_workload` for that). ``optional`` takes the optional columns by name;
    tuple columns take any sequences (converted to tuples of Python ints, None kept).
    ``request_id`` defaults to 0..N-1."""
    import pandas as pd

    unknown = sorted(set(optional) - set(OPTIONAL_COLUMNS))
    if unknown:
        raise TypeError(f"unknown workload column(s) {unknown}; optional columns are {list(OPTIONAL_COLUMNS)}")
    n = len(arrival_s)
    data: dict[str, Any] = {
        "request_id": np.arange(n, dtype=np.int64) if request_id is None else np.asarray(request_id, dtype=np.int64),
        "arrival_s": np.asarray(arrival_s, dtype=np.float64),
        "prompt_len": np.asarray(prompt_len, dtype=np.int64),
        "output_len": np.asarray(output_len, dtype=np.int64),
    }
    for name in OPTIONAL_COLUMNS:  # fixed column order
        if name not in optional:
            continue
        values = optional[name]
        if name == "priority":
            data[name] = np.asarray(values, dtype=np.int64)
        elif name == "tenant":
            data[name] = pd.Series(list(values), dtype=str).to_numpy()
        elif name in FLOAT_COLUMNS:
            data[name] = np.asarray(values, dtype=np.float64)
        else:
            data[name] = tuple_column(values)
    df = pd.DataFrame(data)
    if hash_block_size is not None:
        df.attrs[HASH_BLOCK_SIZE] = int(hash_block_size)
    return df


def tuple_column(values: Iterable[Any]) -> np.ndarray:
    """An object array of tuples of Python ints (None kept) from any sequences."""
    items = [None if v is None else tuple(int(x) for x in v) for v in values]
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def validate_workload(df: pd.DataFrame, source: str) -> None:
    """Raise :class:`ConfigError` naming ``source`` and the first bad row (0-based
    position) if ``df`` breaks the schema above."""
    problem = find_problem(df)
    if problem is None:
        return
    row, msg = problem
    if row is None:
        raise ConfigError(msg, source)
    rid = ""
    if "request_id" in df.columns and is_int_dtype(df["request_id"]):
        rid = f" (request_id {int(df['request_id'].iat[row])})"
    raise ConfigError(msg, f"{source}: row {row}{rid}")


def find_problem(df: pd.DataFrame, require_sorted: bool = True) -> tuple[int | None, str] | None:
    """The first schema violation as ``(row, message)``, ``row`` being the 0-based
    position or None for a problem with the whole table; None when the frame is valid.
    Readers use it to report file line numbers instead of rows (with ``require_sorted``
    False: they sort a file's rows by arrival themselves)."""
    import pandas as pd

    if not isinstance(df, pd.DataFrame):
        return None, f"expected a pandas DataFrame, got {type(df).__name__}"
    missing = [c for c in CORE_COLUMNS if c not in df.columns]
    if missing:
        return None, f"missing column(s) {missing}; a workload needs {list(CORE_COLUMNS)}"
    unknown = [c for c in df.columns if c not in COLUMNS]
    if unknown:
        return None, f"unknown column(s) {unknown}; allowed: {list(COLUMNS)}"
    if len(df) == 0:
        return None, "the workload has no requests"
    for col in INT_COLUMNS:
        if col in df.columns and not is_int_dtype(df[col]):
            return None, f"column {col!r} has dtype {df[col].dtype}, expected int64"
    for col in FLOAT_COLUMNS:
        if col in df.columns and df[col].dtype != np.float64:
            return None, f"column {col!r} has dtype {df[col].dtype}, expected float64"

    bad: list[tuple[int, str]] = []  # (row, message): the first bad row of each rule

    def rule(mask: np.ndarray, msg) -> None:
        idx = np.flatnonzero(mask)
        if idx.size:
            i = int(idx[0])
            bad.append((i, msg(i) if callable(msg) else msg))

    rid = df["request_id"].to_numpy()
    rule(df["request_id"].duplicated().to_numpy(), lambda i: f"request_id {int(rid[i])} is not unique")
    arr = df["arrival_s"].to_numpy()
    rule(~np.isfinite(arr), lambda i: f"arrival_s must be a finite number, got {arr[i]}")
    rule(np.isfinite(arr) & (np.abs(arr) > MAX_ARRIVAL_S), lambda i: f"arrival_s must be within "
         f"±{MAX_ARRIVAL_S:g} s (~31.7 years; later times leave the simulated clock too little precision), "
         f"got {arr[i]:g}")
    if arr.size > 1 and require_sorted:
        dec = np.concatenate([[False], np.diff(arr) < 0])
        rule(dec, lambda i: f"arrival_s must be non-decreasing: {arr[i]} after {arr[i - 1]}")
    for col in ("prompt_len", "output_len"):
        v = df[col].to_numpy()
        rule(v < 1, lambda i, v=v, col=col: f"{col} must be >= 1, got {int(v[i])}")
        rule(v > MAX_LENGTH, lambda i, v=v, col=col: f"{col} must be at most {MAX_LENGTH:,} tokens, got {int(v[i]):,}")
    for col in ("slo_ttft_s", "slo_tpot_s"):
        if col in df.columns:
            v = df[col].to_numpy()
            rule(~(np.isnan(v) | (v > 0)) | np.isinf(v), lambda i, v=v, col=col: f"{col} must be > 0 and finite or NaN (none), got {v[i]}")
    if "tenant" in df.columns:
        t = df["tenant"].to_numpy(dtype=object)
        notstr = np.fromiter((type(x) is not str for x in t), dtype=bool, count=len(t))
        rule(notstr, lambda i: f"tenant must be a string ('' for none), got {t[i]!r}")
    plen = df["prompt_len"].to_numpy()
    if "block_hashes" in df.columns:
        bs = df.attrs.get(HASH_BLOCK_SIZE)
        if not isinstance(bs, (int, np.integer)) or isinstance(bs, bool) or bs <= 0:
            return None, (
                f"a block_hashes column needs df.attrs[{HASH_BLOCK_SIZE!r}] "
                f"(a positive int, tokens per block), got {bs!r}"
            )
        bs = int(bs)
        found = _tuple_problem(df["block_hashes"].to_numpy(), "block_hashes", -(-plen // bs), f"ceil(prompt_len / {bs})")
        if found:
            bad.append(found)
    if "prompt_tokens" in df.columns:
        found = _tuple_problem(df["prompt_tokens"].to_numpy(), "prompt_tokens", plen, "prompt_len")
        if found:
            bad.append(found)
    return min(bad, key=lambda b: b[0]) if bad else None  # ties: the first rule above


def _tuple_problem(col: np.ndarray, name: str, want_len: np.ndarray, want_desc: str) -> tuple[int, str] | None:
    # Vectorised screen first; the row loop below only runs to name the bad row.
    lens = np.fromiter(
        (0 if v is None else (len(v) if type(v) is tuple else -1) for v in col), dtype=np.int64, count=len(col)
    )
    present = np.fromiter((v is not None for v in col), dtype=bool, count=len(col))
    elem_types = set(map(type, itertools.chain.from_iterable(v for v in col if type(v) is tuple)))
    if elem_types <= {int} and not ((lens != want_len) & present).any():
        return None
    for i, v in enumerate(col):
        if v is None:
            continue
        if type(v) is not tuple:
            return i, f"{name} must be a tuple of ints or None, got {type(v).__name__}"
        if len(v) != want_len[i]:
            return i, f"{name} has {len(v)} entries, expected {want_desc} = {int(want_len[i])}"
        for x in v:
            if type(x) is not int:
                return i, f"{name} must hold ints, got {x!r}"
    return None


def is_int_dtype(s: pd.Series) -> bool:
    return s.dtype == np.int64


def present_columns(df: pd.DataFrame) -> list[str]:
    """The schema columns of ``df`` in canonical order."""
    return [c for c in COLUMNS if c in df.columns]


class WorkloadColumns:
    """A workload table as numpy columns (the schema's names, order and dtypes) and, made
    on first use, its DataFrame.

    What a simulation needs of a workload is its columns (`len`, `columns`, `attrs`,
    :meth:`column`); those never import pandas, so a `sim run` of a bundled trace starts
    without it (traces/spec.py `workload_columns`). Anything else asked of it (indexing,
    ``iloc``, ``equals``, ...) is asked of the DataFrame, made once from the columns
    (:func:`make_workload`'s frame: the very table `build_workload` returns)."""

    __slots__ = ("_columns", "_attrs", "_frame")

    def __init__(self, columns: dict[str, np.ndarray], attrs: dict | None = None, frame: "pd.DataFrame | None" = None):
        self._columns = columns
        self._attrs = dict(attrs or {})
        self._frame = frame

    @classmethod
    def of(cls, df: "pd.DataFrame | WorkloadColumns") -> "WorkloadColumns":
        """`df` itself when it is one already; a DataFrame's columns (not copied)."""
        if isinstance(df, WorkloadColumns):
            return df
        return cls({c: df[c].to_numpy() for c in df.columns}, df.attrs, df)

    def __len__(self) -> int:
        return len(self._columns["request_id"])

    @property
    def columns(self) -> list[str]:
        return list(self._columns)

    @property
    def attrs(self) -> dict:
        return self._attrs if self._frame is None else self._frame.attrs

    def column(self, name: str) -> np.ndarray:
        """Column `name` as a numpy array (KeyError when the workload has none)."""
        return self._columns[name]

    @property
    def frame(self) -> "pd.DataFrame":
        if self._frame is None:
            c = self._columns
            opt = {k: v for k, v in c.items() if k not in CORE_COLUMNS}
            self._frame = make_workload(c["arrival_s"], c["prompt_len"], c["output_len"], request_id=c["request_id"],
                                        hash_block_size=self._attrs.get(HASH_BLOCK_SIZE), **opt)
        return self._frame

    def __getitem__(self, key):
        return self.frame[key]

    def __getattr__(self, name: str):
        if name.startswith("_"):  # (dunders, and its own slots while unpickling)
            raise AttributeError(name)
        return getattr(self.frame, name)


def core_columns_valid(arrival_s: np.ndarray, prompt_len: np.ndarray, output_len: np.ndarray) -> bool:
    """True when the four core columns of a table (request ids 0..N-1 aside) break none of
    `find_problem`'s rules: a screen, the DataFrame path names what is wrong."""
    if len(arrival_s) == 0 or arrival_s.dtype != np.float64:
        return False
    if not (np.isfinite(arrival_s).all() and (np.abs(arrival_s) <= MAX_ARRIVAL_S).all()):
        return False
    if len(arrival_s) > 1 and (np.diff(arrival_s) < 0).any():
        return False
    return all(v.dtype == np.int64 and v.min() >= 1 and v.max() <= MAX_LENGTH for v in (prompt_len, output_len))
