"""Experiment files: YAML validated by pydantic, variants merged over shared settings.

An experiment file holds `name`, optional `description`, the shared run settings (the
fields of `RunConfig`) and `variants:`, a list of `{name, <settings it overrides>}`.
Each variant's settings are the shared ones deep-merged with its overrides, then with the
command line's `--set key.path=value` pairs, then validated. Every problem is reported
with the file and key path (`variants[1].scheduler.max_num_tokens`), all at once.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator,
                      model_validator)

from servesim.policies.loading import PolicyRef, check_value
from servesim.traces.spec import WorkloadConfig

from .cost_model import RooflineConfig
from .errors import KeyedError, PathStr, format_key, load_yaml, located_errors, path_problem, problem_message
from .power import PowerConfig
from .types import ConfigError
from .yamlio import DuplicateKeyError, safe_load


class _Strict(BaseModel):
    # every float finite: .inf / .nan are refused (all of them at once, each at its key)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# A policy key (policies/loading.py): a built-in name, module:Class, or {class, args}
PolicySpec = Annotated[Union[Annotated[str, Tag("name")], Annotated[PolicyRef, Tag("ref")]],
                       Discriminator(lambda v: "ref" if isinstance(v, (dict, PolicyRef)) else "name")]
_USER = " -- or your own: module:Class, or {class: module:Class, args: {...}} (README, Policies you write)"


class SchedulerConfig(_Strict):
    capacity: PolicySpec = Field(
        "guaranteed_no_evict",
        description="admission policy: guaranteed_no_evict reserves KV for prompt+output; "
        "max_utilization admits greedily and pauses the newest request when KV runs out; "
        "static_batch forms a batch only when the engine is idle" + _USER)
    order: PolicySpec = Field("fcfs", description="which arrived request is admitted next: fcfs; priority "
                              "(highest first), shortest_prompt_first (both with an aging bound, max_overtakes "
                              "8)" + _USER)
    chunking: PolicySpec | None = Field(None, description="context chunking policy: none, fixed (args: "
                                        "chunk_size), fill_budget; null: from enable_chunked_context and "
                                        "chunk_size" + _USER)
    preemption_victim: PolicySpec = Field("newest", description="which running request a pausing capacity "
                                          "policy pauses: newest, lowest_priority" + _USER)
    # upper bounds: far beyond any engine's, and small enough that graph-size lists and
    # per-iteration arrays stay small (a 10^20-request batch would exhaust memory)
    max_batch_size: int = Field(256, gt=0, le=2**20, description="most requests active at once")
    max_num_tokens: int = Field(8192, gt=0, le=2**24,
                                description="most tokens (context + generation) in one iteration")
    enable_chunked_context: bool = Field(False, description="split long prompts across iterations")
    chunk_size: int | None = Field(None, gt=0, le=2**24, description="context tokens per chunk (multiple of "
                                   "kv_cache.tokens_per_block); null fills the iteration's budget")
    preemption: Literal["recompute", "swap"] = Field(
        "recompute", description="how max_utilization pauses a request: recompute (drop its KV, recompute "
        "prompt + generated tokens on resume) or swap (copy its KV to host memory and back over PCIe)")
    swap_space_gb: float = Field(16.0, gt=0, description="host memory for swapped-out requests (preemption: swap)")

    @field_validator("capacity", "order", "chunking", "preemption_victim", mode="before")
    @classmethod
    def _policies(cls, v, info):
        if v is None:
            return v
        return check_value(v, {"capacity": "capacity", "order": "order", "chunking": "chunking",
                               "preemption_victim": "preemption"}[info.field_name])

    @model_validator(mode="after")
    def _chunking(self):
        if self.chunking is not None and (self.enable_chunked_context or self.chunk_size is not None):
            raise KeyedError("scheduler.chunking replaces enable_chunked_context and chunk_size: set one or the "
                             "other", "scheduler.chunking", "scheduler.enable_chunked_context", "scheduler.chunk_size")
        return self


class TokenRangeConfig(_Strict):
    start: int = Field(ge=0, description="first token of the range")
    end: int | None = Field(None, gt=0, description="one past the last token (null: to the end)")
    priority: int = Field(ge=0, le=100, description="retention priority 0..100 (default blocks: 35)")
    duration_s: float | None = Field(None, gt=0, description="after this long the priority falls back to 35")

    @model_validator(mode="after")
    def _order(self):
        if self.end is not None and self.end <= self.start:
            raise ValueError(f"token range end ({self.end}) must be greater than start ({self.start})")
        return self


class RetentionSpecConfig(_Strict):
    token_ranges: list[TokenRangeConfig] = Field(default_factory=list)
    decode_priority: int = Field(35, ge=0, le=100, description="priority of blocks of generated tokens")

    @model_validator(mode="after")
    def _no_overlap(self):
        rs = sorted(self.token_ranges, key=lambda r: r.start)
        for a, b in zip(rs, rs[1:]):
            if a.end is None or a.end > b.start:
                raise ValueError(f"token ranges overlap: [{a.start}, {a.end}) and [{b.start}, {b.end})")
        return self


class RetentionConfig(RetentionSpecConfig):
    tenants: dict[str, RetentionSpecConfig] = Field(
        default_factory=dict, description="per-tenant retention specs overriding the default")


KV_SCALES = ("unit", "calibrated")  # kv_cache.scales


class KVCacheConfig(_Strict):
    tokens_per_block: int = Field(32, gt=0, le=2**16, description="tokens per KV block (power of two)")
    free_gpu_memory_fraction: float = Field(0.9, gt=0, le=1, description="share of the memory left after "
                                            "weights and activations that the KV pool takes")
    max_tokens: int | None = Field(None, gt=0, description="cap on the pool size in tokens")
    pool_tokens: int | None = Field(None, gt=0, description="exact pool size in tokens, overriding the "
                                    "memory-derived size (what-if studies, e.g. an unlimited cache)")
    activation_reserve_gb: float | None = Field(None, ge=0, description="GPU memory kept for activations; "
                                                "null estimates it from max_num_tokens")
    enable_block_reuse: bool = Field(False, description="prefix caching: reuse cached blocks of equal prefixes")
    host_cache_size_gb: float = Field(0.0, ge=0, description="host-memory tier for evicted blocks (0: none)")
    secondary_offload_min_priority: int = Field(35, ge=0, le=100, description="blocks evicted at or above "
                                                "this priority go to the host tier; lower ones are dropped")
    retention: RetentionConfig | None = Field(None, description="retention priorities of token ranges")
    eviction: PolicySpec = Field("prioritized_lru", description="which cached blocks are evicted when the pool "
                                 "is short (enable_block_reuse): prioritized_lru (lowest retention priority, then "
                                 "least recently used)" + _USER)
    dtype: str = Field("auto", description="KV-cache element format: bf16, fp8 (e4m3, Hopper or later) or int8, "
                       "one scale per layer and tensor; auto: the checkpoint's (its quantization_config's KV "
                       "scheme), else bf16")
    scales: str = Field("unit", description="an fp8 KV cache's per-layer scales of keys and values: unit (1.0, what "
                        "serving engines use without calibration) or calibrated (the gpu backend prefills a few seeded "
                        "random prompts before the run and takes each layer's amax x 2 / 448; "
                        "LlamaModel.calibrate_kv_scales; one GPU; a drafter's pool keeps 1.0). The simulator prices both alike")

    @field_validator("scales", mode="before")
    @classmethod
    def _scales(cls, v):
        t = v.strip().lower() if isinstance(v, str) else v
        if t not in KV_SCALES:
            raise ValueError(f"must be one of {', '.join(KV_SCALES)} (unit: 1.0 per layer; calibrated: amax x 2 / "
                             "448 of a calibration prefill)")
        return t

    @field_validator("dtype")
    @classmethod
    def _kv_dtype(cls, v):
        from .specs import parse_kv_dtype

        if isinstance(v, str) and v.strip().lower() == "auto":
            return "auto"
        try:
            return parse_kv_dtype(v)
        except ConfigError as e:
            raise ValueError(e.problems[0][1]) from None

    @field_validator("eviction", mode="before")
    @classmethod
    def _eviction(cls, v):
        return check_value(v, "eviction")

    @model_validator(mode="after")
    def _pow2(self):
        t = self.tokens_per_block
        if t & (t - 1):
            raise ValueError(f"tokens_per_block must be a power of two, got {t}")
        if self.scales == "calibrated" and self.dtype == "bf16":
            raise KeyedError("calibrated KV scales apply to an fp8 KV cache, this one is bf16: set kv_cache.dtype: "
                             "fp8 or kv_cache.scales: unit", "scales", "dtype")
        return self


class RuntimeConfig(_Strict):
    cuda_graphs: bool = Field(True, description="generation-only iterations run as CUDA graphs, batch "
                              "padded to a captured size")
    graph_max_batch_size: int | None = Field(None, gt=0, le=2**20,
                                             description="largest captured graph (default: max_batch_size)")
    overlap_scheduler: bool = Field(False, description="host schedules and launches iteration n+1 while the GPU "
                                    "runs n: the host's work hides under the GPU's (an iteration costs the longer "
                                    "of the two), a request arriving after n started waits for n+2, and a "
                                    "finished request runs one extra, discarded step and frees its slot a step "
                                    "later")
    piecewise_graphs: bool = Field(False, description="iterations with context chunks run as piecewise CUDA "
                                   "graphs (vLLM style): everything but attention captured per layer for padded "
                                   "token counts, attention launched eagerly between the pieces; cuts the host's "
                                   "kernel launches from ~12 to ~3 per layer")
    piecewise_max_tokens: int = Field(2048, gt=0, le=2**24,
                                      description="largest token count captured for piecewise graphs "
                                      "(capped at scheduler.max_num_tokens); bigger iterations run eagerly, where "
                                      "the GPU's work hides the launches anyway")


ROUTER_NAMES = Literal["round_robin", "least_loaded", "least_outstanding_tokens", "prefix_aware"]


class PrefixAwareConfig(_Strict):
    load_factor: float = Field(1.5, ge=1, description="a replica is eligible when its outstanding tokens are at "
                               "most the least loaded replica's times load_factor plus slack_tokens")
    slack_tokens: int = Field(8192, ge=0, description="tokens of load a replica may carry beyond the least "
                              "loaded one's (times load_factor) and still be chosen for its cached prefix")


class ClusterConfig(_Strict):
    replicas: int = Field(1, gt=0, le=1024, description="engine replicas, each on its own GPUs")
    router: PolicySpec = Field(
        "round_robin", description="which replica an arriving request goes to: round_robin, least_loaded "
        "(fewest requests), least_outstanding_tokens (least prompt + output tokens left), prefix_aware (the "
        "longest cached prefix, within a load bound: cluster.prefix_aware)" + _USER)
    tensor_parallel: int = Field(1, gt=0, description="GPUs per replica (tensor parallel)")
    # parallelism beyond TP (policies/parallelism.py checks a layout, sim/pipeline.py prices pp)
    pipeline_parallel: int = Field(1, gt=0, le=1024, description="pipeline stages per replica, each of "
                                   "num_layers / pipeline_parallel layers on tensor_parallel GPUs (a replica: "
                                   "tensor_parallel x pipeline_parallel GPUs)")
    expert_parallel: int = Field(1, gt=0, description="MoE models: GPU groups of a stage's tensor-parallel group "
                                 "the experts are split over (num_experts / expert_parallel each, every expert "
                                 "split over tensor_parallel / expert_parallel GPUs), tokens dispatched to them by "
                                 "all-to-all; must divide tensor_parallel (1: every expert split over all of them)")
    pp_micro_batches: int | None = Field(None, gt=0, description="pipeline_parallel > 1: micro-batches of "
                                         "disjoint requests in flight through the stages (null: "
                                         "pipeline_parallel, as TensorRT-LLM)")
    prefix_aware: PrefixAwareConfig = Field(default_factory=PrefixAwareConfig,
                                            description="the prefix_aware router's load bound")
    groups: list["ReplicaGroup"] = Field(
        default_factory=list, description="replicas with their own settings: a list of {count, <settings>} "
        "(hardware, model_precision, scheduler, kv_cache, runtime, cost_model, cluster.tensor_parallel, ...), "
        "each deep-merged over the run's; the counts add up to cluster.replicas")
    disaggregation: "DisaggregationConfig | None" = Field(
        None, description="disaggregated serving: a prefill pool and a decode pool (null: every replica "
        "does both)")

    @field_validator("router", mode="before")
    @classmethod
    def _router(cls, v):
        return check_value(v, "router")

    @model_validator(mode="after")
    def _cluster_form(self):
        if self.groups:
            total = sum(g.count for g in self.groups)
            if "replicas" in self.model_fields_set and total != self.replicas:
                raise KeyedError(f"cluster.groups hold {total} replicas, cluster.replicas says {self.replicas}",
                                 "groups", "replicas")
            if total > 1024:
                raise KeyedError(f"cluster.groups hold {total} replicas: at most 1024", "groups")
            self.replicas = total
        if self.disaggregation is not None:
            if "replicas" in self.model_fields_set and self.replicas != 1:
                raise KeyedError("with cluster.disaggregation the pools' counts are the replicas (leave "
                                 "cluster.replicas out)", "replicas", "disaggregation")
            if self.groups:
                raise KeyedError("cluster.groups and cluster.disaggregation exclude each other (give each "
                                 "pool its settings in disaggregation.prefill / .decode)", "groups",
                                 "disaggregation")
        return self


# keys of `cluster` that describe the whole cluster, not one replica (a group may not set them)
_CLUSTER_ONLY = ("replicas", "router", "prefix_aware", "groups", "disaggregation")


class ReplicaGroup(_Strict):
    """Settings of some replicas (or a pool) that differ from the run's: the keys of a run's
    config that describe one replica, deep-merged over the run's own."""

    count: int = Field(1, gt=0, le=1024, description="replicas with these settings")
    model: PathStr | None = Field(None, description="the model (a disaggregated pool must serve the other's)")
    hardware: PathStr | None = Field(None, description="bundled hardware name or path to a hardware YAML")
    model_precision: str | dict | None = Field(None, description="as the run's model_precision")
    scheduler: dict | None = Field(None, description="as the run's scheduler (only the keys that differ)")
    kv_cache: dict | None = Field(None, description="as the run's kv_cache (only the keys that differ)")
    runtime: dict | None = Field(None, description="as the run's runtime (only the keys that differ)")
    cost_model: dict | None = Field(None, description="as the run's cost_model (only the keys that differ)")
    cluster: dict | None = Field(None, description="the replica's parallelism (tensor_parallel, ...)")

    @field_validator("cluster")
    @classmethod
    def _replica_cluster(cls, v):
        bad = [k for k in (v or {}) if k in _CLUSTER_ONLY]
        if bad:
            raise ValueError(f"{bad[0]} is a setting of the whole cluster, not of one replica")
        return v

    def overrides(self) -> dict:
        """The settings it overrides, as a partial run config."""
        return self.model_dump(mode="json", exclude_unset=True, exclude={"count"})


class LinkConfig(_Strict):
    bandwidth_gb_s: float = Field(50.0, gt=0, le=1e6, description="GB/s between the pools, shared equally by "
                                  "the transfers in flight (processor sharing)")
    latency_s: float = Field(20e-6, ge=0, le=60, description="seconds before a transfer's bytes start moving")


class DisaggregationConfig(_Strict):
    prefill: ReplicaGroup = Field(description="the prefill pool: {count, <settings>}; its replicas run prompts "
                                  "and emit each request's first token")
    decode: ReplicaGroup = Field(description="the decode pool: {count, <settings>}; its replicas generate the "
                                 "rest, once a request's KV has arrived")
    link: LinkConfig = Field(default_factory=LinkConfig, description="the KV transfer link between the pools")
    decode_router: ROUTER_NAMES = Field("least_outstanding_tokens",
                                        description="which decode replica a prefilled request goes to "
                                        "(cluster.router picks the prefill replica)")

    @model_validator(mode="after")
    def _size(self):
        if self.prefill.count + self.decode.count > 1024:
            raise KeyedError("more than 1024 replicas in the two pools", "prefill.count", "decode.count")
        return self


ClusterConfig.model_rebuild()


class CostModelConfig(_Strict):
    kind: Literal["roofline", "calibrated"] = Field(
        "roofline", description="roofline: max(FLOPs/rate, bytes/bandwidth) per op; calibrated: the same "
        "terms with efficiencies and overheads fitted to GPU measurements (a profile from sim calibrate)")
    roofline: RooflineConfig = Field(default_factory=RooflineConfig)
    profile: PathStr | None = Field(None, description="calibration profile (kind: calibrated), relative to the "
                                "experiment file")

    @model_validator(mode="after")
    def _profile(self):
        if self.kind == "calibrated" and not self.profile:
            raise ValueError("cost_model.kind: calibrated needs cost_model.profile (made by sim calibrate)")
        if self.kind == "roofline" and self.profile:
            raise ValueError("cost_model.profile applies to kind: calibrated")
        return self


class BetaAcceptance(_Strict):
    beta: tuple[float, float] = Field(description="per request, its acceptance rate ~ Beta(a, b)")

    @model_validator(mode="after")
    def _positive(self):
        if min(self.beta) <= 0:
            raise ValueError("beta parameters must be positive")
        return self


class RunAcceptance(_Strict):
    run: PathStr = Field(description="a run directory whose iterations.parquet recorded acceptance per draft "
                     "position (a GPU or sim run with speculative decoding)")


class SpeculativeConfig(_Strict):
    proposer: Literal["draft_model", "ngram", "medusa", "eagle"] = Field(
        "draft_model", description="what proposes the drafts (policies/speculative.py)")
    max_draft_len: int = Field(4, ge=0, description="k: draft tokens per request and step (0: off)")
    draft_model: PathStr | None = Field(None, description="the drafter: a bundled model name or a config.json "
                                    "(proposer: draft_model; same vocabulary as the target)")
    draft_profile: PathStr | None = Field(None, description="calibration profile of the drafter (default: the "
                                      "target's cost-model settings)")
    acceptance: float | list[float] | BetaAcceptance | RunAcceptance = Field(
            0.7, description="probability each draft position is accepted given the ones before it: one "
            "number, a list per position, {beta: [a, b]} per request, or {run: RUN_DIR} measured")
    tree_nodes: int = Field(0, ge=0, description="eagle: candidate-tree nodes verified per request (0: a chain)")
    host_s_per_request: float = Field(2e-6, ge=0, description="host seconds per request and step of "
                                      "proposing (n-gram lookup, draft bookkeeping)")
    draft_policy: PolicySpec = Field("fixed", description="how many drafts each request carries per step: fixed "
                                     "(max_draft_len, fewer near the end)" + _USER)
    gpu_acceptance: Literal["natural", "controlled"] = Field(
        "controlled", description="--backend gpu: controlled runs the real drafting and verification but accepts "
        "each position as `acceptance` says (random weights make natural acceptance meaningless); natural "
        "accepts what the target's verification accepts")

    @field_validator("draft_policy", mode="before")
    @classmethod
    def _draft_policy(cls, v):
        return check_value(v, "draft")

    @model_validator(mode="after")
    def _check(self):
        if self.proposer == "draft_model" and self.max_draft_len and self.draft_model is None:
            raise ValueError("proposer: draft_model needs draft_model (e.g. llama-3.2-1b)")
        if self.proposer != "draft_model" and self.draft_model is not None:
            raise ValueError(f"draft_model applies to proposer: draft_model, not {self.proposer}")
        if isinstance(self.acceptance, list) and not self.acceptance:
            raise ValueError("acceptance: an empty list (give one rate per draft position)")
        rates = self.acceptance if isinstance(self.acceptance, list) else [self.acceptance] \
            if isinstance(self.acceptance, float) else []
        bad = [a for a in rates if not 0 <= a <= 1]
        if bad:
            raise ValueError(f"acceptance rates must be in [0, 1], not {bad[0]:g}")
        if self.tree_nodes and self.proposer != "eagle":
            raise ValueError("tree_nodes applies to proposer: eagle")
        if self.tree_nodes and self.tree_nodes < self.max_draft_len:
            raise ValueError(f"tree_nodes ({self.tree_nodes}) must be at least max_draft_len "
                             f"({self.max_draft_len}): a tree holds the chain")
        return self


class OutputConfig(_Strict):
    plots: bool = Field(True, description="write PNG plots into the run directory")
    timeline: bool = Field(True, description="write timeline.json (Chrome trace of the first 5,000 "
                           "iterations: open it in ui.perfetto.dev)")


class RunConfig(_Strict):
    """The settings of one run (one variant)."""

    seed: int = Field(0, ge=0, description="seeds synthetic workloads and sampling")
    model: PathStr = Field("llama-3.1-8b", description="bundled model name or path to a HF config.json")
    hardware: PathStr = Field("h100-sxm", description="bundled hardware name or path to a hardware YAML")
    model_precision: str | dict | None = Field(
        None, description="the decoder linears' weights: bf16, fp8 (e4m3, per-tensor scales; fp8-channel, "
        "fp8-block), int8 (SmoothQuant W8A8, per-channel), int4 (AWQ/GPTQ-style weight-only, groups of 128; "
        "int4-g64, int4-g128-zp with zero points), or {weights, scales, group_size, zero_point}; null: the "
        "checkpoint's quantization_config, else bf16. The hardware must run it (fp8: Hopper or later)")
    workload: WorkloadConfig
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig,
                                       description="batching and admission (TensorRT-LLM semantics)")
    kv_cache: KVCacheConfig = Field(default_factory=KVCacheConfig, description="paged KV cache")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="execution features")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="replicas and parallelism")
    cost_model: CostModelConfig = Field(default_factory=CostModelConfig,
                                        description="how the simulator prices an iteration")
    power: PowerConfig = Field(default_factory=PowerConfig, description="GPU power model (energy per token)")
    speculative: SpeculativeConfig | None = Field(None, description="speculative decoding (null: off)")
    output: OutputConfig = Field(default_factory=OutputConfig, description="what a run writes")

    @field_validator("model_precision")
    @classmethod
    def _precision(cls, v):
        from .specs import parse_precision

        if v is None:
            return None
        try:
            return parse_precision(v).label
        except ConfigError as e:
            raise ValueError(e.problems[0][1]) from None

    @model_validator(mode="after")
    def _cross_checks(self):
        s = self.scheduler
        if s.max_num_tokens < s.max_batch_size:
            raise KeyedError(f"scheduler.max_num_tokens ({s.max_num_tokens}) must be at least "
                             f"scheduler.max_batch_size ({s.max_batch_size}): every generation "
                             "request takes one token of the budget", "scheduler.max_num_tokens",
                             "scheduler.max_batch_size")
        kv = self.kv_cache
        if s.preemption == "swap" and isinstance(s.capacity, str) and ":" not in s.capacity \
                and s.capacity != "max_utilization":
            raise KeyedError("scheduler.preemption: swap needs scheduler.capacity: max_utilization "
                             "(the other policies never pause a request)", "scheduler.preemption",
                             "scheduler.capacity")
        if kv.host_cache_size_gb > 0 and not kv.enable_block_reuse:
            raise KeyedError("kv_cache.host_cache_size_gb needs kv_cache.enable_block_reuse: true "
                             "(the host tier holds evicted reusable blocks)", "kv_cache.host_cache_size_gb",
                             "kv_cache.enable_block_reuse")
        if kv.eviction != "prioritized_lru" and not kv.enable_block_reuse:
            raise KeyedError("kv_cache.eviction needs kv_cache.enable_block_reuse: true (it chooses among cached "
                             "prefix blocks)", "kv_cache.eviction", "kv_cache.enable_block_reuse")
        if kv.retention is not None and not kv.enable_block_reuse:
            raise KeyedError("kv_cache.retention needs kv_cache.enable_block_reuse: true", "kv_cache.retention",
                             "kv_cache.enable_block_reuse")
        sp = self.speculative
        if sp is not None and sp.max_draft_len:
            verify = max(sp.max_draft_len, sp.tree_nodes)
            if verify + 1 > s.max_num_tokens:
                raise KeyedError(f"speculative.max_draft_len: {verify} draft tokens + 1 can never fit "
                                 f"scheduler.max_num_tokens ({s.max_num_tokens})", "speculative.max_draft_len",
                                 "speculative.tree_nodes", "scheduler.max_num_tokens")
            if self.runtime.overlap_scheduler:
                raise KeyedError("speculative decoding with runtime.overlap_scheduler is not modelled "
                                 "(the next iteration's drafts need this one's accepted tokens)",
                                 "runtime.overlap_scheduler", "speculative")
        if s.chunk_size is not None and s.chunk_size % self.kv_cache.tokens_per_block:
            raise KeyedError(f"scheduler.chunk_size ({s.chunk_size}) must be a multiple of "
                             f"kv_cache.tokens_per_block ({self.kv_cache.tokens_per_block})", "scheduler.chunk_size",
                             "kv_cache.tokens_per_block")
        return self


class Variant:
    def __init__(self, name: str, config: RunConfig, raw: dict, index: int = 0):
        self.name = name
        self.config = config
        self.raw = raw
        self.index = index  # its place in the file's variants list (variants[index])


class Experiment:
    def __init__(self, path: Path, name: str, description: str, variants: list[Variant]):
        self.path = path
        self.name = name
        self.description = description
        self.variants = variants

    @property
    def base_dir(self) -> Path:
        return self.path.parent


# ---------------------------------------------------------------------------------------
def _has_path(d: Any, loc: tuple) -> bool:
    for p in loc:
        if isinstance(d, dict) and p in d:
            d = d[p]
        elif isinstance(d, list) and isinstance(p, int) and p < len(d):
            d = d[p]
        else:
            return False
    return True


def deep_merge(base: dict, over: dict) -> dict:
    """`over` merged into `base`, recursively. A mapping whose `kind` differs from the
    base's replaces it whole (another kind of thing: its keys would not mix)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        old = out.get(k)
        if isinstance(v, dict) and isinstance(old, dict) and not (
                "kind" in v and "kind" in old and v["kind"] != old["kind"]):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_set(pairs: list[str]) -> dict:
    """`--set a.b=1` pairs into a nested dict (values parsed as YAML)."""
    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key.path=value, got {pair!r}", "command line")
        key, val = pair.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--set has an empty key in {pair!r}", "command line")
        try:
            value = safe_load(val)
        except DuplicateKeyError as e:
            raise ConfigError(f"--set {key.strip()}: {e.duplicates[0][1]}", "command line") from None
        except yaml.YAMLError:
            value = val
        d = out
        for p in parts[:-1]:
            d = d.setdefault(p, {})
            if not isinstance(d, dict):
                raise ConfigError(f"--set {key}: {p} is set twice", "command line")
        d[parts[-1]] = value
    return out


_UNKNOWN_KEY_HINT = "check the spelling; `sim validate` lists the allowed keys in the README"


def _pydantic_problems(err: ValidationError, where: str, variant_raw: dict | None,
                       vi: int | None, set_over: dict, merged: dict) -> list[tuple[str, str]]:
    """Each error located where the user wrote the value: the command line's --set, the
    variant's overrides, or the shared settings."""
    probs = []
    for paths, e in located_errors(err, merged):
        # a cross-check names several keys (KeyedError): the most specific one the user wrote
        in_set = [p for p in paths if set_over and _has_path(set_over, p)]
        in_variant = [p for p in paths if variant_raw is not None and p and _has_path(variant_raw, p)]
        if in_set:
            key = f"--set {format_key(in_set[0])}"
            w = "command line"
        elif in_variant or (variant_raw is not None and not paths[0] and _has_path(variant_raw, ())):
            key = format_key(in_variant[0] if in_variant else (), f"variants[{vi}]")
            w = where
        else:
            loc = next((p for p in paths if _has_path(merged, p)), paths[0])
            key = format_key(loc) if loc else "(top level)"
            w = where
        probs.append((f"{w}: {key}", problem_message(e, _UNKNOWN_KEY_HINT)))
    return probs


def _folder_name_problem(name: str) -> str | None:
    """Why `name` (an experiment's or a variant's) cannot name its output folder, or None."""
    if not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        return f"{name!r}: use letters, digits, '-', '_' and '.' (not first): it names a folder"
    if len(name) > 200 or path_problem(name):
        return f"a name of {len(name)} characters: at most 200 (it names a folder)"
    return None


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> Experiment:
    """Read, merge and validate an experiment file. Raises ConfigError with every problem."""
    path = Path(path)
    where = str(path)
    raw = load_yaml(path, "experiment file")
    if not isinstance(raw, dict):
        raise ConfigError("an experiment file must be a mapping with name, workload and variants", where)
    problems: list[tuple[str, str]] = []
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        problems.append((f"{where}: name", "required: a non-empty string naming the experiment"))
        name = path.stem
    elif _folder_name_problem(name):
        problems.append((f"{where}: name", _folder_name_problem(name)))
    description = raw.get("description", "")
    variants_raw = raw.get("variants", [{"name": "base"}])
    # keys starting with "x-" hold YAML anchors for the variants to use (not settings)
    base = {k: v for k, v in raw.items()
            if k not in ("name", "description", "variants") and not str(k).startswith("x-")}
    set_over = parse_set(overrides or [])
    if not isinstance(variants_raw, list) or not variants_raw:
        problems.append((f"{where}: variants", "expected a non-empty list of {name: ..., <overrides>}"))
        variants_raw = [{"name": "base"}]
    variants: list[Variant] = []
    seen_names: set[str] = set()
    base_reported: set[str] = set()
    for i, v in enumerate(variants_raw):
        if not isinstance(v, dict):
            problems.append((f"{where}: variants[{i}]", "expected a mapping with a name"))
            continue
        vname = v.get("name")
        if not isinstance(vname, str) or not vname.strip():
            problems.append((f"{where}: variants[{i}].name", "required: a non-empty string"))
            vname = f"variant{i}"
        elif vname in seen_names:
            problems.append((f"{where}: variants[{i}].name", f"duplicate variant name {vname!r}"))
        elif _folder_name_problem(vname):
            problems.append((f"{where}: variants[{i}].name", _folder_name_problem(vname)))
        seen_names.add(vname)
        over = {k: val for k, val in v.items() if k != "name"}
        merged = deep_merge(deep_merge(base, over), set_over)
        try:
            cfg = RunConfig.model_validate(merged)
        except ValidationError as err:
            for p in _pydantic_problems(err, where, over, i, set_over, merged):
                if p[0].startswith(f"{where}: variants[") or p[0].startswith("command line"):
                    problems.append(p)
                elif p not in base_reported:  # shared settings: report once
                    base_reported.add(p)
                    problems.append(p)
            continue
        variants.append(Variant(vname, cfg, merged, i))
    if problems:
        # de-duplicate while keeping order
        seen = set()
        uniq = [p for p in problems if not (p in seen or seen.add(p))]
        raise ConfigError(uniq)
    return Experiment(path, name, description, variants)
