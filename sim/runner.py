"""Run one variant of an experiment end to end and write its run directory."""

from __future__ import annotations

import json
import math
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import pyarrow as pa
import yaml

import servesim
from servesim.policies.graph_padding import GraphPadding, capture_sizes, token_capture_sizes
from servesim.policies.loading import LoadedPolicy, load_run_policies
from servesim.policies.parallelism import Layout
from servesim.traces.schema import WorkloadColumns
from servesim.traces.spec import workload_columns

from .config import RunConfig
from .cost_model import RooflineCostModel
from .driver import run_simulation
from .engine import Engine, EngineConfig
from .executor import SimExecutor
from .memory import (MAX_POOL_BLOCKS, default_activation_reserve_bytes, kv_bytes_per_block, kv_pool_blocks,
                     max_num_tokens_that_fit)
from .metrics import summarize
from .pipeline import make_layout_cost_model, run_layout
from .records import iteration_arrays, iterations_table, request_arrays
from .schemas import build_table, write_run_table
from .specs import HardwareSpec, ModelSpec, apply_precision, load_hardware, load_model
from .types import ConfigError, Request

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class Setup:
    """Everything a run is built from, resolved from a RunConfig."""

    cfg: RunConfig
    model: ModelSpec
    hardware: HardwareSpec
    num_blocks: int
    # the workload table: a DataFrame, or its columns with the DataFrame made when first
    # asked for (traces/schema.py WorkloadColumns: what `resolve` gives, no pandas import)
    workload: pd.DataFrame | WorkloadColumns
    roofline: object = None  # RooflineConfig: the experiment's, or a calibration profile's
    profile_power: dict | None = None  # a calibration profile's fitted power model
    speculation: SpeculationSetup | None = None  # speculative decoding, resolved (None: off)
    cluster: object = None  # sim/cluster.py ClusterSetup: replica groups or pools (None: identical replicas)
    # family -> the policy class its key names, loaded and checked (policies/loading.py);
    # None: loaded from cfg when first needed
    policies: dict[str, LoadedPolicy] | None = None
    base_dir: Path | None = None  # where user policy modules are looked for first


@dataclass
class SpeculationSetup:
    """Speculative decoding of a run: the proposer's policy and what the simulator needs."""

    policy: object  # policies/speculative.py DraftPolicy
    drafter: ModelSpec | None  # the draft model, or the head's one-layer model (eagle, medusa)
    drafter_roofline: object  # its RooflineConfig
    alpha: list[float] | None  # per-position acceptance (or None with beta)
    beta: tuple[float, float] | None
    host_s_per_request: float


@dataclass
class RunResult:
    requests: pa.Table
    iterations: pa.Table
    summary: dict
    setup: Setup
    # where its Parquet files are when the run streamed them there (simulate(out_dir=...))
    run_dir: Path | None = None


class StreamedRunResult(RunResult):
    """A run whose records were streamed to `run_dir` (sim/stream.py): its tables are read
    from there when asked for (set `run_dir` when the folder moves)."""

    def __init__(self, summary: dict, setup: Setup, run_dir: Path):
        self.summary = summary
        self.setup = setup
        self.run_dir = Path(run_dir)

    @property
    def requests(self) -> pa.Table:
        from .schemas import read_run_table

        return read_run_table(self.run_dir / "requests.parquet", "requests")

    @property
    def iterations(self) -> pa.Table:
        from .schemas import read_run_table

        return read_run_table(self.run_dir / "iterations.parquet", "iterations")

    def __repr__(self) -> str:
        return f"StreamedRunResult(run_dir={str(self.run_dir)!r}, {self.summary.get('num_requests')} requests)"


def resolve(cfg: RunConfig, base_dir: Path, where: str = "") -> Setup:
    """Load model, hardware and workload; size the KV pool. Raises ConfigError with the
    problems of all three (the model and hardware, what depends on them, the workload)."""
    problems: list[tuple[str, str]] = []

    def attempt(fn):
        try:
            return fn()
        except ConfigError as e:
            problems.extend(e.problems)
            return None

    model = attempt(lambda: load_model(cfg.model, base_dir, location=f"{where}model"))
    hw = attempt(lambda: load_hardware(cfg.hardware, base_dir, location=f"{where}hardware"))
    fitted = None if model is None or hw is None else attempt(lambda: _fit(cfg, model, hw, base_dir, where))
    # the workload names the experiment file and variant too (a missing trace)
    workload = attempt(lambda: workload_columns(cfg.workload, base_dir, cfg.seed,
                                                config_source=where.removesuffix(": ")))
    policies = attempt(lambda: load_run_policies(cfg, base_dir, where))
    spec = None
    if fitted is not None:
        model, blocks, roofline, power = fitted
        spec = attempt(lambda: resolve_speculation(cfg, model, hw, roofline, base_dir, where, policies))
    if problems:
        raise ConfigError(problems)
    setup = Setup(cfg, model, hw, blocks, workload, roofline, power, spec, policies=policies, base_dir=base_dir)
    if cfg.cluster.groups or cfg.cluster.disaggregation is not None:
        from .cluster import resolve_cluster

        setup.cluster = resolve_cluster(setup, base_dir, where)
    return setup


def _fit(cfg: RunConfig, model: ModelSpec, hw: HardwareSpec, base_dir: Path, where: str):
    """(the model in the run's precisions, KV blocks, the RooflineConfig, a profile's power
    model) of a run: what depends on the model and the hardware (raises ConfigError)."""
    tp = cfg.cluster.tensor_parallel
    layout = run_layout(cfg, model, hw, where)  # cluster.tensor/pipeline/expert_parallel (sim/pipeline.py)
    kvc = cfg.kv_cache
    model = apply_precision(model, hw, cfg.model_precision, kvc.dtype, tp, f"{where}model_precision",
                            f"{where}kv_cache.dtype")
    s = cfg.scheduler
    if kvc.activation_reserve_gb is not None:
        reserve = kvc.activation_reserve_gb * 1e9
        reserve_loc, note, hint = f"{where}kv_cache.activation_reserve_gb", "you set", ""
    else:  # estimated from max_num_tokens: when that is what leaves no room, say so there
        reserve = default_activation_reserve_bytes(model, s.max_num_tokens, tp, max_batch_size=s.max_batch_size,
                                                   layout=layout)
        reserve_loc = f"{where}scheduler.max_num_tokens"
        note = f"estimated for an iteration of scheduler.max_num_tokens = {s.max_num_tokens:,} tokens"
        fit = max_num_tokens_that_fit(model, hw, kvc.tokens_per_block, kvc.free_gpu_memory_fraction, tp,
                                      s.max_batch_size, layout=layout)
        hint = f"at most {fit:,} tokens an iteration leave room (or set kv_cache.activation_reserve_gb)"
    blocks = kv_pool_blocks(model, hw, kvc.tokens_per_block, kvc.free_gpu_memory_fraction,
                            reserve, tp=tp, max_tokens=kvc.max_tokens, location=f"{where}model",
                            reserve_location=reserve_loc, reserve_note=note, reserve_hint=hint,
                            layout=layout)
    if kvc.pool_tokens is not None:
        blocks = -(-kvc.pool_tokens // kvc.tokens_per_block)
        if blocks > MAX_POOL_BLOCKS:  # the block manager lists every free block
            raise ConfigError(f"{kvc.pool_tokens:,} tokens are {blocks:,} blocks of {kvc.tokens_per_block}: the "
                              f"simulator holds at most {MAX_POOL_BLOCKS:,} blocks (use fewer tokens or larger "
                              "kv_cache.tokens_per_block)", f"{where}kv_cache.pool_tokens")
    host_gb = kvc.host_cache_size_gb + (cfg.scheduler.swap_space_gb if cfg.scheduler.preemption == "swap" else 0)
    if host_gb * 1e9 > hw.host_memory_bytes:
        if kvc.host_cache_size_gb * 1e9 <= hw.host_memory_bytes:
            raise ConfigError(f"host_cache_size_gb + swap_space_gb = {host_gb:g} GB is larger than the host "
                              f"memory of {hw.name} ({hw.host_memory_bytes / 1e9:.0f} GB)",
                              f"{where}scheduler.swap_space_gb")
    if kvc.host_cache_size_gb * 1e9 > hw.host_memory_bytes:
        raise ConfigError(f"host_cache_size_gb {kvc.host_cache_size_gb:g} GB is larger than the host memory "
                          f"of {hw.name} ({hw.host_memory_bytes / 1e9:.0f} GB)", f"{where}kv_cache.host_cache_size_gb")
    if cfg.workload.replay is not None:
        check_replay(cfg, model, hw, base_dir, where)
    roofline = cfg.cost_model.roofline
    power = None
    if cfg.cost_model.kind == "calibrated":
        from .calibrate import load_profile

        p = Path(cfg.cost_model.profile).expanduser()
        roofline, power = load_profile(p if p.is_absolute() else base_dir / p, model, hw, where)
    return model, blocks, roofline, power


def resolve_experiment(exp, source: str | Path) -> list[Setup]:
    """Every variant's :func:`resolve`, or one ConfigError with the problems of all of
    them, located ``source: variants[i] (name): key``; a problem every listed variant
    shares is reported once. ``sim validate`` and ``sim run`` both check through here: the
    same checks in the same order, the same problems."""
    setups, per_variant = [], []
    for v in exp.variants:
        prefix = f"{source}: variants[{v.index}] ({v.name})"
        try:
            setups.append(resolve(v.config, exp.base_dir, f"{prefix}: "))
        except ConfigError as e:
            per_variant.append((prefix, e.problems))
    if not per_variant:
        return setups
    # the same problem of several variants (a shared trace that is missing): one line
    groups: dict[tuple[str, str, bool], list[str]] = {}
    for prefix, probs in per_variant:
        for loc, msg in probs:
            rest = loc[len(prefix):].removeprefix(": ") if loc.startswith(prefix) else None
            groups.setdefault((loc if rest is None else rest, msg, rest is not None), []).append(prefix)
    problems = []
    for (rest, msg, in_variant), prefixes in groups.items():
        if not in_variant:
            problems.append((rest, msg))  # a file's own location (a trace's line): the same for each variant
            continue
        names = [p.removeprefix(f"{source}: ") for p in dict.fromkeys(prefixes)]
        if len(names) == 1:
            head = prefixes[0]
        elif len(names) == len(exp.variants):
            head = f"{source}: every variant ({len(names)})"
        else:
            head = f"{source}: " + ", ".join(names)
        problems.append((f"{head}: {rest}" if rest else head, msg))
    raise ConfigError(problems)


def resolve_speculation(cfg: RunConfig, model: ModelSpec, hw: HardwareSpec, roofline, base_dir: Path,
                        where: str, policies: dict[str, LoadedPolicy] | None = None) -> SpeculationSetup | None:
    """The run's speculative decoding (raises ConfigError naming the key)."""
    from dataclasses import replace

    from servesim.policies.speculative import make_draft_policy

    from .speculation import alpha_from_run

    sp = cfg.speculative
    if sp is None or sp.max_draft_len == 0:
        return None
    loc = f"{where}speculative"
    make_draft_policy(sp.proposer, sp.max_draft_len, sp.tree_nodes)  # the proposer's checks
    policy = (policies or load_run_policies(cfg, base_dir, where))["draft"].make()
    drafter = None
    if sp.proposer == "draft_model":
        drafter = load_model(sp.draft_model, base_dir, location=f"{loc}.draft_model")
        if drafter.vocab_size != model.vocab_size:
            raise ConfigError(f"the drafter {drafter.name} has a vocabulary of {drafter.vocab_size} tokens, the "
                              f"target {model.name} {model.vocab_size}: drafts must be the target's tokens",
                              f"{loc}.draft_model")
        if drafter.model_type != model.model_type:
            raise ConfigError(f"the drafter is a {drafter.model_type} model, the target a {model.model_type} "
                              "one: a drafter must share the target's tokenizer family", f"{loc}.draft_model")
    elif sp.proposer in ("eagle", "medusa"):  # a head: one decoder layer of the target's shape
        drafter = replace(model, name=f"{model.name}-{sp.proposer}-head", num_layers=1)
    droof = roofline
    if sp.draft_profile is not None:
        if drafter is None:
            raise ConfigError(f"draft_profile applies to a drafter model, not proposer: {sp.proposer}",
                              f"{loc}.draft_profile")
        from .calibrate import load_profile

        p = Path(sp.draft_profile).expanduser()
        droof, _ = load_profile(p if p.is_absolute() else base_dir / p, drafter, hw, f"{loc}.draft_profile: ")
    alpha = beta = None
    acc = sp.acceptance
    if isinstance(acc, float):
        alpha = [acc]
    elif isinstance(acc, list):
        alpha = list(acc)
    elif hasattr(acc, "beta"):
        beta = tuple(acc.beta)
    else:
        from .schemas import read_run_table

        run = Path(acc.run).expanduser()
        run = run if run.is_absolute() else base_dir / run
        if not (run / "iterations.parquet").is_file():
            raise ConfigError(f"not a run directory (no iterations.parquet): {run}", f"{loc}.acceptance.run")
        try:
            it = read_run_table(run / "iterations.parquet", "iterations",
                                ("draft_proposed_by_position", "draft_accepted_by_position"))
        except ConfigError as e:
            raise ConfigError([(f"{loc}.acceptance.run: {where_}", msg) for where_, msg in e.problems]) from None
        try:
            alpha = alpha_from_run(it, sp.max_draft_len)
        except ValueError as e:
            raise ConfigError(f"{e} ({run})", f"{loc}.acceptance.run") from None
    return SpeculationSetup(policy, drafter, droof, alpha, beta, sp.host_s_per_request)


def make_sim_speculation(setup: Setup, replica: int):
    """The simulated executor's speculation model of a run (None: off)."""
    from .executor import SimSpeculation
    from .speculation import AcceptanceModel, DrafterCost

    sp = setup.speculation
    if sp is None:
        return None
    cfg = setup.cfg
    drafter = None
    if sp.drafter is not None:
        drafter = RooflineCostModel(sp.drafter, setup.hardware, sp.drafter_roofline, tp=cfg.cluster.tensor_parallel,
                                    cuda_graphs=cfg.runtime.cuda_graphs)
    dpad = vpad = None
    if (pad := decode_graph_padding(cfg)) is not None:
        # the GPU backend's graphs: the DraftModel's at the target's decode sizes and twice
        # those, the verification's piecewise ones at those times 1 + max_draft_len tokens
        k1 = 1 + cfg.speculative.max_draft_len
        vpad = GraphPadding(sorted({b * k1 for b in pad.sizes}))
        if cfg.speculative.proposer == "draft_model":
            dpad = GraphPadding(sorted(set(pad.sizes) | {2 * b for b in pad.sizes}))
    return SimSpeculation(AcceptanceModel(sp.alpha, sp.beta, seed=cfg.seed * 1009 + replica),
                          DrafterCost(cfg.speculative.proposer, drafter, sp.host_s_per_request, dpad),
                          verify_padding=vpad, chunked_verify=True)


def check_replay(cfg: RunConfig, model: ModelSpec, hw: HardwareSpec, base_dir: Path, where: str) -> None:
    """A replayed run must have run the same model on the same hardware: its timings are
    what the replay is compared with."""
    from servesim.traces.spec import replay_path

    run_cfg = replay_path(cfg.workload.replay, base_dir).parent / "config.yaml"
    if not run_cfg.is_file():
        return  # a bare requests table: nothing to check against
    try:
        old = yaml.safe_load(run_cfg.read_text())["config"]
    except (yaml.YAMLError, KeyError, TypeError):
        raise ConfigError("not a run's config.yaml (corrupt or from another tool)", str(run_cfg)) from None
    old_model = load_model(old["model"], run_cfg.parent).name
    old_hw = load_hardware(old["hardware"], run_cfg.parent).name
    probs = []
    if old_model != model.name:
        probs.append((f"{where}model", f"replaying a run of {old_model} ({run_cfg.parent}) with {model.name}"))
    if old_hw != hw.name:
        probs.append((f"{where}hardware", f"replaying a run made on {old_hw} ({run_cfg.parent}) on {hw.name}"))
    if probs:
        raise ConfigError(probs)


def make_retention(cfg: RunConfig):
    """The retention policy of a run (None: every block at the default priority)."""
    from servesim.policies.retention import RetentionPolicy, RetentionSpec, TokenRange

    r = cfg.kv_cache.retention
    if r is None:
        return None

    def spec(c) -> RetentionSpec:
        return RetentionSpec(tuple(TokenRange(t.start, t.end, t.priority, t.duration_s) for t in c.token_ranges),
                             c.decode_priority)

    return RetentionPolicy(spec(r), {k: spec(v) for k, v in r.tenants.items()})


def attach_prefix_keys(requests: list[Request], df: pd.DataFrame, tokens_per_block: int, ek=None,
                       first: int = 0) -> None:
    """Give each request the chain keys of its full prompt blocks (and their tokens, when
    the workload has them, so a key collision can never reuse other tokens). `requests`
    are the workload's rows `first`, `first + 1`, ...; `ek`: the workload's engine keys if
    already computed (traces/reuse_bound.py `workload_engine_keys`)."""
    from servesim.traces.reuse_bound import workload_engine_keys

    if "block_hashes" not in df.columns and "prompt_tokens" not in df.columns:
        return
    if ek is None:
        ek = workload_engine_keys(WorkloadColumns.of(df).frame, tokens_per_block)
    keys = ek.keys
    off = ek.offsets[first:first + len(requests) + 1].tolist()
    t = tokens_per_block
    for i, r in enumerate(requests):
        a, b = off[i], off[i + 1]
        if b > a:
            r.block_keys = tuple(keys[a:b].tolist())
            if r.prompt_tokens is not None:
                pt = r.prompt_tokens
                r.block_contents = tuple(tuple(pt[j * t:(j + 1) * t]) for j in range(b - a))


def make_requests(df: pd.DataFrame | WorkloadColumns, lo: int = 0, hi: int | None = None) -> list[Request]:
    """Requests of the workload's rows lo..hi-1 (all of them by default)."""
    w = WorkloadColumns.of(df)
    hi = len(w) if hi is None else hi
    n = hi - lo
    ids = w.column("request_id")[lo:hi].tolist()
    arr = w.column("arrival_s")[lo:hi].astype(np.float64, copy=False).tolist()
    p = w.column("prompt_len")[lo:hi].tolist()
    o = w.column("output_len")[lo:hi].tolist()

    def opt(col, conv, default):
        if col not in w.columns:
            return [default] * n
        return [default if (v is None or (isinstance(v, float) and math.isnan(v))) else conv(v)
                for v in w.column(col)[lo:hi].tolist()]

    prio = opt("priority", int, 0)
    tenant = opt("tenant", str, "")
    sttft = opt("slo_ttft_s", float, None)
    stpot = opt("slo_tpot_s", float, None)
    hashes = opt("block_hashes", tuple, None)
    toks = opt("prompt_tokens", tuple, None)
    return [Request(ids[i], arr[i], p[i], o[i], prio[i], tenant[i], sttft[i], stpot[i], hashes[i], toks[i])
            for i in range(n)]


def make_cost_model(setup: Setup):
    cfg = setup.cfg
    return make_layout_cost_model(setup.model, setup.hardware, setup.roofline, Layout.of(cfg.cluster),
                                  cuda_graphs=cfg.runtime.cuda_graphs, overlap_scheduler=cfg.runtime.overlap_scheduler)


def run_policies(setup: Setup) -> dict[str, LoadedPolicy]:
    """The run's policy classes (loaded from its config when the Setup was built by hand)."""
    if setup.policies is None:
        setup.policies = load_run_policies(setup.cfg, setup.base_dir)
    return setup.policies


def make_run_router(setup: Setup, name: str | None = None):
    """A fresh instance of the run's router (cluster.router), or of another key's built-in
    router `name` (the decode pool's, cluster.disaggregation.decode_router), loaded through
    the same path."""
    if name is None:
        return run_policies(setup)["router"].make()
    from servesim.policies.loading import load_policy, router_builtin_args

    return load_policy(name, "router", "cluster.disaggregation.decode_router", setup.base_dir,
                       router_builtin_args(setup.cfg, name)).make()


def decode_graph_padding(cfg: RunConfig) -> GraphPadding | None:
    """The decode CUDA-graph sizes of a run (None: graphs off)."""
    rt, s = cfg.runtime, cfg.scheduler
    if not rt.cuda_graphs:
        return None
    return GraphPadding(capture_sizes(min(rt.graph_max_batch_size or s.max_batch_size, s.max_batch_size)))


def engine_config(setup: Setup, check_invariants: bool = False) -> EngineConfig:
    """One engine's configuration, with fresh instances of the run's policies (build one
    per replica: a stateful policy belongs to one engine)."""
    pol = run_policies(setup)
    s = setup.cfg.scheduler
    rt = setup.cfg.runtime
    kvc = setup.cfg.kv_cache
    block_bytes = kv_bytes_per_block(setup.model, kvc.tokens_per_block, setup.cfg.cluster.tensor_parallel,
                                     setup.cfg.cluster.pipeline_parallel)
    padding = decode_graph_padding(setup.cfg)
    return EngineConfig(
        max_batch_size=s.max_batch_size,
        max_num_tokens=s.max_num_tokens,
        tokens_per_block=setup.cfg.kv_cache.tokens_per_block,
        num_blocks=setup.num_blocks,
        capacity=pol["capacity"].make(),
        chunking=pol["chunking"].make(),
        graph_padding=padding,
        piecewise_padding=(GraphPadding(token_capture_sizes(min(rt.piecewise_max_tokens, s.max_num_tokens)))
                           if rt.piecewise_graphs else None),
        check_invariants=check_invariants,
        prefix_caching=kvc.enable_block_reuse,
        host_blocks=int(kvc.host_cache_size_gb * 1e9 // block_bytes),
        offload_min_priority=kvc.secondary_offload_min_priority,
        kv_block_bytes=block_bytes,
        swap_blocks=int(s.swap_space_gb * 1e9 // block_bytes) if s.preemption == "swap" else 0,
        overlap=rt.overlap_scheduler,
        speculation=setup.speculation.policy if setup.speculation is not None else None,
        max_positions=setup.model.max_position_embeddings,
        order=pol["order"].make(),
        victim=pol["preemption"].make(),
        eviction=pol["eviction"].make() if kvc.enable_block_reuse else None,
    )


def prepare_requests(setup: Setup) -> list[Request]:
    """The workload's requests with their prefix keys and retention specs (both backends)."""
    return _request_maker(setup)(0, len(setup.workload))


def _request_maker(setup: Setup) -> Callable[[int, int], list[Request]]:
    """``make(lo, hi)``: the requests of workload rows lo..hi-1, with their prefix keys and
    retention specs."""
    df = setup.workload
    kvc = setup.cfg.kv_cache
    retention = make_retention(setup.cfg)
    ek = None
    if kvc.enable_block_reuse and ("block_hashes" in df.columns or "prompt_tokens" in df.columns):
        from servesim.traces.reuse_bound import workload_engine_keys

        ek = workload_engine_keys(WorkloadColumns.of(df).frame, kvc.tokens_per_block)

    def make(lo: int, hi: int) -> list[Request]:
        requests = make_requests(df, lo, hi)
        if ek is not None:
            attach_prefix_keys(requests, df, kvc.tokens_per_block, ek, lo)
        if retention is not None:
            for r in requests:
                r.retention = retention.for_request(r.tenant)
        return requests

    return make


def finish_run(setup: Setup, requests: list[Request], engines: list[Engine], backend: str,
               wall_s: float, measured_energy_j: float | None = None,
               pools: dict[int, str] | None = None) -> RunResult:
    """Records, tables and summary of a finished run (both backends). `pools`: replica ->
    its pool ("prefill" / "decode") of a disaggregated run."""
    its = [iteration_arrays(e) for e in engines]
    disagg = bool(pools) and any(pools.values())
    req = request_arrays(requests, its, disaggregated=disagg)
    it_table = iterations_table(its, {"pool": np.concatenate(
        [np.full(len(i.columns["iteration"]), pools[e.replica], dtype=object) for i, e in zip(its, engines)])}
        if disagg else None)
    evp: dict[int, int] = {}
    for e in engines:
        if e.cache is not None:
            for k, v in e.cache.stats.evictions_by_priority.items():
                evp[k] = evp.get(k, 0) + v
    summary = summarize(req.table, it_table, kv_total_blocks=setup.num_blocks, backend=backend,
                        wall_s=wall_s, num_preemptions=sum(e.num_preemptions for e in engines),
                        num_swaps=sum(e.num_swaps for e in engines),
                        kv_block_bytes=engines[0].cfg.kv_block_bytes, evictions_by_priority=evp)
    summary.update(energy_summary(setup, it_table, summary, measured_energy_j))
    from .bounds import run_bounds

    if setup.cluster is None:
        summary["bounds"] = run_bounds(setup, req.table, summary)  # what no engine beats on these requests
    else:  # replica groups or pools: the bound of as many identical replicas, where they are identical
        from .cluster import bounds_setup

        bs = bounds_setup(setup)
        summary["bounds"] = run_bounds(bs, req.table, summary) if bs is not None else None
    if len(engines) > 1:
        from .cluster import per_replica_summary

        summary["per_replica"] = per_replica_summary(req.table, it_table, summary["duration_s"],
                                                     pools or {e.replica: "" for e in engines})
    return RunResult(req.table, it_table, summary, setup)


def power_params(setup: Setup) -> dict:
    """idle_w, busy_w, memory_w, kv_w, compute_w, max_w: each the experiment's `power`
    setting, else the calibration profile's fit, else the hardware file's (idle; shares of
    max - idle; kv_w: memory_w; max_w: max_power_w)."""
    from .power import DEFAULT_SHARES

    pc = setup.cfg.power
    prof = setup.profile_power or {}
    hw = setup.hardware
    out = {"idle_w": pc.idle_w or prof.get("idle_w") or hw.idle_power_w}
    span = max(hw.max_power_w - out["idle_w"], 0.0)
    for k, share in DEFAULT_SHARES.items():
        v = getattr(pc, k)
        out[k] = float(v if v is not None else prof.get(k, share * span))
    kv = pc.kv_w if pc.kv_w is not None else prof.get("kv_w")
    out["kv_w"] = float(kv) if kv is not None else out["memory_w"]
    out["max_w"] = float(pc.max_w or prof.get("max_w") or hw.max_power_w)
    return out


def energy_summary(setup: Setup, it, summary: dict, measured_energy_j: float | None = None) -> dict:
    """Energy over the run: measured (the GPU's energy counter), or modelled (sim/power.py).
    `it`: the iterations table, or a streamed run's EnergyAccumulator (sim/stream.py)."""
    from .power import DEFAULT_SHARES
    from .stream import EnergyAccumulator

    if measured_energy_j is not None:
        j = float(measured_energy_j)
        source = "measured (NVML energy counter)"
    else:
        gpus = setup.cfg.cluster.replicas * setup.cfg.cluster.tensor_parallel * setup.cfg.cluster.pipeline_parallel
        if setup.cluster is not None:
            gpus = setup.cluster.num_gpus
        acc = it if isinstance(it, EnergyAccumulator) else EnergyAccumulator.of_table(setup, it)
        j = acc.joules(summary["duration_s"], gpus)
        pc = setup.cfg.power
        own = all(getattr(pc, k) is None for k in (*DEFAULT_SHARES, "kv_w", "max_w"))
        source = "model" + (" (calibrated)" if setup.profile_power and own else "")
    tokens = summary["throughput_out_tok_s"] * summary["duration_s"]
    return {"energy_j": j, "energy_per_token_j": j / tokens if tokens else None,
            "avg_power_w": j / summary["duration_s"] if summary["duration_s"] else None,
            "energy_source": source}


def simulate(setup: Setup, check_invariants: bool = False,
             progress: Callable[[float], None] | None = None, out_dir: Path | None = None) -> RunResult:
    """Simulate one run. With `out_dir`, its records stream into that folder's
    requests.parquet and iterations.parquet as the run goes, in bounded memory
    (sim/stream.py; the same files `write_run` writes of a run held in memory), and the
    result reads its tables from there; `write_run` to that folder adds the rest."""
    from .driver import collector_paused

    with collector_paused():
        return _simulate(setup, check_invariants, progress, out_dir)


def _simulate(setup: Setup, check_invariants: bool, progress, out_dir: Path | None) -> RunResult:
    t0 = time.perf_counter()
    if setup.cluster is not None:  # replica groups or pools: held in memory (write_run writes it)
        from .cluster import simulate_cluster

        return simulate_cluster(setup, check_invariants, progress, t0)
    cost = make_cost_model(setup)
    engines = [Engine(engine_config(setup, check_invariants),
                      SimExecutor(cost, setup.cfg.runtime.overlap_scheduler, make_sim_speculation(setup, i)),
                      replica=i) for i in range(setup.cfg.cluster.replicas)]
    router = make_run_router(setup)
    if out_dir is None:
        requests = prepare_requests(setup)
        run_simulation(requests, engines, router, progress=progress)
        return finish_run(setup, requests, engines, "sim", time.perf_counter() - t0)
    from .records import RequestSource
    from .stream import stream_run

    source = RequestSource(WorkloadColumns.of(setup.workload).column("arrival_s"), _request_maker(setup))
    return stream_run(setup, engines, source, router, Path(out_dir), t0, progress=progress)




def code_version() -> str:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=here,
                             capture_output=True, text=True, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            return f"{servesim.__version__}+{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return servesim.__version__


def with_prompt_identity(requests: pa.Table, workload: pd.DataFrame) -> pa.Table:
    """The requests table plus what makes prompts share a prefix -- the workload's
    ``block_hashes`` (with its block size in the file's metadata) or ``prompt_tokens`` --
    so that replaying the run (``workload: {replay: RUN}``) reuses the KV cache the way
    the run did, not only its arrivals and lengths."""
    from servesim.traces.schema import HASH_BLOCK_SIZE, TUPLE_COLUMNS

    cols = [c for c in TUPLE_COLUMNS if c in workload.columns]
    if not cols:
        return requests
    by_id = workload.set_index("request_id")
    ids = requests.column("request_id").to_pylist()
    columns = {c: requests.column(c) for c in requests.column_names}
    for c in cols:
        vals = by_id[c].reindex(ids).tolist()
        columns[c] = [None if v is None or (isinstance(v, float) and v != v) else list(v) for v in vals]
    bs = workload.attrs.get(HASH_BLOCK_SIZE)
    meta = {} if bs is None else {b"servesim." + HASH_BLOCK_SIZE.encode(): str(int(bs)).encode()}
    return build_table("requests", columns, meta)


def write_run(result: RunResult, out_dir: Path, experiment: str, variant: str,
              phase: Callable[[str], None] | None = None) -> None:
    """The run's files in `out_dir` (`sim run` gives it a ``.<variant>.partial`` folder,
    renamed when complete: sim/rundir.py). ``phase(file)`` is called before each file."""
    phase = phase or (lambda _: None)
    out_dir.mkdir(parents=True, exist_ok=True)
    streamed = isinstance(result, StreamedRunResult)
    for name in ("requests.parquet", "iterations.parquet"):
        phase(name)
        if streamed:  # written as it ran: there already, or copied
            if (result.run_dir / name).resolve() != (out_dir / name).resolve():
                import shutil

                shutil.copyfile(result.run_dir / name, out_dir / name)
        elif name == "requests.parquet":
            write_run_table(with_prompt_identity(result.requests, result.setup.workload), out_dir / name)
        else:
            write_run_table(result.iterations, out_dir / name)
    phase("summary.json")
    summary = dict(result.summary)
    summary["kv_pool_blocks"] = result.setup.num_blocks
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    resolved = {
        "experiment": experiment,
        "variant": variant,
        "code_version": code_version(),
        "config": result.setup.cfg.model_dump(mode="json"),
        # each policy key: the class it resolved to, its arguments, its source file and sha256
        "policies": {p.config_key: p.provenance() for p in run_policies(result.setup).values()},
        "derived": {
            "kv_pool_blocks": result.setup.num_blocks,
            "kv_pool_tokens": result.setup.num_blocks * result.setup.cfg.kv_cache.tokens_per_block,
            "model_weight_gb": result.setup.model.weight_bytes / 1e9,
            "num_requests": len(result.setup.workload),
        },
    }
    phase("config.yaml")
    (out_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
