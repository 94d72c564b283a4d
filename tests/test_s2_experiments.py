"""The S2 experiments at CI sizes: each shows what its issue asks for."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from servesim.sim.cli import main
from servesim.traces.readers import read_trace
from servesim.traces.reuse_bound import reuse_bound
from servesim.traces.transforms import first_n

REPO = Path(__file__).parents[1]


def run(exp: str, tmp_path: Path, *sets: str, edit=None) -> dict[str, dict]:
    """Run a shipped experiment (optionally edited: anchors are resolved by the YAML
    loader, so `edit` sees every variant's full settings)."""
    out = tmp_path / exp
    path = REPO / "experiments" / f"{exp}.yaml"
    if edit is not None:
        doc = yaml.safe_load(path.read_text())
        doc = {k: v for k, v in doc.items() if not k.startswith("x-")}
        edit(doc)
        path = tmp_path / f"{exp}.yaml"
        path.write_text(yaml.safe_dump(doc))
    args = ["run", str(path), "--out", str(out), "--set", "output.plots=false"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    with open(out / "comparison.csv") as fh:
        rows = {r["variant"]: r for r in csv.DictReader(fh)}
    return {k: {c: _num(v) for c, v in r.items()} for k, r in rows.items()}


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def test_prefix_reuse_multi_turn(tmp_path):
    def small(doc):
        for v in doc["variants"]:
            p = v["workload"]["prefix"]
            if p["kind"] == "multi_turn":
                p["num_conversations"] = 150
            else:
                p["num_requests"] = 600

    r = run("prefix_reuse", tmp_path, edit=small)
    on, off = r["multiturn-reuse"], r["multiturn-noreuse"]
    assert on["prefix_hit_rate"] > 0.5
    assert off["ttft_s_mean"] >= 2 * on["ttft_s_mean"]
    # a smaller cache reuses less
    assert r["multiturn-reuse-cache64k"]["prefix_hit_rate"] < on["prefix_hit_rate"]
    assert r["sysprompt-reuse"]["prefix_hit_rate"] > 0.5


def test_chunked_prefill_lowers_p99_itl(tmp_path):
    r = run("chunked_prefill", tmp_path, "workload.synthetic.num_requests=500")
    assert r["chunk-512"]["itl_s_p99"] < r["chunk-2048"]["itl_s_p99"] < r["no-chunking"]["itl_s_p99"]
    # the same requests finish: the table's throughput column is the cost to read
    assert r["chunk-512"]["num_requests"] == r["no-chunking"]["num_requests"]


def test_kv_offload_host_tier_raises_hit_rate(tmp_path):
    r = run("kv_offload", tmp_path, "workload.prefix.num_conversations=200")
    assert r["gpu-host-64GB"]["prefix_hit_rate"] > r["gpu-only"]["prefix_hit_rate"]
    assert r["gpu-host-64GB"]["onboarded_blocks"] > 0
    assert r["gpu-only"]["offloaded_blocks"] == 0


def test_retention_keeps_system_prompt(tmp_path):
    r = run("retention_priority", tmp_path, "workload.prefix.num_requests=1500")
    assert r["retention-90"]["prefix_hit_rate_by_tenant_system"] > r["lru-only"]["prefix_hit_rate_by_tenant_system"]


def test_mooncake_unlimited_cache_reaches_reuse_bound(tmp_path):
    """With an unlimited cache and requests that do not overlap, the simulated hit rate
    equals the trace's block-level reuse bound, computed independently from the file:
    every leading 32-token block seen in an earlier prompt is reused, except that the
    last prompt token is always computed (it gives the logits)."""
    n = 1200
    df = first_n(read_trace(REPO / "traces" / "data" / "mooncake_conversation_trace.jsonl"), n)
    bound = reuse_bound(df, 32)
    plen = df["prompt_len"].to_numpy()
    expected = np.minimum(bound["per_request"], plen - 1).sum() / plen.sum()
    # an unlimited cache: room for every block of every request at once, none shared (not
    # a 10^9-token pool, whose 31M-entry free list alone takes seconds); evictions == 0 below
    pool = int((-(-(plen + df["output_len"].to_numpy()) // 32) * 32).sum())
    out = tmp_path / "moon"
    exp = tmp_path / "moon.yaml"
    exp.write_text(
        "name: moon\nmodel: llama-3.1-8b\nhardware: h100-sxm\n"
        f"workload: {{trace: {REPO / 'traces/data/mooncake_conversation_trace.jsonl'}, num_requests: {n}, "
        "arrival: {kind: fixed, rate_req_s: 0.01}}\n"
        "scheduler: {enable_chunked_context: true}\n"
        f"kv_cache: {{enable_block_reuse: true, tokens_per_block: 32, pool_tokens: {pool}}}\n"
        "output: {plots: false}\n")
    assert main(["run", str(exp), "--out", str(out)]) == 0
    s = json.loads((out / "base" / "summary.json").read_text())
    assert s["evictions"] == 0
    assert s["prefix_hit_rate"] == pytest.approx(expected, rel=1e-12)
    req = pq.read_table(out / "base" / "requests.parquet").to_pandas().sort_values("request_id")
    np.testing.assert_array_equal(req["cached_tokens"].to_numpy(), np.minimum(bound["per_request"], plen - 1))
