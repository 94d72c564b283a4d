"""PNG plots of run outputs (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from .metrics import request_latencies  # noqa: E402


def _cdf(ax, x: np.ndarray, label: str, points: int = 1000, ls: str = "-") -> None:
    """Empirical CDF drawn through `points` quantiles (exact at that resolution)."""
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return
    q = np.linspace(0, 1, min(points, len(x)))
    ax.plot(np.quantile(x, q), q, label=label, lw=1.6, ls=ls)


def _step_means(replica: np.ndarray, start: np.ndarray, end: np.ndarray, value: np.ndarray,
                edges: np.ndarray, hold: bool) -> np.ndarray:
    """Per time bin, the time-weighted mean of a per-replica step function, averaged over
    replicas. Each iteration's value holds from its start to the next iteration's start
    (`hold`: a state such as KV use, which idle time does not change) or to its own end,
    zero while the replica idles (a rate such as the running batch). Bins without an
    iteration thus show the state carried on, never a drop to 0; before a replica's first
    iteration the value is 0."""
    out = np.zeros(len(edges) - 1)
    reps = np.unique(replica)
    for r in reps:
        m = replica == r
        o = np.argsort(start[m], kind="stable")
        s, e, v = start[m][o], end[m][o], value[m][o].astype(np.float64)
        nxt = np.append(s[1:], max(edges[-1], e[-1]))
        stop = nxt if hold else np.minimum(e, nxt)
        # the integral of the step function at every breakpoint (starts and stops)
        t = np.concatenate([s, stop])
        dv = np.concatenate([v, -v])
        order = np.argsort(t, kind="stable")
        t, dv = t[order], dv[order]
        level = np.cumsum(dv)  # the value from t[i] to t[i+1]
        area = np.concatenate([[0.0], np.cumsum(level[:-1] * np.diff(t))])
        cum = np.interp(edges, t, area, left=0.0, right=area[-1])
        out += np.diff(cum) / np.diff(edges)
    return out / max(len(reps), 1)


def _same(x: np.ndarray, y: np.ndarray) -> bool:
    """Two latency samples that draw the same CDF."""
    x, y = np.sort(x[np.isfinite(x)]), np.sort(y[np.isfinite(y)])
    return len(x) == len(y) and bool(np.array_equal(x, y))


def latency_cdfs(runs: dict[str, pa.Table], path: Path, title: str) -> None:
    """TTFT and TPOT CDFs, one line per variant. A variant whose CDF is the same as an
    earlier one's would hide behind it: it is dashed and labelled "(identical to X)"."""
    fig = latency_cdf_figure(runs, title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def latency_cdf_figure(runs: dict[str, pa.Table], title: str):
    """The figure :func:`latency_cdfs` saves."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    drawn: list[list[tuple[str, np.ndarray]]] = [[], []]
    for name, req in runs.items():
        lat = request_latencies(req)
        for k, (ax, x) in enumerate(((axes[0], lat["ttft_s"]), (axes[1], lat["tpot_s"] * 1e3))):
            twin = next((other for other, y in drawn[k] if _same(x, y)), None)
            drawn[k].append((name, x))
            if twin is None:
                _cdf(ax, x, name)
            else:
                _cdf(ax, x, f"{name} (identical to {twin})", ls="--")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("time to first token (s, log scale)")
    axes[1].set_xlabel("time per output token (ms)")
    for ax in axes:
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.12, top=0.9, wspace=0.18)
    return fig


def timeline(req: pa.Table, it: pa.Table, kv_total_blocks: int, path: Path, title: str,
             bins: int = 120) -> None:
    """Output-token throughput, running batch and KV-cache use over time."""
    fig = timeline_figure(req, it, kv_total_blocks, title, bins)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def timeline_figure(req: pa.Table, it: pa.Table, kv_total_blocks: int, title: str, bins: int = 120):
    """The figure :func:`timeline` saves."""
    start = it.column("start_s").to_numpy()
    dur = it.column("duration_s").to_numpy()
    gen = it.column("gen_tokens").to_numpy()
    ctx = it.column("ctx_tokens").to_numpy()
    used = it.column("kv_blocks_used").to_numpy()
    nreq = it.column("num_gen_requests").to_numpy() + it.column("num_ctx_requests").to_numpy()
    fig, axes = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
    if len(start):
        end = start + dur
        t_max = max(float(end.max()), 1e-9)
        edges = np.linspace(0, t_max, bins + 1)
        width = edges[1] - edges[0]
        out_tok, _ = np.histogram(end, bins=edges, weights=gen)
        ctx_tok, _ = np.histogram(end, bins=edges, weights=ctx)
        mid = (edges[:-1] + edges[1:]) / 2
        axes[0].plot(mid, out_tok / width, label="output tokens/s", lw=1.4)
        axes[0].plot(mid, ctx_tok / width, label="context tokens/s", lw=1.0, alpha=0.7)
        # time-weighted means per bin of step functions: KV use holds between iterations
        # (an idle stretch or a long iteration is not an emptied cache), the batch is 0 idle
        rep = it.column("replica").to_numpy()
        cached = it.column("kv_blocks_cached").to_numpy()
        host = it.column("kv_blocks_host").to_numpy()
        batch = _step_means(rep, start, end, nreq, edges, hold=False)
        axes[1].step(edges, np.append(batch, batch[-1]), where="post", lw=1.4, color="tab:green")
        pct = 100 / kv_total_blocks
        active = _step_means(rep, start, end, used, edges, hold=True) * pct
        cach = _step_means(rep, start, end, cached, edges, hold=True) * pct
        axes[2].stackplot(edges, np.append(active, active[-1]), np.append(cach, cach[-1]), step="post",
                          labels=["active (running requests)", "cached (reusable, evictable)"],
                          colors=["tab:purple", "tab:orange"], alpha=0.8)
        if host.any():
            kh = _step_means(rep, start, end, host, edges, hold=True) * pct
            axes[2].step(edges, np.append(kh, kh[-1]), where="post", color="tab:brown", lw=1.2,
                         ls="--", label="host tier (% of GPU pool size)")
        axes[2].legend(fontsize=8, loc="upper left")
        arr = req.column("arrival_s").to_numpy()
        a, _ = np.histogram(arr, bins=edges)
        ax2 = axes[0].twinx()
        ax2.plot(mid, a / width, color="gray", lw=0.8, ls=":", label="arrivals/s (right axis)")
        ax2.set_ylabel("arrivals / s", color="gray")
        h0, l0 = axes[0].get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        axes[0].legend(h0 + h2, l0 + l2, fontsize=8, loc="upper left")
    axes[0].set_ylabel("tokens / s")
    axes[1].set_ylabel("requests in batch")
    axes[2].set_ylabel("KV cache used (%)")
    axes[2].set_ylim(0, 105)
    axes[2].set_xlabel("time (s)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.subplots_adjust(left=0.08, right=0.93, bottom=0.07, top=0.94, hspace=0.12)
    return fig
