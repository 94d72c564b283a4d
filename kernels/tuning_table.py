"""The decode attention tuning table's lookup, without torch: which tuned row a batch gets and
the split bound it runs there. `kernels/decode_attention.py` (the GPU's kernel) and the
simulator's decode attention price (sim/kv_attention.py) both use it, so the simulator prices
the split bound the GPU runs. Import-light: json, math and pathlib only."""

from __future__ import annotations

import json
import math
from pathlib import Path

TUNING_DIR = Path(__file__).parent / "tuning"
MAX_SCALED_SPLITS = 64  # 2 x decode_attention.MAX_SPLITS: a scaled split bound's cap


def table_key(dtype: str, group: int, num_kv_heads: int, head_dim: int, block_size: int, sms: int,
              kv_dtype: str | None = None) -> str:
    """The table's key of a call's shapes (dtype names as torch prints them without ``torch.``:
    ``bfloat16``, ``float8_e4m3fn``); the cache's dtype is named where it differs from q's."""
    name = dtype
    if kv_dtype is not None and kv_dtype != dtype:
        name += "-kv-" + kv_dtype
    return f"{name}/g{group}/kv{num_kv_heads}/d{head_dim}/bs{block_size}/sm{sms}"


def nearest_row(rows: list[dict], batch: int) -> dict:
    """The tuned row nearest ``batch`` in log2 (ties to the larger batch)."""
    lb = math.log2(max(batch, 1))
    return min(rows, key=lambda r: (abs(math.log2(max(int(r["batch"]), 1)) - lb), -int(r["batch"])))


def scaled_splits(max_splits: int, tuned_batch: int, batch: int) -> int:
    """The tuned split bound at ``tuned_batch`` carried to ``batch``: the same number of programs
    (batch x splits), rounded to a power of two, in [1, MAX_SCALED_SPLITS]."""
    if tuned_batch == batch:
        return max_splits
    s = max_splits * tuned_batch / max(batch, 1)
    s = 1 << max(0, int(round(math.log2(max(s, 1.0)))))
    return max(1, min(s, MAX_SCALED_SPLITS))


def split_bound(rows: list[dict], batch: int) -> tuple[int | None, dict]:
    """(the split bound a batch runs, the tuned row's config) under one key's rows; the bound is
    None where the row leaves it to the kernel's default."""
    row = nearest_row(rows, batch)
    cfg = row["config"]
    s = cfg.get("max_splits")
    return (None if s is None else scaled_splits(int(s), int(row["batch"]), batch)), cfg


def table_for_device(device_names: list[str], sms: int | None, folder: Path = TUNING_DIR) -> dict | None:
    """The table in ``folder`` made on a device one of ``device_names`` names (a substring of its
    recorded device name, case-insensitive) with ``sms`` SMs; None: none."""
    if not device_names or not sms or not folder.is_dir():
        return None
    for f in sorted(folder.glob("*.json")):
        try:
            t = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        dev = str(t.get("device", "")).lower()
        if t.get("sms") == sms and any(n.lower() in dev for n in device_names):
            return {**t, "path": str(f)}
    return None
