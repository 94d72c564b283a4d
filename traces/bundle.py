"""Make the compact binary copies of the bundled traces (traces/readers.py BUNDLED_BINARY).

    python -m servesim.traces.bundle          # (re)writes traces/data/azure_conv.npz from the shipped CSV

A copy holds the workload columns the reader makes of the shipped file (arrival_s,
prompt_len, output_len) and the file's sha256: the reader uses it only while the file is
that one, so an edited CSV is read as it is. tests/test_traces.py checks that the copy
gives the very table the CSV does. The shipped CSV stays, with its license.
"""

from __future__ import annotations

import hashlib

import numpy as np

from servesim.traces import readers


def write_binary(csv_name: str) -> str:
    src = readers.DATA_DIR / csv_name
    dst = readers.DATA_DIR / readers.BUNDLED_BINARY[csv_name]
    saved = readers.BUNDLED_BINARY.pop(csv_name)  # read the CSV itself
    try:
        df = readers.read_azure(src)
    finally:
        readers.BUNDLED_BINARY[csv_name] = saved
    if list(df.columns) != ["request_id", "arrival_s", "prompt_len", "output_len"] or df.attrs:
        raise SystemExit(f"{src}: the copy holds arrival_s, prompt_len and output_len only, not {list(df.columns)}")
    if not np.array_equal(df["request_id"].to_numpy(), np.arange(len(df))):
        raise SystemExit(f"{src}: request ids are not 0..N-1")
    with open(dst, "wb") as f:
        np.savez(f, arrival_s=df["arrival_s"].to_numpy(np.float64),
                 prompt_len=df["prompt_len"].to_numpy().astype(np.int32),
                 output_len=df["output_len"].to_numpy().astype(np.int32),
                 source_sha256=np.array(hashlib.sha256(src.read_bytes()).hexdigest()))
    return str(dst)


def main() -> None:
    for name in list(readers.BUNDLED_BINARY):
        print(write_binary(name))


if __name__ == "__main__":
    main()
