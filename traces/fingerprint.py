"""A stable digest of a workload table, to check that two runs replayed the same
requests."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pandas as pd

from servesim.traces.schema import CORE_COLUMNS, FLOAT_COLUMNS, HASH_BLOCK_SIZE, TUPLE_COLUMNS


def workload_fingerprint(df: pd.DataFrame, columns: Sequence[str] = CORE_COLUMNS) -> str:
    """sha256 (hex) over ``columns`` (by default the core columns ``request_id,
    arrival_s, prompt_len, output_len``) in row order.

    Numbers are hashed as little-endian int64 / float64 bytes (every NaN alike), so the
    digest depends on the values only, not on the platform or the pandas version. Pass
    more schema columns (e.g. ``schema.present_columns(df)``) to cover them too; a
    ``block_hashes`` column brings ``df.attrs["hash_block_size"]`` in with it.
    """
    h = hashlib.sha256()
    h.update(f"servesim-workload-v1 rows={len(df)}".encode())
    for col in columns:
        if col not in df.columns:
            raise KeyError(f"workload has no column {col!r}")
        h.update(f"|{col}|".encode())
        values = df[col]
        if col in TUPLE_COLUMNS:
            if col == "block_hashes":
                h.update(f"bs={df.attrs.get(HASH_BLOCK_SIZE)}".encode())
            for v in values.to_numpy(dtype=object):
                if v is None:
                    h.update(b"\xff" * 8)
                else:
                    h.update(np.int64(len(v)).astype("<i8").tobytes())
                    h.update(np.asarray(v, dtype="<i8").tobytes())
        elif col in FLOAT_COLUMNS:
            a = values.to_numpy(dtype=np.float64).copy()
            a[np.isnan(a)] = np.nan
            h.update(a.astype("<f8").tobytes())
        elif col == "tenant":
            for s in values.to_numpy(dtype=object):
                b = str(s).encode()
                h.update(np.int64(len(b)).astype("<i8").tobytes() + b)
        else:
            h.update(values.to_numpy(dtype=np.int64).astype("<i8").tobytes())
    return h.hexdigest()
