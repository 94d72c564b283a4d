"""Clusters of replicas: each replica's own settings, the routers' view of a replica, and
per-replica summaries.

A run's ``cluster`` is either ``replicas: N`` (N identical replicas: the run's settings),
``groups: [{count, <settings>}, ...]`` (each group's settings deep-merged over the run's, so
a group may set its own hardware, tensor_parallel, batching limits, KV cache, ...), or a
disaggregated ``prefill`` / ``decode`` pair of pools (sim/disagg.py), each a group.

Each distinct group is resolved like a run (model, hardware, KV pool size, cost model),
so whatever a run's config can say about one replica, a group can say too.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
from pydantic import ValidationError

from .errors import _has_path
from .types import ConfigError, Request

_HINT = "check the spelling; `sim validate` lists the allowed keys in the README"


@dataclass
class ReplicaSetup:
    """One replica: its index, the pool it is in ("" co-located, "prefill", "decode"),
    its resolved Setup (sim/runner.py) and the config key it came from."""

    index: int
    pool: str
    setup: object  # runner.Setup
    key: str


@dataclass
class ClusterSetup:
    replicas: list[ReplicaSetup]
    disaggregated: bool = False
    link: object = None  # config LinkConfig (disaggregated)
    pools: dict[str, list[int]] = field(default_factory=dict)

    @property
    def num_gpus(self) -> int:
        return sum(r.setup.cfg.cluster.tensor_parallel * r.setup.cfg.cluster.pipeline_parallel for r in self.replicas)


def group_config(cfg, group, where: str, key: str):
    """The RunConfig of the replicas of `group` (a ReplicaGroup found at `key`): the run's
    settings with the group's deep-merged over them. Raises ConfigError located at the
    group's key when it set the value, at the run's key otherwise."""
    from .config import _CLUSTER_ONLY, RunConfig, deep_merge
    from .errors import format_key, located_errors, problem_message

    base = cfg.model_dump(mode="json")
    base["cluster"] = {k: v for k, v in base["cluster"].items() if k not in _CLUSTER_ONLY}
    over = group.overrides()
    merged = deep_merge(base, over)
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as err:
        probs = []
        for paths, e in located_errors(err, merged):
            mine = [p for p in paths if p and _has_path(over, p)]
            loc = format_key(mine[0], key) if mine else format_key(paths[0])
            probs.append((f"{where}{loc}", problem_message(e, _HINT)))
        raise ConfigError(probs) from None


def resolve_cluster(setup, base_dir: Path, where: str = "") -> ClusterSetup | None:
    """The cluster of a resolved run (None: `replicas: N` identical replicas, the run's own
    Setup for each). Raises ConfigError naming the key."""
    from .runner import _fit, resolve_speculation
    from .specs import load_hardware, load_model

    cfg = setup.cfg
    cl = cfg.cluster
    if not cl.groups and cl.disaggregation is None:
        return None
    if cl.disaggregation is not None:
        d = cl.disaggregation
        groups = [("prefill", d.prefill, "cluster.disaggregation.prefill"),
                  ("decode", d.decode, "cluster.disaggregation.decode")]
    else:
        groups = [("", g, f"cluster.groups[{i}]") for i, g in enumerate(cl.groups)]
    problems: list[tuple[str, str]] = []
    resolved = []
    for pool, g, key in groups:
        try:
            gcfg = group_config(cfg, g, where, key)
            model = load_model(gcfg.model, base_dir, location=f"{where}{key}.model" if g.model else f"{where}model")
            hw = load_hardware(gcfg.hardware, base_dir,
                               location=f"{where}{key}.hardware" if g.hardware else f"{where}hardware")
            gwhere = f"{where}{key}."  # its problems at its keys: cluster.groups[1].cluster.tensor_parallel
            model, blocks, roofline, power = _fit(gcfg, model, hw, base_dir, gwhere)
            spec = resolve_speculation(gcfg, model, hw, roofline, base_dir, gwhere)
            from servesim.policies.loading import load_run_policies

            pols = load_run_policies(gcfg, base_dir, gwhere)  # the group's own policies
        except ConfigError as e:
            problems.extend(e.problems)
            continue
        resolved.append((pool, g, key, replace(setup, cfg=gcfg, model=model, hardware=hw, num_blocks=blocks,
                                               roofline=roofline, profile_power=power, speculation=spec,
                                               policies=pols)))
    if problems:
        raise ConfigError(problems)
    _check_compatible(resolved, cfg, where, cl.disaggregation is not None)
    replicas: list[ReplicaSetup] = []
    pools: dict[str, list[int]] = {}
    for pool, g, key, s in resolved:
        for _ in range(g.count):
            pools.setdefault(pool, []).append(len(replicas))
            replicas.append(ReplicaSetup(len(replicas), pool, s, key))
    out = ClusterSetup(replicas, cl.disaggregation is not None,
                       cl.disaggregation.link if cl.disaggregation is not None else None, pools)
    check_pools_hold(out, setup.workload, where)
    return out


def _overrode(group, *path) -> bool:
    return _has_path(group.overrides(), path)


def _check_compatible(resolved, cfg, where: str, disagg: bool) -> None:
    """Replicas must agree on what requests carry (prefix keys at one block size); a
    disaggregated pair must agree on the KV layout it moves (model, KV dtype, block size),
    and the overlap scheduler is not modelled there."""
    def key_of(pool_g_key, *path):
        _, g, key, _ = pool_g_key
        return f"{where}{key}.{'.'.join(path)}" if _overrode(g, *path) else f"{where}{'.'.join(path)}"

    tpb = cfg.kv_cache.tokens_per_block
    for r in resolved:
        if r[3].cfg.kv_cache.tokens_per_block != tpb and not disagg:
            raise ConfigError(f"kv_cache.tokens_per_block {r[3].cfg.kv_cache.tokens_per_block} differs from the "
                              f"run's {tpb}: the replicas of a cluster share one block size (a request's "
                              "prefix keys are made at it)", key_of(r, "kv_cache", "tokens_per_block"))
    if not disagg:
        return
    pre, dec = resolved
    pm, dm = pre[3].model, dec[3].model
    probs = []
    if pm.name != dm.name:
        probs.append((key_of(dec, "model") if _overrode(dec[1], "model") else key_of(pre, "model"),
                      f"the prefill pool serves {pm.name}, the decode pool {dm.name}: a KV cache moves only "
                      "between replicas of the same model"))
    elif pm.kv_dtype != dm.kv_dtype:
        k = key_of(dec, "kv_cache", "dtype") if _overrode(dec[1], "kv_cache", "dtype") else key_of(pre, "kv_cache",
                                                                                                   "dtype")
        probs.append((k, f"KV dtype {pm.kv_dtype} in the prefill pool, {dm.kv_dtype} in the decode pool: the "
                      "pools must store the KV cache alike to move it"))
    pt, dt = pre[3].cfg.kv_cache.tokens_per_block, dec[3].cfg.kv_cache.tokens_per_block
    if pt != dt:
        k = key_of(dec, "kv_cache", "tokens_per_block") if _overrode(dec[1], "kv_cache", "tokens_per_block") \
            else key_of(pre, "kv_cache", "tokens_per_block")
        probs.append((k, f"KV blocks of {pt} tokens in the prefill pool, {dt} in the decode pool: the pools must "
                      "page the KV cache alike to move its blocks"))
    for r in resolved:
        if r[3].cfg.runtime.overlap_scheduler:
            probs.append((key_of(r, "runtime", "overlap_scheduler"),
                          "the overlap scheduler is not modelled with disaggregated serving"))
    if probs:
        raise ConfigError(probs)


def check_pools_hold(cluster: ClusterSetup, workload, where: str) -> None:
    """A pool that can hold none of the workload's requests is a configuration mistake."""
    if not cluster.disaggregated or not len(workload):
        return
    from .kv_cache import blocks_for

    # a request's KV when it emits its last token (policies/capacity.py final_kv_tokens)
    need = int((workload["prompt_len"] + workload["output_len"] - 1).min())
    for pool in ("prefill", "decode"):
        rs = [cluster.replicas[i] for i in cluster.pools[pool]]
        s = rs[0].setup
        tpb = s.cfg.kv_cache.tokens_per_block
        if blocks_for(need, tpb) > s.num_blocks:
            raise ConfigError(f"its replicas' KV pool holds {s.num_blocks * tpb:,} tokens; the smallest request of "
                              f"the workload needs {need:,}: the pool can hold no request", f"{where}{rs[0].key}")


# ---------------------------------------------------------------------------------------
class ReplicaHandle:
    """A router's read-only view of one engine (policies/routing.py ReplicaView), and the
    driver's way to hand it requests (`enqueue`), which keeps its outstanding tokens."""

    __slots__ = ("index", "_engine", "_total", "_seen", "_transfers")

    def __init__(self, engine, index: int):
        self.index = index
        self._engine = engine
        self._total = 0  # prompt + output tokens of the requests handed to it and not done
        self._seen = 0  # engine.done_tokens already subtracted
        self._transfers = False  # it was handed requests whose KV arrives with them

    def enqueue(self, req: Request) -> None:
        self._total += req.prompt_len + req.output_len
        self._transfers |= req.transfer_in
        self._engine.enqueue(req)

    def load(self) -> int:
        return self._engine.load()

    def outstanding_tokens(self) -> int:
        """Prompt tokens not yet prefilled plus output tokens not yet generated, of the
        requests waiting or running here (kept in O(1) a call but for the context phase's
        requests, and the waiting ones when some were paused or carry their KV)."""
        e = self._engine
        if self._seen != e.done_tokens:  # (a counter: a streamed run empties engine.done as it goes)
            self._total -= e.done_tokens - self._seen
            self._seen = e.done_tokens
        # requests in generation: prompt + tokens emitted = off + g, summed (engine aggregates)
        progress = e.off_sum + e.n_dec * e.g
        for r in e.context:
            progress += min(r.context_done, r.prompt_len) + r.generated
        if e.num_preemptions or self._transfers:
            for r in e.waiting:
                progress += r.generated + (r.prompt_len if r.transfer_in else 0)
        return max(self._total - progress, 0)

    def prefix_match_tokens(self, request: Request) -> int:
        cache = self._engine.cache
        keys = request.block_keys
        if cache is None or not keys:
            return 0
        tpb = self._engine.tpb
        n = len(cache.match(keys[:request.prompt_len // tpb], request.block_contents))
        return min(n * tpb, request.prompt_len)

    def can_ever_fit(self, request: Request) -> bool:
        return self._engine.never_fits(request) is None


def fit_signature(engine) -> tuple:
    """What decides whether a request can ever fit an engine (equal: fits one, fits all)."""
    c = engine.cfg
    return (c.max_positions, engine.kv.total, c.tokens_per_block, c.max_num_tokens, c.chunking.splits, c.overlap)


class Dispatch:
    """Routes requests over some replicas: only to those that can ever hold a request when
    some can and some cannot, so the router never sends one where it is rejected while
    another replica would serve it."""

    def __init__(self, handles: Sequence[ReplicaHandle], engines, router):
        self.handles = list(handles)
        self.router = router
        self.uniform = len({fit_signature(e) for e in engines}) <= 1

    def choose(self, req: Request) -> ReplicaHandle:
        hs = self.handles
        if len(hs) == 1:
            return hs[0]
        cands = hs
        if not self.uniform:
            fits = [h for h in hs if h.can_ever_fit(req)]
            if fits:
                cands = fits
        j = self.router.route(req, cands)
        if not isinstance(j, (int, np.integer)) or not 0 <= j < len(cands):
            raise RuntimeError(f"router {getattr(self.router, 'name', type(self.router).__name__)} returned "
                               f"{j!r} for request {req.request_id}: not an index into the {len(cands)} replicas")
        return cands[int(j)]

    def any_fits(self, req: Request) -> bool:
        return any(h.can_ever_fit(req) for h in self.handles)


# ---------------------------------------------------------------------------------------
def per_replica_summary(req: pa.Table, it: pa.Table, duration_s: float, pools: dict[int, str]) -> list[dict]:
    """One row per replica: its pool, requests, throughput, TTFT / TPOT p50 and p99, prefix
    hit rate and busy share. A decode replica's requests are those it generated for (their
    TTFT is the prefill pool's and the transfer's); a prefill replica's are those it ran
    the prompt of (TTFT and hit rate; TPOT belongs to the decode pool)."""
    from .metrics import request_latencies

    lat = request_latencies(req)
    fin = lat["fin_mask"]
    rep = req.column("replica").to_numpy()[fin]
    pre = (req.column("prefill_replica").to_numpy()[fin] if "prefill_replica" in req.column_names
           else np.full(fin.sum(), -1))
    out_len = req.column("output_len").to_numpy()[fin]
    prompt = req.column("prompt_len").to_numpy()[fin]
    cached = req.column("cached_tokens").to_numpy()[fin]
    it_rep = it.column("replica").to_numpy()
    it_dur = it.column("duration_s").to_numpy()
    rows = []

    def pct(x, q):
        x = x[np.isfinite(x)]
        return float(np.percentile(x, q)) if len(x) else None

    for r, pool in sorted(pools.items()):
        mine = (pre == r) if pool == "prefill" else (rep == r)
        n = int(mine.sum())
        tpot = lat["tpot_s"][mine] if pool != "prefill" else np.zeros(0)
        ttft = lat["ttft_s"][mine]
        rows.append({
            "replica": int(r), "pool": pool or "colocated", "requests": n,
            "throughput_req_s": n / duration_s if duration_s > 0 else 0.0,
            "throughput_out_tok_s": (float(out_len[mine].sum()) / duration_s if duration_s > 0 else 0.0)
            if pool != "prefill" else None,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "tpot_p50_s": pct(tpot, 50), "tpot_p99_s": pct(tpot, 99),
            "prefix_hit_rate": float(cached[mine].sum() / prompt[mine].sum()) if n and pool != "decode" else None,
            "busy": float(it_dur[it_rep == r].sum() / duration_s) if duration_s > 0 else 0.0,
        })
    return rows


def print_per_replica(rows: list[dict], title: str, console=None) -> None:
    from rich.table import Table

    def f(v, fmt):
        return "-" if v is None else fmt.format(v)

    t = Table(title=title)
    for head in ("replica", "pool", "requests", "req/s", "out tok/s", "TTFT p50 s", "TTFT p99 s", "TPOT p50 ms",
                 "TPOT p99 ms", "prefix hit", "busy"):
        t.add_column(head, justify="left" if head in ("replica", "pool") else "right")
    for r in rows:
        t.add_row(str(r["replica"]), r["pool"], str(r["requests"]), f(r["throughput_req_s"], "{:.2f}"),
                  f(r["throughput_out_tok_s"], "{:,.0f}"), f(r["ttft_p50_s"], "{:.3f}"), f(r["ttft_p99_s"], "{:.2f}"),
                  f(None if r["tpot_p50_s"] is None else r["tpot_p50_s"] * 1e3, "{:.1f}"),
                  f(None if r["tpot_p99_s"] is None else r["tpot_p99_s"] * 1e3, "{:.1f}"),
                  f(r["prefix_hit_rate"], "{:.1%}"), f(r["busy"], "{:.0%}"))
    if console is None:
        from rich.console import Console

        console = Console()
    console.print(t)


# ---------------------------------------------------------------------------------------
def simulate_cluster(setup, check_invariants: bool, progress, t0: float):
    """A run of replica groups or of disaggregated pools (sim/runner.py `simulate`)."""
    import time

    from .driver import run_simulation
    from .engine import Engine
    from .executor import SimExecutor
    from .memory import kv_bytes_per_block
    from .runner import engine_config, finish_run, make_cost_model, make_run_router, make_sim_speculation, \
        prepare_requests

    cl: ClusterSetup = setup.cluster
    requests = prepare_requests(setup)
    engines = []
    built: dict[int, tuple] = {}  # one cost model and engine config per group
    for rs in cl.replicas:
        s = rs.setup
        if id(s) not in built:
            built[id(s)] = (make_cost_model(s),)
        cost, = built[id(s)]
        ex = SimExecutor(cost, s.cfg.runtime.overlap_scheduler, make_sim_speculation(s, rs.index))
        # an engine config per replica: fresh instances of its policies (a stateful one belongs to one engine)
        engines.append(Engine(engine_config(s, check_invariants), ex, replica=rs.index))
    pools = {rs.index: rs.pool for rs in cl.replicas}
    if not cl.disaggregated:
        run_simulation(requests, engines, make_run_router(setup), progress=progress)
    else:
        from .disagg import run_disaggregated

        pre = [engines[i] for i in cl.pools["prefill"]]
        dec = [engines[i] for i in cl.pools["decode"]]
        ps = cl.replicas[cl.pools["prefill"][0]].setup
        tpb = ps.cfg.kv_cache.tokens_per_block
        per_token = kv_bytes_per_block(ps.model, tpb, 1) / tpb  # the whole model's KV (all shards)
        link = cl.link
        run_disaggregated(requests, pre, dec, make_run_router(setup),
                          make_run_router(setup, setup.cfg.cluster.disaggregation.decode_router),
                          link.bandwidth_gb_s * 1e9, link.latency_s, per_token)
    return finish_run(setup, requests, engines, "sim", time.perf_counter() - t0, pools=pools)


def bounds_setup(setup):
    """A Setup whose `run_bounds` (sim/bounds.py) holds for this cluster: as many replicas
    of the run's own layout as the cluster has, when every replica has that model,
    hardware and tensor parallelism (a disaggregated pair of pools is a restriction of
    those replicas, so their bound holds), at the largest batch and KV pool of any of
    them; None when replicas differ in model, hardware or layout."""
    cl: ClusterSetup = setup.cluster
    base = setup.cfg
    for r in cl.replicas:
        c = r.setup
        if (c.model.name, c.hardware.name, c.cfg.cluster.tensor_parallel, c.model.precision_label) != (
                setup.model.name, setup.hardware.name, base.cluster.tensor_parallel, setup.model.precision_label):
            return None
    # the largest batch and pool of any replica: the bound stays an upper bound
    mbs = max(r.setup.cfg.scheduler.max_batch_size for r in cl.replicas)
    cfg = base.model_copy(update={"cluster": base.cluster.model_copy(update={"replicas": len(cl.replicas)}),
                                  "scheduler": base.scheduler.model_copy(update={"max_batch_size": mbs})})
    return replace(setup, cfg=cfg, num_blocks=max(r.setup.num_blocks for r in cl.replicas))
