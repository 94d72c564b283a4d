"""PNG plots of run outputs (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from .metrics import request_latencies  # noqa: E402


def _cdf(ax, x: np.ndarray, label: str, points: int = 1000) -> None:
    """Empirical CDF drawn through `points` quantiles (exact at that resolution)."""
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return
    q = np.linspace(0, 1, min(points, len(x)))
    ax.plot(np.quantile(x, q), q, label=label, lw=1.6)


def latency_cdfs(runs: dict[str, pa.Table], path: Path, title: str) -> None:
    """TTFT and TPOT CDFs, one line per variant."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, req in runs.items():
        lat = request_latencies(req)
        _cdf(axes[0], lat["ttft_s"], name)
        _cdf(axes[1], lat["tpot_s"] * 1e3, name)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("time to first token (s, log scale)")
    axes[1].set_xlabel("time per output token (ms)")
    for ax in axes:
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.12, top=0.9, wspace=0.18)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def timeline(req: pa.Table, it: pa.Table, kv_total_blocks: int, path: Path, title: str,
             bins: int = 120) -> None:
    """Output-token throughput, running batch and KV-cache use over time."""
    start = it.column("start_s").to_numpy()
    dur = it.column("duration_s").to_numpy()
    gen = it.column("gen_tokens").to_numpy()
    ctx = it.column("ctx_tokens").to_numpy()
    used = it.column("kv_blocks_used").to_numpy()
    nreq = it.column("num_gen_requests").to_numpy() + it.column("num_ctx_requests").to_numpy()
    fig, axes = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
    if len(start):
        end = start + dur
        t_max = float(end.max())
        edges = np.linspace(0, t_max, bins + 1)
        width = edges[1] - edges[0]
        out_tok, _ = np.histogram(end, bins=edges, weights=gen)
        ctx_tok, _ = np.histogram(end, bins=edges, weights=ctx)
        mid = (edges[:-1] + edges[1:]) / 2
        axes[0].plot(mid, out_tok / width, label="output tokens/s", lw=1.4)
        axes[0].plot(mid, ctx_tok / width, label="context tokens/s", lw=1.0, alpha=0.7)
        axes[0].legend(fontsize=8)
        # time-weighted means per bin
        w, _ = np.histogram(end, bins=edges, weights=dur)
        kv, _ = np.histogram(end, bins=edges, weights=used * dur)
        cached = it.column("kv_blocks_cached").to_numpy()
        host = it.column("kv_blocks_host").to_numpy()
        kc, _ = np.histogram(end, bins=edges, weights=cached * dur)
        kh, _ = np.histogram(end, bins=edges, weights=host * dur)
        nb, _ = np.histogram(end, bins=edges, weights=nreq * dur)
        with np.errstate(invalid="ignore", divide="ignore"):
            axes[1].plot(mid, nb / w, lw=1.4, color="tab:green")
            active = 100 * kv / w / kv_total_blocks
            cach = 100 * kc / w / kv_total_blocks
            axes[2].stackplot(mid, np.nan_to_num(active), np.nan_to_num(cach),
                              labels=["active (running requests)", "cached (reusable, evictable)"],
                              colors=["tab:purple", "tab:orange"], alpha=0.8)
            if host.any():
                axes[2].plot(mid, 100 * kh / w / kv_total_blocks, color="tab:brown", lw=1.2,
                             ls="--", label="host tier (% of GPU pool size)")
            axes[2].legend(fontsize=8, loc="upper left")
        arr = req.column("arrival_s").to_numpy()
        a, _ = np.histogram(arr, bins=edges)
        ax2 = axes[0].twinx()
        ax2.plot(mid, a / width, color="gray", lw=0.8, ls=":", label="arrivals/s")
        ax2.set_ylabel("arrivals / s", color="gray")
    axes[0].set_ylabel("tokens / s")
    axes[1].set_ylabel("requests in batch")
    axes[2].set_ylabel("KV cache used (%)")
    axes[2].set_ylim(0, 105)
    axes[2].set_xlabel("time (s)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.subplots_adjust(left=0.08, right=0.93, bottom=0.07, top=0.94, hspace=0.12)
    fig.savefig(path, dpi=110)
    plt.close(fig)
