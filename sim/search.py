"""`sim search SEARCH.yaml`: the cheapest configuration that meets latency SLOs at a rate.

A search file names a base experiment (its workload, model, scheduler...), the target
request rate, the SLOs and the space to search: any settings as dotted keys, crossed
(``space``), times a list of parallel layouts (``layouts``, each a set of keys changed
together, so ``cluster.pipeline_parallel`` or ``cluster.expert_parallel`` join as soon as
the config has them), times the replica count 1..``max_replicas``::

    name: azure_conv_llama8b
    base: ../ifb_vs_static.yaml
    variant: online-ifb-guaranteed
    set: {workload.rate_scale: 1.0}
    target_rate_req_s: 20
    slo: {ttft_p90_s: 2.0, tpot_p99_s: 0.05}
    space:
      hardware: [a100-80gb-sxm, h100-sxm, h200-sxm]
      model_precision: [bf16, fp8]
      scheduler.max_batch_size: [64, 256]
    layouts:
      - {cluster.tensor_parallel: 1}
      - {cluster.tensor_parallel: 2}
    max_replicas: 16
    prices: {a100-80gb-sxm: 1.5, h100-sxm: 2.5, h200-sxm: 3.25}   # $ per GPU-hour
    prices_source: user-set defaults

How it searches:

1. **Physics first** (`sim bounds`): each *shape* (a point of space x layouts) is resolved as
   `sim run` resolves it -- the weights and the KV pool must fit the GPU's memory and the
   hardware must run the precision -- then pruned without simulating when no replica count
   can meet the SLOs: the *TPOT floor* (every decode step reads the weights once: weight
   bytes per GPU over the datasheet bandwidth) above the TPOT SLO, or the *TTFT floor* (the
   p90 prompt's prefill alone at the datasheet peaks) above the TTFT SLO. The *throughput
   floor* sets the fewest replicas worth simulating: the target rate x the mean output
   length over one replica's whole-request output tokens/s bound (`sim bounds`' e2e bound
   at the largest batch that fits).
2. **Cheapest first**: candidates (shape, replicas) are simulated in order of $/hour (GPUs x
   the hardware's price), in waves (one candidate per shape a wave, as many as there are
   workers), until every candidate cheaper than the cheapest one meeting the SLOs has been
   simulated (and, with ``frontier_cost_factor`` F > 1, every one up to F x its cost, to draw
   the frontier beyond the answer). The choice is therefore the cheapest configuration of the space that meets
   the SLOs in simulation (ties: the lower p90 TTFT); nothing cheaper was skipped except by
   the physics above. The choice does not depend on how many workers there are; the table
   may hold a few more simulated candidates with more (a wave is as wide as the workers).
3. A candidate *meets the SLOs* when its p90 TTFT and p99 TPOT are within them, no request
   was rejected, and its request throughput is at least 90% of the offered rate.

Outputs (``OUT``, default ``runs/search/<name>/``): ``search.parquet`` (every candidate: its
settings, GPUs, $/hour, status -- simulated, pruned (why), or not needed -- its metrics,
``meets_slo`` and ``frontier``: the simulated candidates no cheaper-or-equal candidate
beats on p90 TTFT), ``frontier.png``, ``choice.json`` (the settings and the `sim run`
command that runs the choice alone) and ``points/`` (finished simulations, reused when the
search runs again: it resumes).
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import PathStr
from .sweep import Task, gpus_of, load_base, read_point, read_study_file, run_tasks, set_pairs, write_point
from .types import ConfigError

THROUGHPUT_RATIO = 0.9  # a candidate keeps up when it serves >= this share of the offered rate


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Slo(_Strict):
    ttft_p90_s: float = Field(gt=0, description="p90 time to first token, seconds")
    tpot_p99_s: float = Field(gt=0, description="p99 time per output token, seconds")


class SearchFile(_Strict):
    name: str = Field(min_length=1)
    description: str = ""
    base: PathStr = Field(description="the experiment file, relative to the search file")
    variant: str | None = None
    set: dict[str, Any] = Field(default_factory=dict, description="dotted key -> value for every candidate")
    target_rate_req_s: float = Field(gt=0, description="the request rate to serve (sets workload.target_rate_req_s)")
    slo: Slo
    space: dict[str, list[Any]] = Field(default_factory=dict, description="dotted key -> values, crossed")
    layouts: list[dict[str, Any]] = Field(default_factory=lambda: [{}], min_length=1,
                                          description="parallel layouts: each a set of dotted keys")
    max_replicas: int = Field(8, gt=0, le=1024)
    prices: dict[str, float] = Field(min_length=1, description="$ per GPU-hour by hardware name")
    prices_source: str = Field("user-set defaults", description="where the prices come from")
    frontier_cost_factor: float = Field(1.0, ge=1, le=100, description="also simulate candidates up to this "
                                        "x the choice's $/hour, to draw the frontier beyond the answer (1: stop at it)")
    max_rejected_share: float = Field(0.0, ge=0, le=1, description="share of requests a candidate may reject "
                                      "(a prompt that never fits) and still meet the SLOs")

    @model_validator(mode="after")
    def _check(self):
        empty = [k for k, v in self.space.items() if not v]
        if empty:
            raise ValueError(f"space.{empty[0]}: an empty list of values")
        bad = [k for k, v in self.prices.items() if not v > 0]
        if bad:
            raise ValueError(f"prices.{bad[0]}: a price must be positive")
        for k in ("cluster.replicas", "workload.target_rate_req_s"):
            if k in self.space or k in self.set or any(k in lay for lay in self.layouts):
                raise ValueError(f"{k} is set by the search itself (max_replicas, target_rate_req_s)")
        return self


@dataclass
class Shape:
    index: int
    settings: dict[str, Any]
    label: str
    hardware: str = ""
    gpus_per_replica: int = 1
    price: float = 0.0
    min_replicas: int = 1
    pruned: str = ""  # why no replica count is simulated
    floors: dict = field(default_factory=dict)


@dataclass
class Search:
    path: Path
    spec: SearchFile
    base: Path
    experiment: str
    variant: str
    fixed: list[str]
    shapes: list[Shape]
    workload_stats: dict


def _label(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in settings.items())


def load_search(path: str | Path, overrides: list[str] | None = None) -> Search:
    """Read the search file, resolve each shape and prune it by physics (module doc)."""
    from .config import load_experiment

    path = Path(path)
    where = str(path)
    spec, base = read_study_file(path, SearchFile, "search file", "name, base, target_rate_req_s, slo, prices")
    fixed = set_pairs(spec.set) + list(overrides or []) + [f"workload.target_rate_req_s={spec.target_rate_req_s}"]
    exp = load_base(base, fixed, where)
    names = [v.name for v in exp.variants]
    if spec.variant is not None and spec.variant not in names:
        raise ConfigError(f"no variant {spec.variant!r} in {base} (variants: {', '.join(names)})", f"{where}: variant")
    vname = spec.variant or names[0]
    keys = list(spec.space)
    shapes, problems = [], []
    for combo in itertools.product(*spec.space.values()):
        for lay in spec.layouts:
            settings = {**dict(zip(keys, combo)), **lay}
            shapes.append(Shape(len(shapes), settings, _label(settings)))
    stats = None
    for sh in shapes:
        try:
            e = load_experiment(base, fixed + set_pairs(sh.settings))
        except ConfigError as err:
            problems.extend((f"{where}: space/layouts ({sh.label})", f"{loc}: {m}") for loc, m in err.problems)
            continue
        cfg = next(v for v in e.variants if v.name == vname).config
        sh.hardware = cfg.hardware
        if sh.hardware not in spec.prices:
            problems.append((f"{where}: prices", f"no price for hardware {sh.hardware!r} (candidate {sh.label})"))
            continue
        sh.price = spec.prices[sh.hardware]
        sh.gpus_per_replica = gpus_of({**cfg.model_dump(mode="json"), "cluster": {
            **cfg.cluster.model_dump(mode="json"), "replicas": 1}})
        stats = _prune(sh, cfg, base.parent, spec, stats)
    if problems:
        raise ConfigError(problems[:30])
    return Search(path, spec, base, exp.name, vname, fixed, shapes, stats or {})


def _workload_stats(workload) -> dict:
    import numpy as np

    p = workload["prompt_len"].to_numpy(dtype=float)
    o = workload["output_len"].to_numpy(dtype=float)
    return {"requests": len(p), "prompt_mean": float(p.mean()), "prompt_p90": float(np.percentile(p, 90)),
            "output_mean": float(o.mean())}


def _prune(sh: Shape, cfg, base_dir: Path, spec: SearchFile, stats: dict | None) -> dict | None:
    """Resolve the shape as `sim run` would and apply the floors (module doc); sets
    ``sh.pruned`` / ``sh.min_replicas``. Returns the workload's statistics."""
    from .bounds import Rates, compute_bounds, model_work
    from .runner import resolve

    try:
        setup = resolve(cfg, base_dir)
    except ConfigError as e:
        sh.pruned = "does not fit / not runnable: " + "; ".join(m for _, m in e.problems)
        return stats
    stats = stats or _workload_stats(setup.workload)
    model, hw = setup.model, setup.hardware
    tp = cfg.cluster.tensor_parallel
    w = model_work(model, tp)
    tpot_floor = w.weights_read / Rates.of(hw, w.matmul, True).bandwidth
    b1 = compute_bounds(model, hw, tp=tp, batch=1, prompt_len=max(int(stats["prompt_p90"]), 1),
                        output_len=max(int(stats["output_mean"]), 1), tokens_per_block=cfg.kv_cache.tokens_per_block,
                        free_gpu_memory_fraction=cfg.kv_cache.free_gpu_memory_fraction,
                        max_num_tokens=cfg.scheduler.max_num_tokens)
    per_req = -(-int(round(stats["prompt_mean"] + stats["output_mean"])) // cfg.kv_cache.tokens_per_block)
    batch = max(1, min(cfg.scheduler.max_batch_size, setup.num_blocks // max(per_req, 1)))
    bb = compute_bounds(model, hw, tp=tp, batch=batch, prompt_len=max(int(stats["prompt_mean"]), 1),
                        output_len=max(int(stats["output_mean"]), 1), tokens_per_block=cfg.kv_cache.tokens_per_block,
                        free_gpu_memory_fraction=cfg.kv_cache.free_gpu_memory_fraction,
                        max_num_tokens=cfg.scheduler.max_num_tokens)
    need = spec.target_rate_req_s * stats["output_mean"]
    # a pipeline of pp stages (tensor_parallel GPUs each) works on up to pp micro-batches at
    # once: at most pp x the bound of one stage group holding the whole model
    per_replica = bb.e2e_out_tok_s * getattr(cfg.cluster, "pipeline_parallel", 1)
    sh.floors = {"tpot_floor_s": tpot_floor, "ttft_floor_s": b1.ttft_s, "replica_out_tok_s_bound": per_replica,
                 "bound_batch": batch}
    sh.min_replicas = max(1, math.ceil(need / per_replica)) if per_replica > 0 else spec.max_replicas + 1
    if tpot_floor > spec.slo.tpot_p99_s:
        sh.pruned = (f"TPOT floor {tpot_floor * 1e3:.1f} ms (weights read per step at peak bandwidth) > SLO "
                     f"{spec.slo.tpot_p99_s * 1e3:g} ms")
    elif b1.ttft_s > spec.slo.ttft_p90_s:
        sh.pruned = f"TTFT floor {b1.ttft_s:.3f} s (p90 prompt's prefill at peak) > SLO {spec.slo.ttft_p90_s:g} s"
    elif sh.min_replicas > spec.max_replicas:
        sh.pruned = (f"throughput floor: {need:,.0f} out tok/s needs >= {sh.min_replicas} replicas of "
                     f"{per_replica:,.0f} tok/s (bound) > max_replicas {spec.max_replicas}")
    return stats


def misses(metrics: dict, spec: SearchFile) -> list[str]:
    """The SLO criteria a simulated candidate misses ([]: it meets them all)."""
    out = []
    ttft, tpot = metrics.get("ttft_s_p90"), metrics.get("tpot_s_p99")
    offered, tput = metrics.get("offered_rate_req_s"), metrics.get("throughput_req_s")
    if ttft is None or ttft > spec.slo.ttft_p90_s:
        out.append("p90 TTFT" if ttft is not None else "no request finished")
    if tpot is not None and tpot > spec.slo.tpot_p99_s:
        out.append("p99 TPOT")
    n, rej = metrics.get("num_requests") or 0, metrics.get("num_rejected") or 0
    if n and rej / n > spec.max_rejected_share:
        out.append(f"{rej} rejected")
    if offered and (tput is None or tput < THROUGHPUT_RATIO * offered):
        out.append("throughput below the offered rate")
    return out


def meets(metrics: dict, spec: SearchFile) -> bool:
    return not misses(metrics, spec)


def _candidate_config(search: Search, sh: Shape, replicas: int) -> dict:
    from .config import load_experiment

    e = load_experiment(search.base, search.fixed + set_pairs({**sh.settings, "cluster.replicas": replicas}))
    return next(v for v in e.variants if v.name == search.variant).config.model_dump(mode="json")


def run_search(search: Search, out: Path, *, jobs: int | None = None, ray_address: str | None = None,
               progress: bool = True) -> dict:
    """Simulate candidates cheapest first (module doc); write the outputs. Returns
    ``{"table", "choice", "simulated", "pruned", "wall_s", "waves"}``."""
    import os

    from . import rundir

    t0 = time.perf_counter()
    spec = search.spec
    (out / "points").mkdir(parents=True, exist_ok=True)
    width = jobs or (os.cpu_count() or 1)
    live = [sh for sh in search.shapes if not sh.pruned]
    next_r = {sh.index: sh.min_replicas for sh in live}
    results: dict[tuple[int, int], dict] = {}  # (shape, replicas) -> row
    best_cost = math.inf
    waves = 0
    ray_ctx = None
    if ray_address is not None:
        from .sweep import ray_init

        ray_ctx = ray_init(ray_address, jobs)  # one connection for every wave
        width = max(width, int(ray_ctx.cluster_resources().get("CPU", width)))

    def cost(sh: Shape, r: int) -> float:
        return r * sh.gpus_per_replica * sh.price

    try:
        while True:
            cands = sorted(((cost(sh, next_r[sh.index]), sh.index, sh) for sh in live
                            if next_r[sh.index] <= spec.max_replicas
                            and cost(sh, next_r[sh.index]) <= best_cost * spec.frontier_cost_factor),
                           key=lambda c: (c[0], c[1]))[:width]
            if not cands:
                break
            waves += 1
            tasks, meta = [], {}
            for c, _, sh in cands:
                r = next_r[sh.index]
                cfg = _candidate_config(search, sh, r)
                key = rundir.config_hash(cfg)
                meta[key] = (sh, r)
                stored = read_point(out, key)
                if stored is not None:
                    results[(sh.index, r)] = stored
                else:
                    tasks.append(Task(key, cfg, str(search.base.parent.resolve())))

            def done(task: Task, result: dict) -> None:
                sh, r = meta[task.key]
                write_point(out, task, {**sh.settings, "cluster.replicas": r}, result)
                results[(sh.index, r)] = result

            run_tasks(tasks, done, jobs=jobs, ray_module=ray_ctx)
            for c, _, sh in cands:
                r = next_r[sh.index]
                res = results[(sh.index, r)]
                if res.get("metrics") and meets(res["metrics"], spec):
                    best_cost = min(best_cost, c)
                    next_r[sh.index] = spec.max_replicas + 1  # more replicas only cost more
                else:
                    next_r[sh.index] = r + 1
            if progress:
                import sys

                found = f"cheapest meeting the SLOs so far ${best_cost:.2f}/h" if best_cost < math.inf else "none yet"
                print(f"sim search {spec.name}: wave {waves}: {len(results)} simulated ({len(tasks)} new), "
                      f"{found}, this wave up to ${cands[-1][0]:.2f}/h; wall {time.perf_counter() - t0:,.1f} s",
                      file=sys.stderr, flush=True)
    finally:
        if ray_ctx is not None:
            ray_ctx.shutdown()
    table, choice = search_table(search, results, best_cost)
    write_search(search, table, choice, out)
    return {"table": table, "choice": choice, "simulated": len(results),
            "below_floor": sum(min(sh.min_replicas, spec.max_replicas + 1) - 1 for sh in live),
            "pruned": sum(bool(sh.pruned) for sh in search.shapes), "wall_s": time.perf_counter() - t0,
            "waves": waves, "best_cost": best_cost}


def search_table(search: Search, results: dict, best_cost: float):
    """Every candidate a row; returns (table, the choice's row or None)."""
    import pyarrow as pa

    from .sweep import METRICS, _column

    spec = search.spec
    keys: list[str] = []
    for sh in search.shapes:
        keys.extend(k for k in sh.settings if k not in keys)
    rows = []
    for sh in search.shapes:
        simulated = sorted(r for (i, r) in results if i == sh.index)
        top = max(simulated, default=sh.min_replicas - 1)
        entries = [(r, "simulated") for r in simulated]
        if not sh.pruned and top < spec.max_replicas:
            entries.append((top + 1, "not needed"))  # the rest of the shape: costlier than needed
        if sh.pruned:
            entries = [(sh.min_replicas if "throughput" not in sh.pruned else spec.max_replicas, "pruned")]
        for r, status in entries:
            res = results.get((sh.index, r), {})
            m = res.get("metrics") or {}
            row = {"candidate": 0, "label": f"{sh.label}, replicas={r}", **{k: sh.settings.get(k) for k in keys},
                   "replicas": r, "gpus": r * sh.gpus_per_replica, "cost_per_hour": r * sh.gpus_per_replica * sh.price,
                   "status": status,
                   "why": sh.pruned if status == "pruned" else (res.get("error") or "" if status == "simulated" else
                                                                "costlier than the choice (x frontier_cost_factor): not simulated"),
                   "min_replicas": sh.min_replicas, **{k: sh.floors.get(k) for k in
                                                        ("tpot_floor_s", "ttft_floor_s", "replica_out_tok_s_bound")}}
            row.update({k: m.get(k) for k in (*METRICS, "offered_rate_req_s")})
            row["meets_slo"] = meets(m, spec) if m else None
            row["misses"] = ", ".join(misses(m, spec)) if m else ""
            rows.append(row)
    rows.sort(key=lambda r: (r["cost_per_hour"], {"simulated": 0, "not needed": 1, "pruned": 2}[r["status"]],
                             r["label"]))
    for i, r in enumerate(rows):
        r["candidate"] = i
    ok = [r for r in rows if r["meets_slo"]]
    choice = min(ok, key=lambda r: (r["cost_per_hour"], r["ttft_s_p90"]), default=None)
    # frontier: simulated candidates whose p90 TTFT no cheaper-or-equal simulated candidate beats
    best = math.inf
    for r in sorted([r for r in rows if r["status"] == "simulated" and r["ttft_s_p90"] is not None],
                    key=lambda r: (r["cost_per_hour"], r["ttft_s_p90"])):
        r["frontier"] = r["ttft_s_p90"] < best
        best = min(best, r["ttft_s_p90"])
    for r in rows:
        r.setdefault("frontier", None if r["status"] != "simulated" else False)
        r["choice"] = choice is not None and r["candidate"] == choice["candidate"]
    meta = {b"servesim.search": json.dumps({"name": spec.name, "slo": spec.slo.model_dump(),
                                             "target_rate_req_s": spec.target_rate_req_s,
                                             "prices": spec.prices, "prices_source": spec.prices_source}).encode()}
    table = pa.table({c: _column([r.get(c) for r in rows]) for c in rows[0]}).replace_schema_metadata(meta)
    return table, choice


def choice_settings(search: Search, choice: dict) -> dict[str, Any]:
    sh = next(s for s in search.shapes if f"{s.label}, replicas={choice['replicas']}" == choice["label"])
    return {**sh.settings, "cluster.replicas": choice["replicas"]}


def write_search(search: Search, table, choice: dict | None, out: Path) -> None:
    import os
    import shlex

    import pyarrow.parquet as pq

    from .plots_sweep import search_plot
    from .rundir import write_atomic

    tmp = out / ".search.partial.parquet"
    pq.write_table(table, tmp)
    os.replace(tmp, out / "search.parquet")
    doc: dict[str, Any] = {"name": search.spec.name, "slo": search.spec.slo.model_dump(),
                           "target_rate_req_s": search.spec.target_rate_req_s,
                           "prices_source": search.spec.prices_source, "choice": None}
    if choice is not None:
        settings = choice_settings(search, choice)
        sets = search.fixed + set_pairs(settings)
        cmd = ["sim", "run", os.path.normpath(search.base), "--only", search.variant] + [x for s in sets for x in ("--set", s)]
        doc["choice"] = {"settings": settings, "cost_per_hour": choice["cost_per_hour"], "gpus": choice["gpus"],
                         "metrics": {k: choice[k] for k in ("ttft_s_p90", "tpot_s_p99", "throughput_req_s",
                                                            "goodput_req_s", "e2e_s_p99")},
                         "set": sets, "command": shlex.join(cmd)}
    write_atomic(out / "choice.json", json.dumps(doc, indent=2) + "\n")
    search_plot(table.to_pandas(), out / "frontier.png",
                f"{search.spec.name}: {search.spec.target_rate_req_s:g} req/s, SLO p90 TTFT "
                f"{search.spec.slo.ttft_p90_s:g} s, p99 TPOT {search.spec.slo.tpot_p99_s * 1e3:g} ms",
                search.spec.slo.ttft_p90_s, None if choice is None else choice["candidate"])


def print_search(search: Search, res: dict, console, out: Path) -> None:
    from rich.table import Table

    df = res["table"].to_pandas()
    shown = df[(df.frontier == True) | (df.choice == True)]  # noqa: E712
    t = Table(title=f"sim search {search.spec.name}: frontier (cheapest for its p90 TTFT) -> {out}/search.parquet")
    for h in ("candidate", "GPUs", "$/h", "TTFT p90 s", "TPOT p99 ms", "req/s", "meets SLO", ""):
        t.add_column(h, justify="left" if h == "candidate" else "right")
    for _, r in shown.iterrows():
        t.add_row(r.label, str(r.gpus), f"{r.cost_per_hour:.2f}", f"{r.ttft_s_p90:.3f}",
                  "-" if r.tpot_s_p99 != r.tpot_s_p99 else f"{r.tpot_s_p99 * 1e3:.1f}", f"{r.throughput_req_s:.2f}",
                  "[green]yes[/]" if r.meets_slo else "no", "[bold yellow]choice[/]" if r.choice else "")
    console.print(t)
    pr = df[df.status == "pruned"]
    if len(pr):
        console.print(f"pruned by physics without simulating ({len(pr)} of {len(search.shapes)} shapes):")
        for _, r in pr.iterrows():
            console.print(f"  {r.label.rsplit(', replicas=', 1)[0]}: {r.why}", soft_wrap=True)
    c = res["choice"]
    console.print(f"the throughput floor skipped {res['below_floor']} (shape, replicas) candidates with too few "
                  "replicas to carry the rate")
    console.print(f"{res['simulated']} candidates simulated in {res['waves']} waves, wall {res['wall_s']:.1f} s; "
                  f"prices: {search.spec.prices_source}")
    if c is None:
        console.print("[bold red]no candidate meets the SLOs[/] (raise max_replicas or widen the space)")
        return
    console.print(f"[bold green]choice[/]: {c['label']}: {c['gpus']} GPU(s), ${c['cost_per_hour']:.2f}/h; p90 TTFT "
                  f"{c['ttft_s_p90']:.3f} s, p99 TPOT {c['tpot_s_p99'] * 1e3:.1f} ms, {c['throughput_req_s']:.2f} "
                  f"req/s; run it alone: see {out}/choice.json (command); plot: {out}/frontier.png", soft_wrap=True)


__all__ = ["SearchFile", "Search", "Shape", "load_search", "run_search", "meets", "search_table", "choice_settings"]
