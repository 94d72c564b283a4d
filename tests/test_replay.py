"""Replaying a run reproduces it: same arrivals and lengths, and the same prompt identity
(block hashes or token ids), so prefix-cache reuse is the same on the replay."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from servesim.sim.cli import main

BASE = """model: llama-3.1-8b
scheduler: {max_batch_size: 64, max_num_tokens: 4096, enable_chunked_context: true}
kv_cache: {enable_block_reuse: true, tokens_per_block: 16, pool_tokens: 40000}
output: {plots: false, timeline: false}
"""

WORKLOADS = {
    "hashes": """workload:
  prefix: {kind: shared_system_prompt, num_requests: 150, arrival: {kind: poisson, rate_req_s: 30},
           system_len: 512, user_len: {kind: constant, value: 100}, output_len: {kind: constant, value: 20},
           shared_fraction: 0.7, hash_block_size: 16}
""",
    "tokens": """workload:
  prefix: {kind: multi_turn, num_conversations: 30, arrival: {kind: poisson, rate_req_s: 5},
           turns: {kind: uniform, low: 2, high: 4}, user_len: {kind: constant, value: 80},
           output_len: {kind: constant, value: 20}, think_time_s: {kind: exponential, mean: 1},
           hash_block_size: null}
""",
}


@pytest.mark.parametrize("kind", sorted(WORKLOADS))
def test_replay_keeps_prefix_reuse(tmp_path: Path, kind: str):
    exp = tmp_path / "a.yaml"
    exp.write_text("name: a\n" + BASE + WORKLOADS[kind])
    assert main(["run", str(exp), "--out", str(tmp_path / "a")]) == 0
    run = tmp_path / "a" / "base"
    t = pq.read_table(run / "requests.parquet")
    col = "block_hashes" if kind == "hashes" else "prompt_tokens"
    assert col in t.schema.names
    if kind == "hashes":
        assert t.schema.metadata[b"servesim.hash_block_size"] == b"16"
    rep = tmp_path / "b.yaml"
    rep.write_text("name: b\n" + BASE + f"workload: {{replay: {run}}}\n")
    assert main(["run", str(rep), "--out", str(tmp_path / "b")]) == 0
    sa = json.loads((run / "summary.json").read_text())
    sb = json.loads((tmp_path / "b" / "base" / "summary.json").read_text())
    assert sa["prefix_hit_rate"] > 0.1  # the workload reuses
    assert sb["prefix_hit_rate"] == sa["prefix_hit_rate"]
    ra = pq.read_table(run / "requests.parquet").to_pandas().set_index("request_id").sort_index()
    rb = pq.read_table(tmp_path / "b" / "base" / "requests.parquet").to_pandas().set_index("request_id").sort_index()
    for c in ("first_token_s", "finish_s", "cached_tokens"):
        assert (ra[c] == rb[c]).all(), c
