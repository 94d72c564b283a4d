"""Plots of sweep and search results (matplotlib, Agg backend): latency vs load with the
saturation knee marked, the Pareto front of throughput per GPU vs p99 TTFT, and the cost
frontier of `sim search`."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _curves(df: pd.DataFrame, load_key: str, keys: list[str]):
    other = [k for k in keys if k != load_key]
    ok = df[df.status == "ok"]
    if not other:
        yield "", ok.sort_values(load_key)
        return
    for vals, g in ok.groupby(other, sort=True, dropna=False):
        vals = vals if isinstance(vals, tuple) else (vals,)
        yield ", ".join(f"{k.split('.')[-1]}={v}" for k, v in zip(other, vals)), g.sort_values(load_key)


def latency_vs_load(df: pd.DataFrame, load_key: str, keys: list[str], path: Path, title: str,
                    max_curves: int = 12) -> None:
    """p99 TTFT, p99 TPOT and achieved vs offered req/s against the load key, one line a
    curve (the other parameters fixed), the knee (first saturated point) circled."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for n, (label, g) in enumerate(_curves(df, load_key, keys)):
        if n >= max_curves:
            break
        x = g[load_key].to_numpy(dtype=float)
        for ax, col, scale in ((axes[0], "ttft_s_p99", 1.0), (axes[1], "tpot_s_p99", 1e3),
                               (axes[2], "throughput_req_s", 1.0)):
            y = g[col].to_numpy(dtype=float) * scale
            line, = ax.plot(x, y, marker=".", lw=1.4, label=label or None)
            k = g["knee"].to_numpy() == True  # noqa: E712  (None where unknown)
            if k.any():
                ax.scatter(x[k], y[k], s=120, facecolors="none", edgecolors=line.get_color(), lw=2, zorder=3)
        if n == 0:
            axes[2].plot(x, g["offered_rate_req_s"].to_numpy(dtype=float), color="grey", ls=":", lw=1,
                         label="offered (first curve)")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("p99 TTFT (s)")
    axes[1].set_ylabel("p99 TPOT (ms)")
    axes[2].set_ylabel("achieved req/s")
    for ax in axes:
        ax.set_xlabel(load_key)
        ax.grid(alpha=0.3)
    axes[0].plot([], [], "o", mfc="none", mec="k", label="knee (first saturated)")
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pareto_plot(df: pd.DataFrame, path: Path, title: str) -> None:
    ok = df[(df.status == "ok") & df.out_tok_s_per_gpu.notna() & df.ttft_s_p99.notna()]
    fig, ax = plt.subplots(figsize=(7, 4.6))
    ax.scatter(ok.out_tok_s_per_gpu, ok.ttft_s_p99, s=14, color="tab:blue", alpha=0.5, label="point")
    front = ok[ok.pareto == True].sort_values("out_tok_s_per_gpu")  # noqa: E712
    ax.plot(front.out_tok_s_per_gpu, front.ttft_s_p99, "o-", color="tab:red", label="Pareto front")
    ax.set_xlabel("output tokens/s per GPU")
    ax.set_ylabel("p99 TTFT (s)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def search_plot(df: pd.DataFrame, path: Path, title: str, slo_ttft: float, choice: int | None) -> None:
    """Every simulated candidate: $/hour vs p90 TTFT, coloured by whether it met the SLOs;
    the frontier (cheapest for its latency) as a line, the choice starred."""
    sim = df[df.status == "simulated"]
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for met, color, label in ((True, "tab:green", "meets the SLOs"), (False, "tab:grey", "misses")):
        g = sim[sim.meets_slo == met]
        ax.scatter(g.cost_per_hour, g.ttft_s_p90.clip(lower=1e-3), s=18, color=color, alpha=0.7, label=label)
    fr = sim[sim.frontier == True].sort_values("cost_per_hour")  # noqa: E712
    ax.plot(fr.cost_per_hour, fr.ttft_s_p90, "-", color="tab:red", lw=1, label="frontier")
    if choice is not None and choice in set(df.candidate):
        c = df[df.candidate == choice].iloc[0]
        ax.scatter([c.cost_per_hour], [c.ttft_s_p90], marker="*", s=260, color="gold", edgecolors="k", zorder=4,
                   label=f"choice: {c.gpus} GPU(s), ${c.cost_per_hour:.2f}/h")
    ax.axhline(slo_ttft, color="tab:red", ls=":", lw=1, label=f"SLO p90 TTFT {slo_ttft:g} s")
    ax.set_xlabel("$ per hour")
    ax.set_ylabel("p90 TTFT (s)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right", framealpha=0.9)
    ax.set_title(title + ("" if choice is None or choice not in set(df.candidate) else
                          "\nchoice: " + df[df.candidate == choice].iloc[0].label), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["latency_vs_load", "pareto_plot", "search_plot"]
