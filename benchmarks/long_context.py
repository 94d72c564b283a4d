"""Where the calibrated model misprices the long-prompt run (S11 must-show 4): every GPU
iteration of the installed long-prompt runs (gpu_fidelity.py steps 10, 11) priced on its own
recorded shape with the profile fidelity_h200.py replays it with, by iteration kind, by the
decode graph's padded batch (with the decode attention kernel's split bound there, from the
tuning table the run used: kernels/tuning/h200.json), by the decode KV attended, and for
mixed iterations by the context their chunks attend to; beside it what the calibration
measured (the kernel-alone table's batches x contexts, the grid's decode points).

    python benchmarks/long_context.py [--write-results]   # -> benchmarks/out/ (results/) long_context_h200.md
    python benchmarks/long_context.py --refit-split-bound PROFILE...  # the split bound's rate, refit only

The longest decode sequence of each iteration is reconstructed from requests.parquet (a
request's KV at its k-th token is prompt + k; the token is emitted at its iteration's end).
`section()` is the text fidelity_h200.py carries.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from results_io import RESULTS as STORE  # noqa: E402
from results_io import add_write_results  # noqa: E402

KV_TABLE = STORE.tables / "calibration_h200" / "decode_attention_kv.csv"
TUNING = REPO / "kernels" / "tuning" / "h200.json"
KV_BUCKETS = (32_000, 64_000, 128_000, 192_000, 224_000, 10**9)
PRIOR_BUCKETS = (0, 4096, 8192, 16384, 10**9)


def priced_iterations(run: Path, profile: Path):
    """The run's iterations with ``pred`` (the profile's price of the recorded shape),
    ``kind``, ``pad`` (a decode graph's padded batch) and ``max_kv`` (the longest decode
    sequence, reconstructed from the requests)."""
    import pandas as pd
    import yaml

    from servesim.sim.calibrate import load_profile, rows_from_iterations, shapes_from_grid
    from servesim.sim.cost_model import RooflineCostModel
    from servesim.sim.specs import load_hardware, load_model

    cfg = yaml.safe_load((run / "config.yaml").read_text())["config"]
    m, hw = load_model(cfg["model"]), load_hardware(cfg["hardware"])
    cm = RooflineCostModel(m, hw, load_profile(profile, m, hw)[0], cuda_graphs=True)
    it = pd.read_parquet(run / "iterations.parquet")
    req = pd.read_parquet(run / "requests.parquet", columns=["prompt_len", "token_times"])
    end = (it.start_s + it.duration_s).to_numpy()
    mx = np.zeros(len(it), dtype=np.int64)
    for p, tt in zip(req.prompt_len, req.token_times):
        t = np.asarray(tt)[1:]  # the first token is the prefill's
        if len(t):
            idx = np.clip(np.searchsorted(end, t - 1e-7), 0, len(it) - 1)
            np.maximum.at(mx, idx, p + np.arange(1, len(t) + 1))
    it["max_kv"] = mx
    shapes, times, kinds = shapes_from_grid(rows_from_iterations(m.name, it))
    # the longest decode KV of each iteration (the split bound's price: sim/kv_attention.py SplitBound)
    shapes = [replace(s, decode_kv_max=int(x)) if s.n_decode else s for s, x in zip(shapes, mx)]
    it["pred"] = [cm.price(s) for s in shapes]
    it["kind"] = kinds
    it["pad"] = np.where(it.graph & (it.num_ctx_requests == 0), it.num_gen_requests + it.padded_tokens, 0)
    return it, m


def kernel_splits(batch: int, model) -> int | None:
    """The decode attention kernel's split bound at ``batch`` under the H200 tuning table
    (None without torch/triton or a table)."""
    try:
        import torch

        from servesim.kernels import decode_attention as da
    except ImportError:
        return None
    if not TUNING.exists():
        return None
    prev = da._TUNING, da._TUNING_LOADED_ENV
    try:
        table = json.loads(TUNING.read_text())
        da.set_tuning(table)
        key = da.tuning_key(torch.bfloat16, model.num_heads // model.num_kv_heads, model.num_kv_heads,
                            model.head_dim, 32, int(table["sms"]))
        cfg = da.tuned_config(batch, key)
        return None if cfg is None else cfg.max_splits
    finally:
        da._TUNING, da._TUNING_LOADED_ENV = prev
        da._EPOCH += 1


def _slope(x, y) -> float:
    if len(x) < 3 or np.ptp(x) == 0:
        return float("nan")
    return float(np.polyfit(x, y, 1)[0])


def tables(it, model) -> list[str]:
    tot = float(it.duration_s.sum())
    out = ["By iteration kind (the profile's price of each GPU iteration's own shape):", "",
           "| kind | iterations | GPU s (share) | sim s | total error | MAPE |", "|---|---|---|---|---|---|"]
    for k, g in it.groupby("kind"):
        out.append(f"| {k} | {len(g)} | {g.duration_s.sum():.2f} ({g.duration_s.sum() / tot:.0%}) | {g.pred.sum():.2f} | "
                   f"{g.pred.sum() / g.duration_s.sum() - 1:+.1%} | {np.mean(np.abs(g.pred / g.duration_s - 1)):.1%} |")
    d = it[it["pad"] > 0]
    out += ["", "Pure decode iterations (CUDA graph) by padded batch: the kernel's split bound there (the tuning "
            "table's nearest tuned batch, its splits scaled to the batch), the batch's longest sequence "
            "(reconstructed), and the step time's slope in the decode KV sum (ns per token, all layers) on the GPU "
            "and in the model:", "",
            "| padded batch | kernel splits | iterations | GPU s (share) | decode KV sum | longest sequence, median | "
            "GPU ms, median | sim ms, median | total error | GPU slope ns/token | sim slope ns/token |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p, g in d.groupby("pad"):
        s = kernel_splits(int(p), model)
        out.append(f"| {int(p)} | {s if s is not None else '?'} | {len(g)} | {g.duration_s.sum():.2f} "
                   f"({g.duration_s.sum() / tot:.0%}) | {int(g.decode_kv_tokens.min()):,}-{int(g.decode_kv_tokens.max()):,} | "
                   f"{int(np.median(g.max_kv)):,} | {1e3 * g.duration_s.median():.2f} | {1e3 * g.pred.median():.2f} | "
                   f"{g.pred.sum() / g.duration_s.sum() - 1:+.1%} | {1e9 * _slope(g.decode_kv_tokens, g.duration_s):.1f} | "
                   f"{1e9 * _slope(g.decode_kv_tokens, g.pred):.1f} |")
    sp = {int(p): kernel_splits(int(p), model) for p in d["pad"].unique()}
    few = d["pad"].map(lambda p: (sp[int(p)] or 99) <= 4 and p >= 16)
    if few.any() and (~few).any():
        a, b = d[few], d[~few]
        out += ["", f"Reading: {a.duration_s.sum() / tot:.0%} of the run's busy time is decode at padded batches "
                f"{', '.join(str(int(p)) for p in sorted(a['pad'].unique()))} (the kernel's split bound <= 4 there), "
                f"priced {a.pred.sum() / a.duration_s.sum() - 1:+.1%} in total (MAPE "
                f"{np.mean(np.abs(a.pred / a.duration_s - 1)):.1%}); the other decode batches "
                f"{b.pred.sum() / b.duration_s.sum() - 1:+.1%} (MAPE {np.mean(np.abs(b.pred / b.duration_s - 1)):.1%}). "
                f"Their longest sequence is {int(np.median(a.max_kv)):,} tokens (median) at a mean of "
                f"{int(np.median(a.decode_kv_tokens / a.num_gen_requests)):,} per request: with few splits the "
                "programs of the longest sequences set the time, which the KV sum does not see (GPU slope in the "
                "KV sum well below a KV-sum model's) and the profile's split bound prices where it has one."]
    out += ["", "Pure decode iterations by decode KV sum:", "",
            "| decode KV sum | iterations | GPU s | median batch | total error | MAPE |", "|---|---|---|---|---|---|"]
    lo = 0
    for hi in KV_BUCKETS:
        g = d[(d.decode_kv_tokens > lo) & (d.decode_kv_tokens <= hi)]
        if len(g):
            out.append(f"| {lo:,}-{hi:,} | {len(g)} | {g.duration_s.sum():.2f} | {int(g.num_gen_requests.median())} | "
                       f"{g.pred.sum() / g.duration_s.sum() - 1:+.1%} | {np.mean(np.abs(g.pred / g.duration_s - 1)):.1%} |"
                       .replace(f"{10**9:,}", "max"))
        lo = hi
    c = it[it.num_ctx_requests > 0]
    out += ["", "Iterations with context chunks by the context the chunks attend to (cached + earlier chunks):", "",
            "| attended context | iterations | GPU s | chunk tokens, median | decodes beside, median | total error | "
            "MAPE |", "|---|---|---|---|---|---|---|"]
    for lo, hi in zip(PRIOR_BUCKETS, PRIOR_BUCKETS[1:]):
        g = c[(c.ctx_cached_tokens >= lo) & (c.ctx_cached_tokens < hi)] if lo else c[c.ctx_cached_tokens == 0]
        if len(g):
            lab = "none" if not lo else f"{lo:,}-{hi - 1:,}".replace(f"{10**9 - 1:,}", "max")
            out.append(f"| {lab} | {len(g)} | {g.duration_s.sum():.2f} | {int(g.ctx_tokens.median()):,} | "
                       f"{int(g.num_gen_requests.median())} | {g.pred.sum() / g.duration_s.sum() - 1:+.1%} | "
                       f"{np.mean(np.abs(g.pred / g.duration_s - 1)):.1%} |")
        if not lo:
            c = c[c.ctx_cached_tokens > 0]
    return out


def coverage(profile: Path, model) -> list[str]:
    """What the calibration measured: the kernel-alone table's batches x contexts, the
    grid's decode points (batch, KV per request)."""
    import yaml

    from servesim.sim import kv_attention
    from servesim.sim.calibrate import read_grid

    out = ["", "What the calibration measured:", ""]
    if KV_TABLE.exists():
        rows = kv_attention.read_table(KV_TABLE)
        by = {}
        for r in rows:
            by.setdefault((r["kv_dtype"], r["batch"]), set()).add(r["ctx"])
        out.append("- the decode attention kernel alone (" + str(KV_TABLE.relative_to(REPO)) + "): " + "; ".join(
            f"{dt} batch {b} at contexts {', '.join(str(x) for x in sorted(v))}" for (dt, b), v in sorted(by.items())))
    doc = yaml.safe_load(profile.read_text())
    src = (doc.get("provenance") or {}).get("source", "")
    grid = STORE.path(src.removeprefix("benchmarks/results/")) if src else None
    if grid is not None and grid.exists():
        pts = {}
        for r in read_grid(grid, model.name):
            if r["kind"] == "decode" and int(r["n_decode"]):
                n = int(r["n_decode"])
                pts.setdefault(n, []).append(int(r["kv_sum"]) / n)
        out.append("- the grid's decode rows (" + src + "): " + "; ".join(
            f"batch {n}: KV/request {int(min(v)):,}-{int(max(v)):,}" for n, v in sorted(pts.items())))
    return out


def section(runs: list[tuple[str, Path]], profile: Path) -> list[str]:
    """The analysis of each (label, GPU run) with ``profile``, as markdown lines."""
    out = ["## Long prompts: which iterations the profile misprices", "",
           f"`python benchmarks/long_context.py` (each GPU iteration priced on its own recorded shape, with its "
           f"longest decode sequence reconstructed for the kernel's split bound (sim/kv_attention.py `SplitBound`), "
           f"with {profile.relative_to(REPO) if profile.is_relative_to(REPO) else profile}; no replay).", ""]
    model = None
    for lab, run in runs:
        it, model = priced_iterations(run, profile)
        out += [f"### {lab}", ""] + tables(it, model) + [""]
    if model is not None:
        out += coverage(profile, model) + [""]
    return out


def installed_long_runs() -> tuple[list[tuple[str, Path]], Path | None]:
    from fidelity_h200 import LONG_SETS, PREFIX, machine_profile, machines, model_of, runs_of

    runs, prof = [], None
    for mach, cs in machines().items():
        for name, rs in runs_of(cs, LONG_SETS).items():
            model = model_of(rs[0])
            prof = machine_profile(cs, model) or REPO / "profiles" / f"{PREFIX}-{model}.yaml"
            runs += [(f"{mach} {name} run {i + 1}", r) for i, r in enumerate(rs)]
    return runs, prof


def refit_split_bound(profiles: list[Path]) -> list[Path]:
    """The refit-only path of the split bound's rate (``decode_attention_long.per_sm_token_s``,
    sim/kv_attention.py `fit_split_rate`): each profile's long-context kernel refitted by this
    checkout's `sim calibrate` fit (sim/calibrate.py `fit_long_context`) from the kv-long table
    it names (archived; the lengths its sweep drew replayed where the table predates them),
    the rest of the profile untouched. The fields fitted before must come out the same."""
    import yaml

    from servesim.sim import kv_attention
    from servesim.sim.calibrate import dump_profile, fit_long_context
    from servesim.sim.specs import load_hardware, load_model

    done = []
    for prof in profiles:
        doc = yaml.safe_load(prof.read_text())
        sec = (doc.get("roofline") or {}).get("decode_attention_long")
        if not isinstance(sec, dict):
            continue
        model, hw = load_model(doc["model"]), load_hardware(doc["hardware"])
        table = STORE.path(sec["source"].removeprefix("benchmarks/results/"))
        params: dict = {}
        fit_long_context(params, kv_attention.read_table(table), model, table, hw,
                         int((doc.get("provenance") or {}).get("tp", 1) or 1))
        new = params["decode_attention_long"]
        for f in ("batches", "short_per_token_s", "long_per_token_s"):
            if not np.allclose(new[f], sec[f], rtol=1e-9, atol=0):
                raise SystemExit(f"{prof}: decode_attention_long.{f} refits differently ({new[f]} vs {sec[f]})")
        sec["per_sm_token_s"] = new["per_sm_token_s"]
        doc["roofline"]["decode_attention_long"] = {k: sec[k] for k in kv_attention.LongContextKernel.model_fields
                                                    if k in sec}
        dump_profile(prof, doc)
        done.append(prof)
    return done


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", type=Path, help="price with this profile (default: fidelity_h200.py's)")
    ap.add_argument("--refit-split-bound", type=Path, nargs="+", metavar="PROFILE",
                    help="refit these profiles' split-bound rate from their kv-long tables (in place) and exit")
    add_write_results(ap)
    args = ap.parse_args(argv)
    if args.refit_split_bound:
        for p in refit_split_bound(args.refit_split_bound):
            print(f"refitted {p}")
        return
    runs, prof = installed_long_runs()
    if not runs:
        raise SystemExit("no long-prompt run installed (gpu_fidelity.py --steps 10)")
    text = "\n".join(["# Long-prompt iterations on the H200", ""] + section(runs, args.profile or prof)) + "\n"
    out = STORE.out_dir(args.write_results) / "long_context_h200.md"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
