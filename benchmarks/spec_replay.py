"""Replay a gpu_spec_decoding.py call's GPU runs on the simulator with calibration profiles
(anywhere, no GPU): the speedups of speculative decoding measured on the GPU beside the
calibrated simulator's, for the same requests and the same accepted drafts.

    python benchmarks/spec_replay.py benchmarks/results/spec_gpu/call4_runs.tar.gz [more.tar.gz] \\
        --profile profiles/h200-llama-3.1-8b.yaml --draft-profile profiles/h200-llama-3.2-1b.yaml \\
        [--cross-machine benchmarks/results/spec_gpu/call2_runs.tar.gz ...] [--write-results]

Writes spec_replay.md into benchmarks/out/ (benchmarks/results/ with --write-results).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tarfile
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from gpu_spec_decoding import sim_replay  # noqa: E402
from results_io import RESULTS as STORE  # noqa: E402
from results_io import add_write_results  # noqa: E402


def _step_error(run: Path, sim_iterations, batch: int) -> tuple[float, float | None]:
    """sim / GPU - 1 of the median duration of the run's drafting iterations: decode-only
    ones at the full batch, and those beside context chunks (None: none) -- the same
    iterations on both (the replay schedules the same requests and accepts the same drafts)."""
    import numpy as np
    import pyarrow.parquet as pq

    gpu = pq.read_table(run / "iterations.parquet").to_pydict()
    sim = sim_iterations.to_pydict()
    ctx = np.asarray(gpu["num_ctx_requests"])
    drafting = np.asarray(gpu["draft_tokens_proposed"]) > 0
    dec = (ctx == 0) & (np.asarray(gpu["num_gen_requests"]) == batch) & drafting
    mixed = (ctx > 0) & drafting
    g, s = np.asarray(gpu["duration_s"]), np.asarray(sim["duration_s"])
    if len(s) != len(g):
        raise RuntimeError(f"{run.name}: the replay ran {len(s)} iterations, the GPU {len(g)}")
    return (float(np.median(s[dec]) / np.median(g[dec]) - 1),
            float(np.median(s[mixed]) / np.median(g[mixed]) - 1) if mixed.any() else None)


# iteration kinds, by what the GPU backend runs (gpu_backend/executor.py)
KINDS = ("prompt-only", "drafting, decode-only, full batch", "drafting, decode-only, fewer requests",
         "drafting beside context chunks", "decode-only, no drafts")


def iteration_kinds(it: dict, batch: int) -> list[str]:
    """Each iteration's kind (KINDS; "with context, no drafts" for a plain mixed step) from
    a run's iterations table."""
    out = []
    for c, g, d in zip(it["num_ctx_requests"], it["num_gen_requests"], it["draft_tokens_proposed"]):
        if c and not g:
            out.append(KINDS[0])
        elif d:
            out.append(KINDS[3] if c else KINDS[1] if g == batch else KINDS[2])
        else:
            out.append("with context, no drafts" if c else KINDS[4])
    return out


def _metrics(run: dict, dur) -> tuple[float, float]:
    """(TPOT p50, output tokens/s) of a run whose iterations took ``dur`` (seconds each,
    back to back from the GPU run's first start): each request's first and last token at the
    end of the iteration that emitted them on the GPU (the replay schedules the same)."""
    import numpy as np

    end = run["t0"] + np.cumsum(dur)
    fi, li, out = run["first_it"], run["last_it"], run["out"]
    tpot = (end[li] - end[fi]) / np.maximum(out - 1, 1)
    return float(np.median(tpot[out > 1])), float(out.sum() / end[-1])


def _run_data(run: Path, sim_iterations, batch: int, spec: bool = True) -> dict:
    import numpy as np
    import pyarrow.parquet as pq

    it = pq.read_table(run / "iterations.parquet").to_pydict()
    req = pq.read_table(run / "requests.parquet").to_pydict()
    start, g = np.asarray(it["start_s"]), np.asarray(it["duration_s"])
    s = np.asarray(sim_iterations.column("duration_s").to_pylist())
    if len(s) != len(g):
        raise RuntimeError(f"{run.name}: the replay ran {len(s)} iterations, the GPU {len(g)}")
    gend = start + g
    return {"gpu": g, "sim": s, "kind": np.asarray(iteration_kinds(it, batch)), "t0": float(start[0]),
            "n_ctx": np.asarray(it["num_ctx_requests"]), "batch": batch, "spec": spec,
            "prep": np.asarray(it["host_prep_s"]), "drafts": np.asarray(it["draft_tokens_proposed"]),
            "kv": np.asarray(it["decode_kv_tokens"]),
            "first_it": np.searchsorted(gend, np.asarray(req["first_token_s"]) - 1e-9),
            "last_it": np.searchsorted(gend, np.asarray(req["finish_s"]) - 1e-9),
            "out": np.asarray(req["output_len"])}


def kind_tables(runs: list[tuple[dict, dict, int]], heading: str = "## Where the error is: iterations by kind",
                explain: bool = True) -> list[str]:
    """The per-kind error tables: ``runs`` holds (speculative run, its call's plain run,
    batch) data (`_run_data`); ``explain``: also what pricing each kind exactly would leave."""
    import numpy as np

    batches = sorted({b for _, _, b in runs})
    lines = [heading + "\n",
             "Summed duration of each kind of iteration, the simulator against the GPU (the same iterations: the "
             "replay schedules the same requests and accepts the same drafts), pooled over the runs of a batch; in "
             "brackets the kind's share of those runs' GPU time and its error as a share of it (sim - GPU over the "
             "runs' total GPU time).\n",
             "| kind | " + " | ".join(f"batch {b}" for b in batches) + " |", "|---|" + "---|" * len(batches)]
    groups = [("speculative runs: " + k, k, False) for k in KINDS] + \
             [("plain runs: decode-only", KINDS[4], True), ("plain runs: prompt-only", KINDS[0], True)]
    for label, kind, of_plain in groups:
        cells = []
        for b in batches:
            if of_plain:  # each call's plain run once
                rs = list({id(p): p for _, p, bb in runs if bb == b}.values())
            else:
                rs = [s for s, _, bb in runs if bb == b]
            G = sum(float(r["gpu"].sum()) for r in rs)
            m = [r["kind"] == kind for r in rs]
            g = sum(float(r["gpu"][k].sum()) for r, k in zip(rs, m))
            s = sum(float(r["sim"][k].sum()) for r, k in zip(rs, m))
            n = sum(int(k.sum()) for k in m)
            cells.append("-" if not n else f"{100 * (s / g - 1):+.1f}% ({n}; {100 * g / G:.0f}% of the time, "
                                           f"{100 * (s - g) / G:+.1f}%)")
        if any(c != "-" for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if not explain:
        return lines
    lines += ["", "What each kind explains: the speedups' mean |sim/GPU - 1| and how many of them are within 5% if "
              "the simulator priced that kind's iterations exactly as the GPU ran them (their GPU durations put in "
              "place of the simulated ones; TPOT p50 and throughput recomputed from the iterations' durations: "
              "the first row, nothing replaced, reproduces the table above to ~0.3%).\n",
              "| priced exactly | mean abs diff | within 5% | batch 1 | batch 8 | batch 32 |",
              "|---|---|---|---|---|---|"]
    options = [("nothing", set()), ("plain runs: decode-only steps", {"plain:" + KINDS[4]}),
               ("prompt-only steps (both runs)", {KINDS[0], "plain:" + KINDS[0]})] + \
        [("speculative runs: " + k, {k}) for k in KINDS[1:]] + \
        [("plain decode-only + drafting beside context chunks", {"plain:" + KINDS[4], KINDS[3]}),
         ("all but the decode-only drafting steps",
          {"plain:" + KINDS[4], "plain:" + KINDS[0], KINDS[0], KINDS[3], KINDS[4]})]
    for label, exact in options:
        spec_exact = {k for k in exact if not k.startswith("plain:")}
        plain_exact = {k[6:] for k in exact if k.startswith("plain:")}
        per_b: dict[int, list[float]] = {}
        diffs = []
        for s, p, b in runs:
            d = _speedup_diffs_split(s, p, spec_exact, plain_exact)
            diffs += d
            per_b.setdefault(b, []).extend(d)
        if not diffs:
            continue
        cells = [f"{100 * np.mean(np.abs(per_b[b])):.1f}%" if b in per_b else "-" for b in (1, 8, 32)]
        lines.append(f"| {label} | {100 * np.mean(np.abs(diffs)):.1f}% | {sum(abs(x) <= 0.05 for x in diffs)} of "
                     f"{len(diffs)} | " + " | ".join(cells) + " |")
    return lines


def _speedup_diffs_split(spec: dict, plain: dict, spec_exact: set[str], plain_exact: set[str]) -> list[float]:
    import numpy as np

    def dur(r, exact):
        return np.where(np.isin(r["kind"], list(exact)), r["gpu"], r["sim"])

    (gps, gpt), (gss, gst) = _metrics(plain, plain["gpu"]), _metrics(spec, spec["gpu"])
    (sps, spt), (sss, sst) = _metrics(plain, dur(plain, plain_exact)), _metrics(spec, dur(spec, spec_exact))
    return [(sps / sss) / (gps / gss) - 1, (sst / spt) / (gst / gpt) - 1]


def replay_calls(tarballs: list[Path], profile: str | None, draft_profile: str | None, tmp: Path) -> dict:
    """Every run of the calls' tarballs replayed on the simulator: the speculative rows (each
    with its call's index), the plain runs by (call, batch), the drafting steps' median
    errors and the per-iteration data by (call, run name)."""
    rows, plain, steps_err, data = [], {}, {}, {}
    for i, tb in enumerate(tarballs):
        with tarfile.open(tb) as tf:
            tf.extractall(tmp / str(i), filter="data")
        for run in sorted((tmp / str(i) / "runs").iterdir()):
            cfg = yaml.safe_load((run / "config.yaml").read_text())["config"]
            gpu = json.loads((run / "summary.json").read_text())
            res = sim_replay(cfg, run, profile, draft_profile)
            sim = res["summary"]
            batch = cfg["scheduler"]["max_batch_size"]
            if cfg.get("speculative"):
                steps_err[(i, run.name)] = _step_error(run, res["iterations"], batch)
            data[(i, run.name)] = _run_data(run, res["iterations"], batch, bool(cfg.get("speculative")))
            rec = {"name": run.name, "batch": batch, "spec": cfg.get("speculative"), "call": i,
                   "gpu_tpot": gpu["tpot_s"]["p50"], "sim_tpot": sim["tpot_s"]["p50"],
                   "gpu_tok": gpu["throughput_out_tok_s"], "sim_tok": sim["throughput_out_tok_s"]}
            if not rec["spec"]:
                plain[(i, batch)] = rec
            else:
                rows.append(rec)
    return {"tarballs": tarballs, "rows": rows, "plain": plain, "steps": steps_err, "data": data}


def _speedups(rep: dict):
    """Each speculative run with its call's plain run at its batch: (run, plain, GPU TPOT
    speedup, sim TPOT speedup, GPU throughput speedup, sim throughput speedup)."""
    for r in rep["rows"]:
        p = rep["plain"].get((r["call"], r["batch"]))
        if p is not None:
            yield (r, p, p["gpu_tpot"] / r["gpu_tpot"], p["sim_tpot"] / r["sim_tpot"],
                   r["gpu_tok"] / p["gpu_tok"], r["sim_tok"] / p["sim_tok"])


def speedup_table(rep: dict) -> tuple[list[str], list[float]]:
    """The speedups' table (each speculative run against the plain run of its own call and
    batch: GPUs of two calls differ by up to 8%) and its sim/GPU - 1 differences."""
    lines = ["| run | batch | GPU TPOT ms plain -> spec | sim TPOT ms plain -> spec | GPU TPOT speedup | sim | diff | "
             "GPU tput speedup | sim | diff |", "|---|---|---|---|---|---|---|---|---|---|"]
    diffs = []
    several = len(rep["tarballs"]) > 1
    for r, p, gt, st, gr, sr in _speedups(rep):
        diffs += [st / gt - 1, sr / gr - 1]
        name = f"{_call_name(rep, r['call'])}: {r['name']}" if several else r["name"]
        lines.append(f"| {name} | {r['batch']} | {1e3 * p['gpu_tpot']:.2f} -> {1e3 * r['gpu_tpot']:.2f} | "
                     f"{1e3 * p['sim_tpot']:.2f} -> {1e3 * r['sim_tpot']:.2f} | {gt:.2f}x | {st:.2f}x | "
                     f"{100 * (st / gt - 1):+.1f}% | {gr:.2f}x | {sr:.2f}x | {100 * (sr / gr - 1):+.1f}% |")
    return lines, diffs


def gpu_speedups(csv: Path) -> dict[str, tuple[float, float]]:
    """A call's GPU speedups by case (its gpu_spec_decoding.csv): (TPOT, throughput), each
    against the plain run of the same batch in the same call."""
    import pandas as pd

    t = pd.read_csv(csv)
    plain = {int(r.batch): r for r in t.itertuples() if r.proposer == "plain"}
    return {r.case: (plain[int(r.batch)].gpu_tpot_p50_s / r.gpu_tpot_p50_s, r.gpu_tok_s / plain[int(r.batch)].gpu_tok_s)
            for r in t.itertuples() if r.proposer != "plain" and int(r.batch) in plain}


def gpu_spread(labelled: list[str]) -> list[str]:
    """The GPU's own spread: the same cases' speedups in two GPU calls (``LABEL=CSV``; calls
    of one label ran on one host), pair by pair, as |a/b - 1| of each TPOT and throughput
    speedup: the floor under any simulator-to-GPU difference."""
    calls = []
    for item in labelled:
        label, _, path = item.rpartition("=")
        if not label:
            raise SystemExit(f"--gpu-spread: {item!r} is not LABEL=CSV")
        calls.append((label, Path(path).stem, gpu_speedups(Path(path))))
    lines = ["## The GPU's own spread\n",
             "The same cases (same acceptances: the drafts' outcomes are controlled) measured in different device "
             "calls, each speedup against its own call's plain run: |a/b - 1| over the TPOT and throughput speedups "
             "of the cases both calls ran. Calls with the same label ran on one host (one device session). A "
             "simulator can be no closer to one GPU run than another run of the same GPU is.\n",
             "| call a (host) | call b (host) | same host | cases | mean abs diff | within 5% |", "|---|---|---|---|---|---|"]
    same, other = [], []
    for (la, na, a), (lb, nb, b) in itertools.combinations(calls, 2):
        common = sorted(set(a) & set(b))
        d = [abs(a[c][i] / b[c][i] - 1) for c in common for i in (0, 1)]
        if not d:
            continue
        (same if la == lb else other).extend(d)
        lines.append(f"| {na} ({la}) | {nb} ({lb}) | {'yes' if la == lb else 'no'} | {len(common)} | "
                     f"{100 * sum(d) / len(d):.1f}% | {sum(x <= 0.05 for x in d)} of {len(d)} |")
    for what, d in (("same host", same), ("different hosts", other)):
        if d:
            lines.append(f"\nPairs on {what}: mean abs diff {100 * sum(d) / len(d):.1f}%, "
                         f"{sum(x <= 0.05 for x in d)} of {len(d)} within 5%.")
    return lines


def _call_name(rep: dict, i: int) -> str:
    return rep["tarballs"][i].name.split("_runs")[0]


def _per_call_line(rep: dict) -> str:
    """_mean_line call by call (the calls of a table may have run on different hosts)."""
    by: dict[int, list[float]] = {}
    for r, _, gt, st, gr, sr in _speedups(rep):
        by.setdefault(r["call"], []).extend([st / gt - 1, sr / gr - 1])
    return "By call: " + "; ".join(
        f"{_call_name(rep, i)} {100 * sum(map(abs, d)) / len(d):.1f}% ({sum(abs(x) <= 0.05 for x in d)} of {len(d)} "
        "within 5%)" for i, d in sorted(by.items())) + "."


def _mean_line(diffs: list[float]) -> str:
    within = sum(abs(d) <= 0.05 for d in diffs)
    return (f"Mean |sim/GPU - 1| of the speedups: {100 * sum(map(abs, diffs)) / len(diffs):.1f}%; "
            f"{within} of {len(diffs)} within 5%.")


def _kind_runs(rep: dict) -> list[tuple[dict, dict, int]]:
    d, plain = rep["data"], rep["plain"]
    return [(d[(r["call"], r["name"])], d[(r["call"], plain[(r["call"], r["batch"])]["name"])], r["batch"])
            for r in rep["rows"] if (r["call"], r["batch"]) in plain]


def factor_table(rep: dict) -> list[str]:
    """Each speculative run's speedup errors factored into the two runs' own errors: a TPOT
    speedup's sim/GPU - 1 is (sim/GPU of plain TPOT) / (sim/GPU of speculative TPOT) - 1, a
    throughput speedup's (sim/GPU of speculative tok/s) / (sim/GPU of plain tok/s) - 1; and
    what each would be if the plain run's decode-only steps, the drafting iterations beside
    context chunks, or both were priced as the GPU ran them (`_speedup_diffs_split`)."""
    lines = ["## Each speedup's error, factored\n",
             "A speedup's error is the plain run's error over the speculative run's: TPOT speedup sim/GPU = (plain "
             "TPOT sim/GPU) / (speculative TPOT sim/GPU), throughput speedup sim/GPU = (speculative tok/s sim/GPU) / "
             "(plain tok/s sim/GPU). Then each speedup's error (TPOT / throughput) with the plain run's decode-only "
             "steps, the drafting iterations beside context chunks, or both, priced exactly as the GPU ran them "
             "(TPOT p50 and throughput recomputed from the iterations' durations, as above). `miss`: a speedup off "
             "by more than 5%.\n",
             "| run | batch | plain TPOT sim/GPU | spec TPOT sim/GPU | TPOT speedup diff | plain tok/s sim/GPU | "
             "spec tok/s sim/GPU | tput speedup diff | plain decode exact | beside chunks exact | both exact |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    several = len(rep["tarballs"]) > 1
    for r in rep["rows"]:
        p = rep["plain"].get((r["call"], r["batch"]))
        if p is None:
            continue
        pt, st = p["sim_tpot"] / p["gpu_tpot"], r["sim_tpot"] / r["gpu_tpot"]
        pk, sk = p["sim_tok"] / p["gpu_tok"], r["sim_tok"] / r["gpu_tok"]
        dt, dk = pt / st - 1, sk / pk - 1
        s, pl = rep["data"][(r["call"], r["name"])], rep["data"][(r["call"], p["name"])]
        exact = [_speedup_diffs_split(s, pl, a, b) for a, b in
                 ((set(), {KINDS[4]}), ({KINDS[3]}, set()), ({KINDS[3]}, {KINDS[4]}))]
        name = f"{_call_name(rep, r['call'])}: {r['name']}" if several else r["name"]
        miss = " (miss)" if max(abs(dt), abs(dk)) > 0.05 else ""
        lines.append(f"| {name}{miss} | {r['batch']} | {100 * (pt - 1):+.1f}% | {100 * (st - 1):+.1f}% | "
                     f"{100 * dt:+.1f}% | {100 * (pk - 1):+.1f}% | {100 * (sk - 1):+.1f}% | {100 * dk:+.1f}% | "
                     + " | ".join(f"{100 * a:+.1f}% / {100 * b:+.1f}%" for a, b in exact) + " |")
    return lines + [""]


def eager_spread(rep: dict, heading: str = "## The eager iterations: one shape, the GPU's spread") -> list[str]:
    """The eager iterations (those with context chunks) of one shape -- batch, kind, number of
    context chunks (each a 256-token prompt) -- pooled over every run of the calls but each
    run's first iteration (the cold start): the GPU's shortest, median and longest duration
    beside the simulator's median price. The simulator prices the same shape the same; the
    GPU's spread is its host's launch speed (an eager pass is launch-bound)."""
    import numpy as np

    groups: dict[tuple[int, str, int], list[tuple[float, float]]] = {}
    for d in rep["data"].values():
        for g, s, kind, c in list(zip(d["gpu"], d["sim"], d["kind"], d["n_ctx"]))[1:]:
            if c:
                label = ("speculative runs: " if d["spec"] else "plain runs: ") + str(kind)
                groups.setdefault((d["batch"], label, int(c)), []).append((float(g), float(s)))
    lines = [heading + "\n",
             "Iterations with context chunks run eagerly on the GPU (no CUDA graph: piecewise graphs are off in these "
             "runs), so their duration is mostly the host's launch work. Pooled over every run (each run's first "
             "iteration left out), by batch, kind and number of context chunks (each a 256-token prompt), at least "
             "3 iterations: the GPU's shortest, median and longest duration beside the simulator's median price of "
             "the same iterations (which differ only in their KV lengths).\n",
             "| batch | kind | context chunks | iterations | GPU ms min / median / max | sim ms (median) | "
             "sim / GPU median |", "|---|---|---|---|---|---|---|"]
    for (b, kind, c), v in sorted(groups.items()):
        if len(v) < 3:
            continue
        g, s = np.array(v).T
        lines.append(f"| {b} | {kind} | {c} | {len(v)} | {1e3 * g.min():.1f} / {1e3 * np.median(g):.1f} / "
                     f"{1e3 * g.max():.1f} | {1e3 * np.median(s):.1f} | {np.median(s) / np.median(g):.2f} |")
    return lines + [""]


def step_decomposition(rep: dict) -> list[str]:
    """The decode-only drafting step at the full batch split as ``A + k * D`` on each side:
    per batch, the median step of the k = 2 and k = 4 runs (averaged over the acceptances),
    the slope per extra draft step D (the drafter's step plus the verification's growth by
    b tokens) and the k-independent part A (the verification, the host's work); beside it the
    GPU runs' median host preparation per step (``host_prep_s``: pure host work, so the runs'
    host speed), and at batch 1 D within the k = 4 runs (`_within_run_slope`)."""
    import numpy as np

    med: dict[tuple[int, int], list[tuple[float, float, float]]] = {}
    within: dict[int, list[tuple[float, float]]] = {}
    for r in rep["rows"]:
        d = rep["data"][(r["call"], r["name"])]
        m = d["kind"] == KINDS[1]
        if m.any():
            k = r["spec"]["max_draft_len"]
            med.setdefault((r["batch"], k), []).append(
                (float(np.median(d["gpu"][m])), float(np.median(d["sim"][m])), float(np.median(d["prep"][m]))))
            if r["batch"] == 1 and k == 4:
                w = _within_run_slope(d, m)
                if w is not None:
                    within.setdefault(1, []).append(w)
    lines = ["## The drafting step, split by draft length\n",
             "Decode-only drafting iterations at the full batch, median ms (mean over the acceptances) at k = 2 and "
             "k = 4, split as A + k x D: D the cost of one more draft step (the drafter's decode step plus the "
             "verification's growth by a token per request), A the rest (the verification, the host's work). GPU "
             "prep: the GPU runs' median host preparation of those steps (pure host work: the runs' host speed). "
             "D within runs: at batch 1 the k = 4 runs also draft 1-3 tokens near each request's end, so the slope "
             "of their own steps' durations over the draft length (least squares, with the KV length) is D at one "
             "host speed.\n",
             "| batch | GPU k=2 -> k=4 | GPU D | GPU A | GPU prep ms k=2 -> k=4 | sim k=2 -> k=4 | sim D | sim A | "
             "D within the k=4 runs, GPU / sim |", "|---|---|---|---|---|---|---|---|---|"]
    for b in sorted({b for b, _ in med}):
        if (b, 2) not in med or (b, 4) not in med:
            continue
        (g2, s2, p2), (g4, s4, p4) = (np.mean(med[(b, k)], axis=0) for k in (2, 4))
        gd, sd = (g4 - g2) / 2, (s4 - s2) / 2
        w = (f"{1e3 * np.mean([x for x, _ in within[b]]):.2f} / {1e3 * np.mean([y for _, y in within[b]]):.2f}"
             if b in within else "-")
        lines.append(f"| {b} | {1e3 * g2:.2f} -> {1e3 * g4:.2f} | {1e3 * gd:.2f} | {1e3 * (g2 - 2 * gd):.2f} | "
                     f"{1e3 * p2:.2f} -> {1e3 * p4:.2f} | {1e3 * s2:.2f} -> {1e3 * s4:.2f} | {1e3 * sd:.2f} | "
                     f"{1e3 * (s2 - 2 * sd):.2f} | {w} |")
    return lines + [""]


def _within_run_slope(d: dict, m) -> tuple[float, float] | None:
    """(GPU, sim) seconds per draft of a batch-1 run's selected steps ``m``: the least-squares
    slope of duration over the step's drafts, with the KV length as a second regressor
    (None: fewer than two draft lengths)."""
    import numpy as np

    x = d["drafts"][m].astype(float)
    if len(np.unique(x)) < 2:
        return None
    X = np.column_stack([x, np.ones(len(x)), d["kv"][m] / 1e4])
    return tuple(float(np.linalg.lstsq(X, d[k][m], rcond=None)[0][0]) for k in ("gpu", "sim"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tarballs", nargs="+", type=Path, help="the calls of the main table (the machine the "
                    "profiles were calibrated on)")
    ap.add_argument("--profile", help="the target's calibration profile (default: the runs' own cost model, "
                    "the roofline)")
    ap.add_argument("--draft-profile", help="the drafter's calibration profile")
    ap.add_argument("--cross-machine", nargs="+", type=Path, default=[], metavar="TARBALL",
                    help="calls of other machines, tabled apart (the profiles were not fitted there)")
    ap.add_argument("--gpu-spread", nargs="+", default=[], metavar="LABEL=CSV",
                    help="GPU calls' gpu_spec_decoding.csv tables, LABEL naming the host: the GPU's own spread of "
                    "the same cases' speedups, call against call")
    add_write_results(ap)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rep = replay_calls(args.tarballs, args.profile, args.draft_profile, Path(tmp) / "main")
        cross = (replay_calls(args.cross_machine, args.profile, args.draft_profile, Path(tmp) / "cross")
                 if args.cross_machine else None)
    cmd = (f"python benchmarks/spec_replay.py {' '.join(str(t) for t in args.tarballs)} --profile {args.profile} "
           f"--draft-profile {args.draft_profile}"
           + (f" --cross-machine {' '.join(str(t) for t in args.cross_machine)}" if args.cross_machine else "")
           + (f" --gpu-spread {' '.join(args.gpu_spread)}" if args.gpu_spread else ""))
    lines = ["# Speculative decoding: GPU against the calibrated simulator\n",
             f"Command: `{cmd}`. The GPU runs of benchmarks/gpu_spec_decoding.py "
             "(one H200; Llama-3.1-8B target, Llama-3.2-1B drafter, controlled acceptance) replayed on the simulator "
             "with the H200 calibration profiles of both models (fitted to the designed grid of another device "
             "call, never to these runs). Speedup = plain / speculative TPOT p50 and speculative / plain tok/s, each "
             "against plain decoding at the same batch in the same call.\n",
             "The simulator prices a drafting iteration as the GPU backend runs it (sim/speculation.py): the "
             "drafter's k decode steps through its own CUDA graphs (also beside context chunks), each costing its "
             "GPU time; the verification as a context pass of 1 + k tokens per request over its KV, every position "
             "sampled, through the verification's piecewise graphs (decode-only iterations) or eagerly (with context "
             "chunks); the verification's host launch overlapping the drafter's GPU work, the serial part of its "
             "piecewise graphs (the launch the calibration finds unhidden even on a GPU-bound pass) following that "
             "work (verify_segment).\n"]
    table, diffs = speedup_table(rep)
    lines += table + [f"\n{_mean_line(diffs)}\n"]
    steps = sorted(rep["steps"].items())
    several = len(args.tarballs) > 1
    lines.append("Drafting iterations, median duration (the simulator against the GPU): decode-only at the full "
                 "batch / beside context chunks: " + "; ".join(
                     f"{(_call_name(rep, i) + ': ') if several else ''}{n}: {100 * d:+.1f}% / "
                     + ("-" if m is None else f"{100 * m:+.1f}%") for (i, n), (d, m) in steps) + ".\n")
    plain_err = [f"{args.tarballs[i].name} batch {b}: TPOT {100 * (p['sim_tpot'] / p['gpu_tpot'] - 1):+.1f}%"
                 for (i, b), p in sorted(rep["plain"].items())]
    lines.append(f"Plain decoding, absolute (the {'calibrated ' if args.profile else ''}simulator against the GPU): "
                 + "; ".join(plain_err) + ".\n")
    lines += factor_table(rep)
    lines += step_decomposition(rep)
    lines += kind_tables(_kind_runs(rep))
    lines += ["", *eager_spread(rep)]
    if cross is not None:
        names = ", ".join(t.name for t in args.cross_machine)
        ctable, cdiffs = speedup_table(cross)
        lines += ["", f"## Another machine: {names}\n",
                  "The same benchmark on another H200 (other device calls; the profiles were not fitted there), "
                  "replayed with the same profiles: what the pricing gives on a machine it was not calibrated "
                  "on.\n", *ctable, f"\n{_mean_line(cdiffs)} {_per_call_line(cross)}\n"]
        lines += kind_tables(_kind_runs(cross), "### Its iterations by kind", explain=False)
        lines += ["", *eager_spread(cross, "### Its eager iterations")]
    if args.gpu_spread:
        lines += ["", *gpu_spread(args.gpu_spread)]
    text = "\n".join(lines) + "\n"
    out = STORE.out_dir(args.write_results) / "spec_replay.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
