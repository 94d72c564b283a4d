"""Full-size runs of the KV-policy experiments (S2); writes kv_policies.md and the Mooncake
hit-rate-vs-cache-size plot (mooncake_hit_rate.png) into benchmarks/out/ (benchmarks/results/,
tracked, with --write-results).

    python benchmarks/kv_policies.py [--write-results]   # ~5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from results_io import RESULTS as STORE  # noqa: E402
from results_io import add_write_results  # noqa: E402

EXPERIMENTS = {
    "prefix_reuse": ["prefix_hit_rate", "ttft_s_mean", "ttft_s_p50", "ttft_s_p99", "throughput_out_tok_s",
                     "evictions", "kv_util_mean"],
    "chunked_prefill": ["itl_s_p99", "tpot_s_p50", "ttft_s_p50", "ttft_s_p99", "throughput_out_tok_s",
                        "goodput_req_s"],
    "kv_offload": ["prefix_hit_rate", "ttft_s_mean", "ttft_s_p99", "offloaded_blocks", "onboarded_blocks",
                   "offloaded_bytes"],
    "retention_priority": ["prefix_hit_rate_by_tenant_system", "prefix_hit_rate_by_tenant_oneoff",
                           "ttft_s_mean", "evictions_by_priority_35", "evictions_by_priority_90"],
    "mooncake_cache_size": ["kv_pool_tokens", "prefix_hit_rate", "ttft_s_p50", "ttft_s_p99", "evictions"],
}


def fmt(v) -> str:
    if isinstance(v, float):
        if np.isnan(v):
            return "-"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.4g}"
    return str(v)


def main() -> None:
    from servesim.sim.cli import main as sim

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_write_results(ap)
    dest = STORE.out_dir(ap.parse_args().write_results)  # where the page and the plot go

    out = Path("runs")
    parts = ["# KV-cache policies: full-size results\n",
             "Command: `python benchmarks/kv_policies.py` (runs each experiment file at its full size). "
             "Llama-3.1-8B on one H100 (simulated, roofline cost model). Latencies in seconds.\n"]
    for exp, cols in EXPERIMENTS.items():
        with contextlib.redirect_stdout(io.StringIO()):
            assert sim(["run", f"experiments/{exp}.yaml", "--out", str(out / exp), "--set", "output.plots=false"]) == 0
        df = pd.read_csv(out / exp / "comparison.csv")
        if exp == "mooncake_cache_size":
            import json
            df["kv_pool_tokens"] = [json.loads((out / exp / v / "summary.json").read_text())["kv_pool_blocks"] * 32
                                    for v in df["variant"]]
        parts.append(f"\n## {exp}\n\n`experiments/{exp}.yaml`\n")
        have = [c for c in cols if c in df.columns]
        parts.append("| variant | " + " | ".join(have) + " |")
        parts.append("|---|" + "---|" * len(have))
        for _, r in df.iterrows():
            parts.append(f"| {r['variant']} | " + " | ".join(fmt(r[c]) for c in have) + " |")
        if exp == "mooncake_cache_size":
            from servesim.traces.readers import read_trace
            from servesim.traces.reuse_bound import reuse_bound

            t = read_trace(REPO / "traces" / "data" / "mooncake_conversation_trace.jsonl")
            b = reuse_bound(t, 32)
            plen = t["prompt_len"].to_numpy()
            bound = np.minimum(b["per_request"], plen - 1).sum() / plen.sum()
            parts.append(f"\nThe trace's block-level reuse bound at 32-token blocks (every leading block seen "
                         f"in an earlier prompt, the last prompt token always computed): **{bound:.4f}**.\n")
            fig, ax = plt.subplots(figsize=(7, 4))
            ax.semilogx(df["kv_pool_tokens"], df["prefix_hit_rate"], "o-", label="simulated (trace arrivals / 4)")
            ax.axhline(bound, ls="--", color="gray", label="reuse bound of the trace")
            ax.axvline(df.loc[df.variant == "cache-h100", "kv_pool_tokens"].iloc[0], ls=":", color="tab:red",
                       label="one H100's KV pool (Llama-3.1-8B)")
            ax.set_xlabel("GPU KV cache (tokens)")
            ax.set_ylabel("prefix hit rate (tokens)")
            ax.set_title("Mooncake conversation trace: hit rate vs cache size")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(dest / "mooncake_hit_rate.png", dpi=110)
            parts.append("![hit rate vs cache size](mooncake_hit_rate.png)\n")
        print(f"{exp}: done", file=sys.stderr)
    (dest / "kv_policies.md").write_text("\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
