"""Writers for our request table (read back by :func:`servesim.traces.readers.read_table`)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from servesim.traces.schema import HASH_BLOCK_SIZE, TUPLE_COLUMNS, present_columns, validate_workload


def write_table(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a workload table as ``.parquet`` or ``.csv`` (by extension) after validating
    it. CSV: tuple columns as space-separated integers (None as an empty cell), NaN SLOs
    as empty cells, and a first line ``# hash_block_size=N`` when there are block hashes.
    Parquet keeps list columns as lists and the block size in the file's metadata."""
    path = Path(path)
    validate_workload(df, str(path))
    cols = present_columns(df)
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        out = df[cols].copy()
        for c in TUPLE_COLUMNS:
            if c in out.columns:
                out[c] = [None if v is None else list(v) for v in out[c]]
        out.attrs = {HASH_BLOCK_SIZE: int(df.attrs[HASH_BLOCK_SIZE])} if "block_hashes" in cols else {}
        out.to_parquet(path, index=False)
    elif suffix == ".csv":
        out = df[cols].copy()
        for c in TUPLE_COLUMNS:
            if c in out.columns:
                out[c] = ["" if v is None else " ".join(map(str, v)) for v in out[c]]
        with path.open("w", encoding="utf-8", newline="") as f:
            if "block_hashes" in cols:
                f.write(f"# {HASH_BLOCK_SIZE}={int(df.attrs[HASH_BLOCK_SIZE])}\n")
            out.to_csv(f, index=False, float_format="%.17g", na_rep="")
    else:
        raise ValueError(f"write_table writes .csv or .parquet, not {path.suffix!r}")
    return path
