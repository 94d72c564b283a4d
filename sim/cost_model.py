"""Roofline cost model: the time of one engine iteration from model and hardware specs.

`RooflineCostModel` implements the `CostModel` protocol of sim/types.py: `price(shape)`
gives the seconds of one `IterationShape`, `decode_affine(...)` the price of a
generation-only iteration as ``fixed + per_kv * decode_kv_sum``, exactly (the engine
advances decode stretches in closed form from it). Every GPU operation is priced as
``max(FLOPs / F, bytes / B)`` at the hardware's achievable rates times the efficiencies
of `RooflineConfig` -- linears (or measured GEMM curves), lm_head and sampler, prefill and
decode attention, elementwise, a per-layer kernel floor, all-reduce -- and host terms
(launches by mode, the scheduler, the overlap scheduler) are added so that the price stays
affine in the KV length. A calibrated profile (sim/calibrate.py) is this model with fitted
parameters. `breakdown(shape)` gives seconds per term.

Precisions (the model's ``quant`` and ``kv_dtype``, sim/specs.py): a quantised model's
linears read their weights in its format with their scales and multiply at its
tensor-core rate (fp8, int8; int4 weight-only at the bf16 rate plus its dequantisation,
once per `int4_dequant_rows` rows); W8A8 inputs are read at one byte (quantised by the
kernel before, or by a kernel of their own: `act_quant_fused`); measured curves of the
precision (`gemm_times_by_precision`) price them, else the bf16 curves times the ratio of
the two rooflines; KV bytes everywhere are the KV dtype's. bf16 prices are bit-identical
to the code before precisions existed.

Parallelism: with ``tp`` GPUs every linear is priced at its per-GPU [k, n] (column- /
row-parallel, KV heads replicated when tp exceeds them) and two ring all-reduces a layer
over the GPU-to-GPU link (NVLink, or PCIe for a part without it); an MoE model's MLP is a
router and the experts a GPU holds (``ep`` expert groups, tokens dispatched and combined by
all-to-all); `work(shape)` is each GPU's FLOPs and bytes, which sharding conserves.
Pipelines: sim/pipeline.py builds on `stage_time`.

Every term and its reasons: docs/cost_model.md.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import replace
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from servesim.sim.kv_attention import (DecodeAttentionKernel, LongContextKernel, SplitBound, kernel_delta,
                                       long_context_delta, tuned_rows)
from servesim.sim.specs import HardwareSpec, ModelSpec, _kv_elem_bytes
from servesim.sim.types import IterationShape

GPU_TERMS = (
    "qkv",
    "o",
    "gate_up",
    "down",
    "lm_head",
    "sampler",
    "elementwise",
    "attn_prefill",
    "attn_decode",
    "attn_decode_kv",
    "kernel_floor",
    "allreduce",
    "router",
    "experts",
    "alltoall",
    "stage_transfer",
    "pipeline_bubble",
)
HOST_TERMS = ("host_launch", "scheduler")


class GemmCurve(BaseModel):
    """One decoder layer's GEMM of weight shape [k, n] (x[tokens, k] @ W^T -> [tokens, n]),
    measured: ``seconds[i]`` at ``tokens[i]`` rows (a calibration's GEMM sweep)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    k: int = Field(gt=0, description="input features")
    n: int = Field(gt=0, description="output features")
    tokens: list[int] = Field(min_length=1, description="row counts measured, strictly increasing, >= 1")
    seconds: list[float] = Field(min_length=1, description="seconds of one GEMM at each row count")

    @model_validator(mode="after")
    def _check(self):
        if len(self.tokens) != len(self.seconds):
            raise ValueError(f"{len(self.tokens)} token counts but {len(self.seconds)} times")
        if self.tokens[0] < 1 or any(b <= a for a, b in zip(self.tokens, self.tokens[1:])):
            raise ValueError("token counts must be >= 1 and strictly increasing")
        if min(self.seconds) <= 0:
            raise ValueError("GEMM times must be positive")
        return self


class _Curve:
    """A GemmCurve over all ``layers``: linear between the measured row counts, the first
    time below them, and beyond the last scaled with the rows (compute-bound there)."""

    __slots__ = ("m", "s", "layers")

    def __init__(self, c: GemmCurve, layers: int):
        self.m, self.s, self.layers = list(c.tokens), list(c.seconds), layers

    def __call__(self, t: int) -> float:
        m, s = self.m, self.s
        if t <= m[0]:
            return self.layers * s[0]
        if t >= m[-1]:
            return self.layers * s[-1] * t / m[-1]
        i = bisect_left(m, t)
        a, b = m[i - 1], m[i]
        return self.layers * (s[i - 1] + (s[i] - s[i - 1]) * (t - a) / (b - a))


LINEARS = ("qkv", "o", "gate_up", "down")  # a decoder layer's GEMMs


def _attn_shapes(model: ModelSpec, tp: int, ep: int) -> dict[str, tuple[int, int]]:
    """An MoE model's per-GPU linear shapes: attention and lm_head split over `tp` GPUs,
    one expert's gate_up / down over the tp / ep GPUs of its expert-parallel group."""
    mtp = tp // ep
    model.check_tp(mtp)  # the experts' split
    if model.num_heads % tp or (model.num_kv_heads % tp and tp % model.num_kv_heads):
        model.check_tp(tp)  # the attention's split: raises
    shapes = dict(model.linear_shapes(mtp))
    one = model.linear_shapes(1)
    d, hd = model.hidden_size, model.head_dim
    qg, kvg = model.num_heads // tp * hd, model.kv_heads_per_gpu(tp) * hd
    shapes.update(qkv=(d, qg + 2 * kvg), o=(qg, d), lm_head=(d, -(-one["lm_head"][1] // tp)))
    return shapes


class _Experts:
    """One GPU's share of every MoE layer's router and experts (the module doc's MoE).

    ``tp`` GPUs hold the layer; ``ep`` of them split the experts (``E / ep`` each), the
    ``tp / ep`` GPUs of a group split each expert's width. Of a batch of ``T`` tokens each
    routed to ``k`` of the ``E`` experts, a GPU computes ``copies(T)`` token-expert pairs:
    ``T * k`` without expert parallelism (every GPU a slice of every expert), else
    ``T * k / ep`` times `moe_load_imbalance` (the busiest GPU; at most ``T * min(k, E /
    ep)``). It reads the weights of the experts the batch hits, ``E / ep * (1 - (1 - k /
    E)^T)`` expected of its own (uniform routing). Each expert GEMM is ``max(FLOPs / F,
    bytes / B)`` (or the profile's curve of that shape, once per expert hit at its share of
    the copies); the router a [hidden, E] bf16 GEMM over the tokens a GPU holds (all of
    them; ``T / tp`` under expert parallelism, after the reduce-scatter)."""

    def __init__(self, model: ModelSpec, hw: HardwareSpec, cfg: RooflineConfig, tp: int, ep: int, B: float,
                 lin_time):
        L, d, b = model.num_layers, model.hidden_size, model.dtype_bytes
        E, k = model.num_experts, model.num_experts_per_tok
        q = model.quant
        self.E_g, self.p_miss = E // ep, 1.0 - k / E
        mtp = tp // ep
        ie = model.moe_intermediate_size // mtp
        self.copies_per_token = float(k) if ep == 1 else min(k * cfg.moe_load_imbalance / ep, float(min(k, E // ep)))
        rate = hw.matmul_rate(q.matmul)
        if rate is None:
            raise ValueError(f"{hw.name} has no {q.matmul} tensor cores for {q.label} weights")
        self.F, self.B, self.lin_time = rate * cfg.flops_efficiency, B, lin_time
        ab = 1 if q.quantizes_activations else b
        self.shapes = {"gate_up": (d, 2 * ie), "down": (ie, d)}
        # per GEMM, all layers: FLOPs per copy, weight bytes per expert hit, activation bytes per copy
        self.raw = {n: (L * 2.0 * K * N, L * float(q.weight_bytes(K, N, b)), L * float(K * ab + N * b))
                    for n, (K, N) in self.shapes.items()}
        measured = ((cfg.gemm_times_by_precision or {}).get(q.weights) if not q.is_bf16 else cfg.gemm_times) or {}
        self.curves = {n: _Curve(c, L) for n, c in measured.items()
                       if n in self.shapes and (c.k, c.n) == self.shapes[n]}
        # SiLU(gate) * up of each copy, the weighted sum of a token's k outputs
        self.elem_copy, self.elem_tok = L * float((3 * ie + d) * b), L * float(d * b)
        self.router_div = 1 if ep == 1 else tp
        self.router = (L * 2.0 * d * E, L * float(d * E * b), L * float(d * b + E * 4))
        self.Fbf = hw.achievable_bf16_flops * cfg.flops_efficiency

    def hits(self, T: int) -> float:
        """Expected experts of this GPU that at least one of `T` tokens is routed to."""
        return self.E_g * (1.0 - self.p_miss ** T)

    def copies(self, T: int) -> float:
        return T * self.copies_per_token

    def work(self, T: int) -> dict[str, tuple[float, float, float]]:
        """(FLOPs, weight bytes, activation bytes) of the router and of the experts."""
        if T <= 0:
            return {"router": (0.0, 0.0, 0.0), "experts": (0.0, 0.0, 0.0)}
        c, h = self.copies(T), self.hits(T)
        f = w = a = 0.0
        for cf, cw, ca in self.raw.values():
            f += cf * c
            w += cw * h
            a += ca * c
        tr = -(-T // self.router_div)
        rf, rw, ra = self.router
        return {"router": (rf * tr, rw, ra * tr), "experts": (f, w, a + self.elem_copy * c + self.elem_tok * T)}

    def times(self, T: int) -> tuple[float, float]:
        """Seconds of (the router, the experts) at `T` tokens, all layers."""
        if T <= 0:
            return 0.0, 0.0
        c, h = self.copies(T), self.hits(T)
        t = 0.0
        for n, (cf, cw, ca) in self.raw.items():
            cv = self.curves.get(n)
            if cv is not None:
                t += h * cv(c / h)
            else:
                t += self.lin_time(cf * c / self.F, (cw * h + ca * c) / self.B)
        t += (self.elem_copy * c + self.elem_tok * T) / self.B
        tr = -(-T // self.router_div)
        rf, rw, ra = self.router
        return self.lin_time(rf * tr / self.Fbf, (rw + ra * tr) / self.B), t

    def time(self, T: int) -> float:
        r, e = self.times(T)
        return r + e


def kv_dequant_s(elements: float, kv_bytes: float, dtype_bytes: float, rate: float | None) -> float:
    """Seconds the decode attention spends converting ``elements`` cached KV elements of
    ``kv_bytes`` each to the compute dtype (``dtype_bytes``): 0 for an unquantised cache or
    without a fitted rate."""
    return elements / rate if rate and kv_bytes < dtype_bytes else 0.0


class RooflineConfig(BaseModel):
    """Knobs of the roofline model. Defaults: pure roofline on the achievable rates."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # every float finite

    flops_efficiency: float = Field(1.0, gt=0, description="multiplies the hardware's achievable bf16 FLOP/s")
    bandwidth_efficiency: float = Field(1.0, gt=0, description="multiplies the achievable HBM bytes/s")
    kv_bandwidth_efficiency: float | None = Field(
        None, gt=0, description="the same for decode attention's KV-cache reads (paged, scattered blocks: "
        "a kernel of its own); null: bandwidth_efficiency"
    )
    attention_flops_efficiency: float = Field(
        1.0, gt=0, description="attention kernels' FLOP/s relative to the (scaled) matmul rate"
    )
    kv_dequant_elements_per_s: float | None = Field(
        None, gt=0, description="decode attention over a 1-byte KV cache (fp8 / int8): the KV elements per "
        "second the kernel converts to its dot dtype and consumes (e4m3 -> fp16 conversions, the dots, "
        "byte-sized tiles): its time per cached token is the larger of its bytes over the KV bandwidth and "
        "its elements over this rate (gpu_kv_fp8.py measured the fp8 kernel at 0.80-1.0x of bf16's, not "
        "0.5x). Fitted from the decode attention kernel alone per KV dtype (sim/kv_attention.py); null: "
        "bytes only"
    )
    decode_attention_kernel: DecodeAttentionKernel | None = Field(
        None, description="a calibrated profile's decode attention kernel alone per KV dtype and batch (sim "
        "calibrate, from the decode_attention_kv sweep; sim/kv_attention.py): the profile's per-KV-token term "
        "is its grid's KV dtype's, and a model of another KV dtype pays the kernel-alone difference at its "
        "batch on top (the rest of that term does not depend on the dtype); null: the bytes over the KV "
        "bandwidth (and kv_dequant_elements_per_s) for every dtype"
    )
    decode_attention_long: LongContextKernel | None = Field(
        None, description="a calibrated profile's decode attention kernel alone in the model's own KV dtype per "
        "decode batch, its per-token slope at short (<= 2k a request: the grid's decode rows) and at long (8-16k) "
        "contexts (sim calibrate, from the kv-long sweep; sim/kv_attention.py `long_context_delta`): a cached "
        "token costs the fitted rate plus the long - short difference at its batch (the kernel's split bound is "
        "tuned per batch; with few splits the longest sequences' programs set the time), never below its bytes "
        "at the achievable bandwidth; with its per_sm_token_s, a decode step's KV part is at least the kernel's "
        "split bound on the batch's longest sequence (sim/kv_attention.py `SplitBound`; "
        "IterationShape.decode_kv_max); null: the fitted rate at every batch"
    )
    prefill_attention_rows: int = Field(
        128, ge=0, description="query rows (tokens x the query heads of one KV head) one program of the prefill "
        "attention kernel holds (half of it when the iteration's chunks average at most twice that many tokens, "
        "the GPU backend's kernel's tile for short chunks). A chunk's last program walks the chunk's whole KV "
        "(cached + new) with them on one SM, so attention takes at least that long however few programs the "
        "chunk has (hardware num_sms). 0: no such bound"
    )
    prefill_attention_program_speed: float = Field(
        0.5, gt=0, description="one prefill attention program's speed relative to an SM's share of the attention "
        "rate (attention rate / num_sms): an SM needs several resident programs to reach its rate, a program alone "
        "gets part of it; a calibration fits it"
    )
    linear_ridge_exponent: float | None = Field(
        None, ge=1, description="a linear layer's time is (t_flops^p + t_bytes^p)^(1/p) with this p instead of "
        "max(t_flops, t_bytes): near the ridge point (tens to hundreds of tokens) a GEMM reaches neither "
        "roof, up to 2^(1/p) slower than the max (null: the max, the pure roofline; a calibration fits it)"
    )
    gemm_times: dict[Literal["qkv", "o", "gate_up", "down"], GemmCurve] | None = Field(
        None, description="measured seconds of a decoder layer's GEMMs by row count (a calibration's GEMM "
        "sweep: cuBLAS's tile and wave quantization, its small-M kernels); a linear whose [k, n] is the "
        "model's per-GPU shape is priced from its curve instead of max(FLOPs, bytes) (null: the roofline)"
    )
    gemm_times_by_precision: dict[Literal["fp8", "int8", "int4"],
                                  dict[Literal["qkv", "o", "gate_up", "down"], GemmCurve]] | None = Field(
        None, description="measured GEMM curves of quantised weights, by weight precision (fp8, int8: the GEMM "
        "of already-quantised inputs; int4: the fused dequantising GEMM); a quantised linear without one takes "
        "the bf16 curve (gemm_times) times the ratio of its roofline to bf16's at that row count"
    )
    int4_dequant_weights_per_s: float = Field(
        4.0e13, gt=0, description="int4 weight-only GEMMs: weights dequantised to bf16 per second (CUDA cores, "
        "beside the tensor cores' math and competing with it; an estimate, not measured)"
    )
    int4_dequant_rows: int = Field(
        64, gt=0, description="int4 weight-only GEMMs: rows (tokens) one dequantisation of a weight tile serves "
        "(the kernel's M tile): each further block of this many rows dequantises the weights again"
    )
    act_quant_fused: bool = Field(
        True, description="fp8 / int8 (W8A8): the kernel before each linear (norm, attention, SiLU) writes its "
        "input quantised (TensorRT-LLM's fusions: nothing but the GEMM's 1-byte read); false: a kernel of its own "
        "per linear reads the bf16 input and writes it quantised (bytes + act_quant_latency_s)"
    )
    act_quant_latency_s: float | None = Field(
        0.0, ge=0, description="act_quant_fused false: GPU time of the kernel that quantises one linear's input "
        "beyond its bytes, per linear and layer (0: its bytes only -- inside a CUDA graph the H200's measured "
        "decode deltas leave 0-2 us for a layer's four such kernels at up to 64 rows, "
        "benchmarks/results/quantization_fidelity.md; timed alone each shows 7-9 us, the cost of timing one "
        "kernel by itself); null: layer_latency_s / 11 (the floor of one of a layer's ~11 kernels)"
    )
    layer_latency_s: float = Field(
        0.0, ge=0, description="GPU time per decoder layer per iteration beyond its FLOPs and bytes: the floor "
        "of its ~11 small kernels and the gaps between them (0: pure roofline; a calibration fits it)"
    )
    host_overhead_eager_s: float | None = Field(
        None,
        ge=0,
        description="CPU time to launch one eager (no CUDA graph) forward; "
        "null: eager_launch_base_s + eager_launch_per_layer_s * num_layers",
    )
    eager_launch_per_layer_s: float = Field(
        60e-6, ge=0, description="~12 kernels per decoder layer at ~5 us of CPU launch time each"
    )
    eager_launch_base_s: float = Field(
        300e-6, ge=0, description="embedding, lm_head, sampler launches and input preparation"
    )
    eager_launch_overlaps_gpu: bool = Field(
        True, description="eager launches overlap the GPU work (max) instead of adding to it"
    )
    host_overhead_eager_decode_s: float = Field(
        0.0, ge=0, description="additional launch time of an eager iteration with generation requests: the "
        "decode attention's kernels (split and reduce) in every layer, which an eager pass over context chunks "
        "alone (a prompt, a draft model's pass over a joining prompt) does not launch. 0: host_overhead_eager_s "
        "is the launch time of every eager iteration (profiles fitted before the term)"
    )
    host_overhead_context_s: float = Field(
        0.0, ge=0, description="additional launch time of an eager iteration with context chunks (prefill "
        "attention beside or instead of decode attention, the concatenation of their outputs)"
    )
    context_launch_overlap: float = Field(
        1.0, ge=0, le=1, description="for eager iterations with context chunks: how much of the launch overhead "
        "hides under GPU work (1: max(gpu, host), 0: gpu + host); a calibration fits it"
    )
    host_overhead_graph_s: float = Field(
        40e-6, ge=0, description="per iteration with a CUDA graph: input copy + graph launch, serial"
    )
    host_overhead_piecewise_s: float | None = Field(
        None, ge=0, description="launch time of an iteration run as piecewise CUDA graphs (per layer a graph "
        "replay and the eager attention launches); null: eager_launch_base_s + piecewise_launch_per_layer_s * "
        "num_layers. Hides under GPU work like an eager context iteration's (context_launch_overlap)"
    )
    piecewise_launch_per_layer_s: float = Field(
        20e-6, ge=0, description="one graph replay and 2-3 attention kernels per decoder layer"
    )
    host_overhead_piecewise_decode_s: float = Field(
        0.0, ge=0, description="additional launch time of a piecewise-graph iteration with generation requests "
        "beside its chunks (the decode attention's kernels in every layer)"
    )
    scheduler_overhead_s: float = Field(
        300e-6, ge=0,
        description="host scheduling work per iteration (hides under the previous iteration's GPU work with the "
        "overlap scheduler)"
    )
    scheduler_overhead_per_request_s: float = Field(
        1e-6, ge=0, description="additional scheduling work per request in the batch"
    )
    scheduler_overhead_per_context_token_s: float = Field(
        0.0, ge=0, description="additional host work per new context token (its id, position and KV slot "
        "packed into the step's inputs); a calibration fits it"
    )
    allreduce_latency_s: float = Field(10e-6, ge=0, description="fixed cost of one collective between GPUs "
                                       "(tp > 1 all-reduce, expert-parallel all-to-all, pipeline stage send): "
                                       "launch and synchronisation")
    collective_step_latency_s: float = Field(
        0.5e-6, ge=0, description="latency of one step of a collective: a ring all-reduce over n GPUs takes "
        "2(n-1) steps, an all-to-all and a stage-to-stage send one")
    allreduce_bandwidth_efficiency: float = Field(
        0.8, gt=0, description="fraction of the GPU-to-GPU link's bytes/s (the hardware's nvlink_bytes_per_s, "
        "pcie_bytes_per_s without NVLink, network_bytes_per_s between servers) a collective reaches"
    )
    moe_load_imbalance: float = Field(
        1.0, ge=1, description="MoE with expert parallelism: tokens routed to the busiest GPU's experts over the "
        "mean (tokens x top-k / expert_parallel); the layer waits for that GPU (1: perfectly balanced routing; "
        "measured routings of Mixtral and Qwen3-MoE are typically 1.1-1.5 at large batch)"
    )


class RooflineCostModel:
    """Implements the ``CostModel`` protocol of ``sim/types.py`` (see the module doc)."""

    def __init__(
        self,
        model: ModelSpec,
        hw: HardwareSpec,
        cfg: RooflineConfig | None = None,
        tp: int = 1,
        cuda_graphs: bool = True,
        overlap_scheduler: bool = False,
        ep: int = 1,
        lm_head: bool = True,
    ):
        cfg = cfg if cfg is not None else RooflineConfig()
        if ep < 1 or (ep > 1 and (not model.is_moe or tp % ep or model.num_experts % ep)):
            raise ValueError(f"expert_parallel {ep} needs an MoE model whose experts it divides and a "
                             f"tensor_parallel it divides (policies/parallelism.py checks a layout)")
        self.model, self.hw, self.cfg, self.tp, self.ep = model, hw, cfg, tp, ep
        # The shape's `graph` flag decides how an iteration is priced; with
        # cuda_graphs=False a graph shape is an engine bug and raises ValueError.
        self.cuda_graphs = cuda_graphs
        self.overlap_scheduler = overlap_scheduler

        F = hw.achievable_bf16_flops * cfg.flops_efficiency
        Fa = F * cfg.attention_flops_efficiency
        self._Fa = Fa
        B = hw.achievable_hbm_bytes_per_s * cfg.bandwidth_efficiency
        b = model.dtype_bytes
        kvb = model.kv_elem_bytes  # KV-cache element bytes (bf16: b; fp8 / int8: 1)
        L = model.num_layers
        d = model.hidden_size
        hd = model.head_dim
        hg = model.num_heads // tp
        kvg = model.kv_heads_per_gpu(tp)
        shapes = _attn_shapes(model, tp, ep) if model.is_moe else model.linear_shapes(tp)
        moe = model.is_moe
        dense = ("qkv", "o") if moe else LINEARS  # the linears every token goes through
        self._dense = dense

        # Per linear over all layers: (s/token compute, s weights, s/token activations).
        self._lin: dict[str, tuple[float, float, float]] = {}
        # raw per-GPU work, all layers: (FLOPs per token, weight bytes, activation bytes per token)
        self._raw: dict[str, tuple[float, float, float]] = {}
        for k in dense:
            K, N = shapes[k]
            self._lin[k] = (L * 2.0 * K * N / F, L * float(K * N * b) / B, L * float((K + N) * b) / B)
            self._raw[k] = (L * 2.0 * K * N, L * float(K * N * b), L * float((K + N) * b))
        K, V = shapes["lm_head"]
        if not lm_head:  # a pipeline stage before the last: no lm_head, no sampler
            K = V = 0
        self._lin["lm_head"] = (2.0 * K * V / F, float(K * V * b) / B, float(K * b + V * 4) / B)
        self._raw["lm_head"] = (2.0 * K * V, float(K * V * b), float(K * b + V * 4))
        # measured GEMM curves where the profile has one for this per-GPU shape (tp changes it)
        gt = cfg.gemm_times or {}
        self._curves = {k: _Curve(gt[k], L) for k in dense
                        if k in gt and (gt[k].k, gt[k].n) == tuple(shapes[k])}
        self._lin_layers = tuple((*self._lin[k], self._curves.get(k)) for k in dense)
        self._sampler = V * 4.0 / B  # the sampler reads the fp32 logits
        if moe:
            per_layer_elem = 8 * d + 2 * (hg + kvg) * hd  # the experts' own: _Experts
        else:
            per_layer_elem = 8 * d + 2 * (hg + kvg) * hd + 3 * (model.intermediate_size // tp)
        self._elem = float((L * per_layer_elem + 4 * d + 2 * d) * b) / B
        # Prefill attention: flops per (query, key) pair, bytes per new / per prior token.
        self._ap_f = L * 4.0 * hd * hg / Fa
        self._ap_new = L * float((2 * hg * hd + 2 * kvg * hd) * b + 2 * kvg * hd * kvb) / B
        self._ap_prior = L * float(2 * kvg * hd * kvb) / B
        # longest-program bound: seconds per (query row x key) of one program at one SM's
        # share of the attention rate, all layers
        self._ap_rows = cfg.prefill_attention_rows if hw.num_sms else 0
        self._ap_prog = L * 4.0 * hd / (Fa / hw.num_sms * cfg.prefill_attention_program_speed) if hw.num_sms else 0.0
        # Decode attention: per request (Q in, O out, new K/V written), per cached token.
        self._ad_req = L * float(2 * hg * hd * b + 2 * kvg * hd * kvb) / B
        Bkv = B if cfg.kv_bandwidth_efficiency is None else hw.achievable_hbm_bytes_per_s * cfg.kv_bandwidth_efficiency
        # a profile's kernel table: its fitted per-token price is its grid's KV dtype's, another dtype's that
        # plus the kernel-alone difference (_decode_kv), never below its bytes at the achievable bandwidth
        self._kv_delta = kernel_delta(cfg.decode_attention_kernel, model.kv_dtype, L)
        if self._kv_delta is not None:
            kvb = _kv_elem_bytes(cfg.decode_attention_kernel.grid_kv_dtype, b)
            self._kv_floor = L * float(2 * kvg * hd * model.kv_elem_bytes) / hw.achievable_hbm_bytes_per_s
        self._ad_kv = L * max(4.0 * hd * hg / Fa, float(2 * kvg * hd * kvb) / Bkv,
                              kv_dequant_s(2 * kvg * hd, kvb, b, cfg.kv_dequant_elements_per_s))
        kvb = model.kv_elem_bytes
        # long contexts: the kernel's long - short per-token difference at a batch (None: none)
        self._kv_long = long_context_delta(cfg.decode_attention_long, model.kv_dtype, L)
        # the kernel's split bound: the longest sequence's programs (None: not priced; see decode_split)
        self._split = None
        if self._kv_long is not None:
            from servesim.kernels.tuning_table import table_for_device

            rows = tuned_rows(table_for_device(hw.device_names, hw.num_sms), hg // kvg, kvg, hd, model.kv_dtype)
            self._split = SplitBound.of(cfg.decode_attention_long, rows, kvg, hw.num_sms, L)
        self._kv_bytes_floor = L * float(2 * kvg * hd * kvb) / hw.achievable_hbm_bytes_per_s
        self._floor = L * cfg.layer_latency_s
        self._ridge_p = cfg.linear_ridge_exponent
        self._qlin = self._quantized_linears(model, hw, cfg, shapes, B) if not model.quant.is_bf16 else None
        self._moe = _Experts(model, hw, cfg, tp, ep, B, self._lin_time) if moe else None
        # All-reduce: 2 per layer (ring: 2(n-1) steps, 2(n-1)/n of the bytes over each GPU's
        # link); an MoE layer under expert parallelism replaces the second by the all-to-alls
        # (its reduce-scatter + all-gather around them: the bytes and steps of one all-reduce).
        link = hw.link_bytes_per_s * cfg.allreduce_bandwidth_efficiency
        n_ar = 1 if (moe and ep > 1) else 2
        if tp > 1:
            self._ar_fixed = n_ar * L * (cfg.allreduce_latency_s + 2 * (tp - 1) * cfg.collective_step_latency_s)
            self._ar_tok = n_ar * L * (2.0 * (tp - 1) / tp) * d * b / link
        else:
            self._ar_fixed = 0.0
            self._ar_tok = 0.0
        # All-to-all dispatch and combine (expert parallelism): each GPU receives the copies of
        # the tokens its experts were chosen for, all but its own share over the link.
        if moe and ep > 1:
            self._a2a_fixed = 2 * L * (cfg.allreduce_latency_s + cfg.collective_step_latency_s)
            self._a2a_tok = 2 * L * self._moe.copies_per_token * d * b * (tp - 1) / tp / link
        else:
            self._a2a_fixed = self._a2a_tok = 0.0
        # Host.
        self._host_eager = (
            cfg.host_overhead_eager_s
            if cfg.host_overhead_eager_s is not None
            else cfg.eager_launch_base_s + cfg.eager_launch_per_layer_s * L
        )
        self._host_ctx = cfg.host_overhead_context_s
        self._host_eager_dec = cfg.host_overhead_eager_decode_s
        self._eager_overlap = cfg.eager_launch_overlaps_gpu
        self._ctx_overlap = cfg.context_launch_overlap
        self._host_graph = cfg.host_overhead_graph_s
        self._host_pw_dec = cfg.host_overhead_piecewise_decode_s
        self._host_pw = (
            cfg.host_overhead_piecewise_s
            if cfg.host_overhead_piecewise_s is not None
            else cfg.eager_launch_base_s + cfg.piecewise_launch_per_layer_s * L
        )
        self._sched_fixed = cfg.scheduler_overhead_s
        self._sched_req = cfg.scheduler_overhead_per_request_s
        self._sched_tok = cfg.scheduler_overhead_per_context_token_s
        self._affine: dict[tuple[int, bool, int], tuple[float, float]] = {}
        self._pcie = hw.pcie_bytes_per_s  # per direction

    # ------------------------------------------------------------------------------
    def _quantized_linears(self, model: ModelSpec, hw: HardwareSpec, cfg: RooflineConfig,
                           shapes: dict[str, tuple[int, int]], B: float) -> dict[str, tuple]:
        """Per decoder linear of a quantised model, what `_qlin_time` prices it from."""
        q = model.quant
        rate = hw.matmul_rate(q.matmul)
        if rate is None:
            raise ValueError(f"{hw.name} has no {q.matmul} tensor cores for {q.label} weights "
                             "(sim/specs.py check_precision refuses such a run)")
        F = rate * cfg.flops_efficiency
        b, L = model.dtype_bytes, model.num_layers
        measured = (cfg.gemm_times_by_precision or {}).get(q.weights) or {}
        quant_lat = cfg.act_quant_latency_s if cfg.act_quant_latency_s is not None else cfg.layer_latency_s / 11
        out = {}
        for k in self._dense:
            K, N = shapes[k]
            # the GEMM reads the 1-byte input of a W8A8 scheme and its per-token fp32 scale, bf16 for
            # weight-only int4
            act = K + 4 + N * b if q.quantizes_activations else (K + N) * b
            cf, w, ca = L * 2.0 * K * N / F, L * float(q.weight_bytes(K, N, b)) / B, L * float(act) / B
            dq = L * K * N / cfg.int4_dequant_weights_per_s if q.weights == "int4" else 0.0
            # W8A8 unfused: a pass that reads the bf16 input and writes it quantised with a per-token fp32 scale
            x_fix, x_tok = ((L * quant_lat, L * float(K * b + K + 4) / B)
                            if q.quantizes_activations and not cfg.act_quant_fused else (0.0, 0.0))
            c = measured.get(k)
            if c is not None and (c.k, c.n) == (K, N):
                curve, scaled = _Curve(c, L), False
            else:
                curve, scaled = self._curves.get(k), True
            out[k] = (cf, w, ca, dq, x_fix, x_tok, curve, scaled, self._lin[k])
        return out

    def _qlin_time(self, k: str, T: int) -> float:
        """Seconds of quantised linear `k` (all layers) at `T` tokens: max(FLOPs at the
        precision's rate (+ int4 dequantisation), bytes of the quantised weights and the
        activations), or a measured curve (a bf16 curve scaled by the roofline ratio), plus
        the W8A8 input-quantisation pass."""
        if T <= 0:
            return 0.0
        cf, w, ca, dq, x_fix, x_tok, curve, scaled, bf = self._qlin[k]
        a = cf * T
        if dq:
            a += dq * -(-T // self.cfg.int4_dequant_rows)
        m = w + ca * T
        if curve is None:
            t = self._lin_time(a, m)
        elif scaled:
            t = curve(T) * self._lin_time(a, m) / self._lin_time(bf[0] * T, bf[1] + bf[2] * T)
        else:
            t = curve(T)
        return t + x_fix + x_tok * T

    def _qlin_sum(self, T: int) -> float:
        return sum(self._qlin_time(k, T) for k in self._dense)

    @property
    def host_overhead_eager_s(self) -> float:
        return self._host_eager

    def _lin_time(self, a: float, m: float) -> float:
        """A linear layer's time from its compute (a) and memory (m) times."""
        p = self._ridge_p
        if p is None:
            return a if a > m else m
        hi = a if a > m else m
        if hi <= 0.0:
            return 0.0
        lo = (m if a > m else a) / hi
        return hi * (1.0 + lo ** p) ** (1.0 / p)

    def _decode_kv(self, nd: int) -> tuple[float, float]:
        """(GPU seconds beside the KV, seconds per cached token) that decode attention over
        ``nd`` requests adds: (0, the fitted rate) without a kernel table for this KV dtype;
        plus the long-context kernel's per-token difference at ``nd`` where the profile has one."""
        if self._kv_delta is None:
            fixed, per = 0.0, self._ad_kv
        else:
            fixed, per = self._kv_delta(nd)
            per += self._ad_kv
            per = per if per > self._kv_floor else self._kv_floor
        if self._kv_long is not None:
            per += self._kv_long(nd)
            if per < self._kv_bytes_floor:
                per = self._kv_bytes_floor
        return fixed, per

    def decode_kv_rate(self, nd: int) -> float:
        """Seconds per cached token of decode attention over ``nd`` requests (all layers)."""
        return self._decode_kv(nd)[1]

    def decode_split(self, n_decode: int, graph: bool, padded_decode: int) -> tuple[float, float]:
        """(seconds per token of the longest sequence, ``IterationShape.decode_kv_max``; seconds
        per token of the KV sum) of the line decode attention's KV part lasts at least at this
        batch (all layers): the kernel's split bound (sim/kv_attention.py `SplitBound`, from a
        profile's long-context kernel and the tuning table the GPU runs); (0, 0) without one. A
        decode step's KV part is the larger of ``per_kv x decode_kv_sum`` and this line."""
        if self._split is None or n_decode <= 0:
            return 0.0, 0.0
        return self._split.rates(n_decode, self._decode_tokens(n_decode, graph, padded_decode))

    def _decode_kv_time(self, per_kv: float, shape: IterationShape, nd: int) -> float:
        """The KV part of decode attention: the KV sum streamed, or the split bound's line where
        the longest sequence's programs make it last longer."""
        t = per_kv * shape.decode_kv_sum
        if self._split is not None and shape.decode_kv_max:
            d, e = self._split.rates(shape.n_decode, nd)
            u = d * shape.decode_kv_max + e * shape.decode_kv_sum
            if u > t:
                return u
        return t

    def _gpu_rest(self, T: int, S: int, n_dec: int) -> float:
        """GPU time of everything but attention over cached/chunk tokens: linears,
        lm_head + sampler, elementwise, decode per-request attention, all-reduce."""
        t = 0.0
        if self._qlin is not None:
            t += self._qlin_sum(T)
        else:
            for cf, w, ca, cv in self._lin_layers:
                if cv is not None:
                    t += cv(T)
                    continue
                a = cf * T
                m = w + ca * T
                t += self._lin_time(a, m)
        if S:
            cf, w, ca = self._lin["lm_head"]
            a = cf * S
            m = w + ca * S
            t += self._lin_time(a, m) + self._sampler * S
        t += self._elem * T + self._ad_req * n_dec + self._floor
        if self._ar_tok:
            t += self._ar_fixed + self._ar_tok * T
        if self._moe is not None:
            t += self._moe.time(T) + self._a2a_fixed + self._a2a_tok * T
        return t

    def _launch(self, gpu_rest: float, graph: bool, context: bool, piecewise: bool = False,
                with_decode: bool = False) -> float:
        """Host launch time not hidden under the GPU's work."""
        if graph:
            return self._host_graph
        if piecewise:
            h = self._host_pw
            if with_decode:
                h += self._host_pw_dec
        else:
            h = self._eager_work(context, with_decode)
        if not self._eager_overlap:
            return h
        hidden = gpu_rest if gpu_rest < h else h
        return h - (self._ctx_overlap * hidden if context else hidden)

    def _host_work(self, graph: bool, context: bool, piecewise: bool, with_decode: bool) -> float:
        """The host's whole launch work for an iteration (none of it hidden)."""
        if graph:
            return self._host_graph
        if piecewise:
            return self._host_pw + self._host_pw_dec if with_decode else self._host_pw
        return self._eager_work(context, with_decode)

    def _eager_work(self, context: bool, with_decode: bool) -> float:
        """An eager iteration's launch work: the common kernels, the prefill attention's beside
        context chunks, the decode attention's beside generation requests (an iteration without
        chunks always has them)."""
        h = self._host_eager + self._host_ctx if context else self._host_eager
        return h + self._host_eager_dec if (with_decode or not context) else h

    def _sched(self, n_requests: int, ctx_tokens: int) -> float:
        return self._sched_fixed + self._sched_req * n_requests + self._sched_tok * ctx_tokens

    def _total(self, gpu_rest: float, gpu_kv: float, graph: bool, n_requests: int, context: bool = False,
               piecewise: bool = False, with_decode: bool = False, ctx_tokens: int = 0) -> float:
        sched = self._sched(n_requests, ctx_tokens)
        if self.overlap_scheduler:
            # the host schedules, prepares and launches this iteration while the GPU runs the
            # previous one: the step is the longer of the two (the host's part hiding under
            # gpu_rest only, so a decode step stays affine in decode_kv_sum)
            host = self._host_work(graph, context, piecewise, with_decode) + sched
            return (gpu_rest if gpu_rest > host else host) + gpu_kv
        return gpu_rest + self._launch(gpu_rest, graph, context, piecewise, with_decode) + gpu_kv + sched

    @staticmethod
    def _decode_tokens(n: int, graph: bool, padded: int) -> int:
        return padded if (graph and n > 0 and padded > n) else n

    def _longest_program(self, ctx: tuple[int, ...], prior: tuple[int, ...]) -> float:
        """Seconds of the prefill attention's longest program: the last query tile of the
        chunk with the most KV, walking it all on one SM (the GPU's time is at least that,
        however few programs the iteration has)."""
        rows = self._ap_rows
        if sum(ctx) <= 2 * rows * len(ctx):
            rows //= 2
        return self._ap_prog * rows * max(c + p for c, p in zip(ctx, prior))

    # --- CostModel protocol --------------------------------------------------------
    def decode_affine(self, n_decode: int, graph: bool, padded_decode: int) -> tuple[float, float]:
        """(fixed_s, per_kv_token_s) with price(shape) == fixed + per_kv * decode_kv_sum
        for every generation-only shape (no context chunks) of this (n, graph, padded)."""
        key = (n_decode, graph, padded_decode)
        r = self._affine.get(key)
        if r is not None:
            return r
        if graph and not self.cuda_graphs:
            raise ValueError("a CUDA-graph iteration priced by a cost model built with cuda_graphs=False")
        if n_decode <= 0:
            r = (0.0, 0.0)
        else:
            nd = self._decode_tokens(n_decode, graph, padded_decode)
            dfix, per_kv = self._decode_kv(nd)
            fixed = self._total(max(self._gpu_rest(nd, nd, nd) + dfix, 0.0), 0.0, graph, n_decode)
            r = (fixed, per_kv)
        self._affine[key] = r
        return r

    def price(self, shape: IterationShape) -> float:
        """Seconds for one iteration of this shape (plus host->GPU KV copies, serial:
        the blocks must be back before the attention that reads them)."""
        if shape.host_to_gpu_bytes or shape.gpu_to_host_bytes:
            return self._price(shape) + (shape.host_to_gpu_bytes + shape.gpu_to_host_bytes) / self._pcie
        return self._price(shape)

    def _price(self, shape: IterationShape) -> float:
        if shape.decode_draft_tokens:
            return self._price_verify(shape)
        ctx = shape.ctx_new_tokens
        if not ctx:
            r = self._affine.get((shape.n_decode, shape.graph, shape.padded_decode))
            if r is None:
                r = self.decode_affine(shape.n_decode, shape.graph, shape.padded_decode)
            if self._split is not None and shape.decode_kv_max and shape.n_decode:
                return r[0] + self._decode_kv_time(r[1], shape, self._decode_tokens(shape.n_decode, shape.graph,
                                                                                     shape.padded_decode))
            return r[0] + r[1] * shape.decode_kv_sum
        n = shape.n_decode
        graph = shape.graph
        if graph and not self.cuda_graphs:
            raise ValueError("a CUDA-graph iteration priced by a cost model built with cuda_graphs=False")
        nd = shape.padded_decode if (graph and n > 0 and shape.padded_decode > n) else n
        ap_f, ap_new, ap_prior = self._ap_f, self._ap_new, self._ap_prior
        T = nd
        attn = 0.0
        for c, p in zip(ctx, shape.ctx_prior_tokens):
            T += c
            f = ap_f * (c * p + ((c * (c + 1)) >> 1))
            m = ap_new * c + ap_prior * p
            attn += f if f > m else m
        if T == 0:
            return 0.0
        if self._ap_rows:
            longest = self._longest_program(ctx, shape.ctx_prior_tokens)
            if longest > attn:
                attn = longest
        S = shape.n_ctx_sampling + nd
        ct = T - nd  # context tokens
        # Inlined _gpu_rest (price is the hot path); piecewise graphs pad the token-wise
        # work (not attention, not the sampled rows) to their captured size.
        pw = shape.piecewise_tokens
        t = attn + self._ad_req * nd + self._floor
        if pw > T:
            T = pw
        t += self._elem * T
        lin = self._lin_time if self._ridge_p is not None else None  # the pure max inline: the hot path
        if self._qlin is not None:
            t += self._qlin_sum(T)
        else:
            for cf, w, ca, cv in self._lin_layers:
                if cv is not None:
                    t += cv(T)
                    continue
                a = cf * T
                m = w + ca * T
                t += (a if a > m else m) if lin is None else lin(a, m)
        if S:
            cf, w, ca = self._lin["lm_head"]
            a = cf * S
            m = w + ca * S
            t += ((a if a > m else m) if lin is None else lin(a, m)) + self._sampler * S
        if self._ar_tok:
            t += self._ar_fixed + self._ar_tok * T
        if self._moe is not None:
            t += self._moe.time(T) + self._a2a_fixed + self._a2a_tok * T
        if n and (self._kv_delta is not None or self._kv_long is not None):
            dfix, per_kv = self._decode_kv(nd)
            return self._total(max(t + dfix, 0.0), self._decode_kv_time(per_kv, shape, nd), graph, len(ctx) + n,
                               True, pw > 0, True, ct)
        return self._total(t, self._ad_kv * shape.decode_kv_sum if n else 0.0, graph, len(ctx) + n, True, pw > 0,
                           n > 0, ct)

    def _price_verify(self, shape: IterationShape) -> float:
        """An iteration whose generation requests carry draft tokens to verify: every
        verified position is a token of the linears and a sampled row, and attends to its
        request's cached KV, which is read once for all its positions (memory-bound
        decode attention with 1 + k queries; its FLOPs grow with the queries)."""
        D = shape.decode_draft_tokens
        n = shape.n_decode
        base = replace(shape, decode_draft_tokens=0, draft_steps=0)
        if not n:
            return self._price(base)
        nd = self._decode_tokens(n, shape.graph, shape.padded_decode)
        T = sum(shape.ctx_new_tokens) + nd
        extra = 0.0
        if self._qlin is not None:
            extra += self._qlin_sum(T + D) - self._qlin_sum(T)
        for cf, w, ca, cv in (self._lin_layers if self._qlin is None else ()):  # the linears' extra at T + D tokens
            if cv is not None:
                extra += cv(T + D) - cv(T)
            else:
                extra += self._lin_time(cf * (T + D), w + ca * (T + D)) - self._lin_time(cf * T, w + ca * T)
        S = shape.n_ctx_sampling + nd
        cf, w, ca = self._lin["lm_head"]
        extra += self._lin_time(cf * (S + D), w + ca * (S + D)) - self._lin_time(cf * S, w + ca * S)
        extra += self._sampler * D + self._elem * D + self._ad_req * D
        if self._ar_tok:
            extra += self._ar_tok * D
        if self._moe is not None:
            extra += self._moe.time(T + D) - self._moe.time(T) + self._a2a_tok * D
        # attention over the cached tokens with q = 1 + D/n queries per request
        q = 1.0 + D / n
        L = self.model.num_layers
        hd = self.model.head_dim
        hg = self.model.num_heads // self.tp
        flops_kv = L * q * 4.0 * hd * hg / self._Fa
        extra += max(flops_kv - self._decode_kv(nd)[1], 0.0) * shape.decode_kv_sum
        return self._price(base) + extra

    # --- debugging / plots ---------------------------------------------------------
    def breakdown(self, shape: IterationShape) -> dict[str, float]:
        """Seconds per term (keys GPU_TERMS + HOST_TERMS); they sum to price(shape).
        ``host_launch`` is the part of the launch overhead not hidden under GPU work."""
        if shape.graph and not self.cuda_graphs:
            raise ValueError("a CUDA-graph iteration priced by a cost model built with cuda_graphs=False")
        out = dict.fromkeys(GPU_TERMS + HOST_TERMS, 0.0)
        n = shape.n_decode
        nd = self._decode_tokens(n, shape.graph, shape.padded_decode)
        T = sum(shape.ctx_new_tokens) + nd
        if T == 0:
            return out
        S = shape.n_ctx_sampling + nd
        pw = shape.piecewise_tokens if shape.ctx_new_tokens else 0
        T = max(T, pw)

        def lin(coef: tuple[float, float, float], tokens: int) -> float:
            cf, w, ca = coef
            return self._lin_time(cf * tokens, w + ca * tokens) if tokens else 0.0

        for k in self._dense:
            cv = self._curves.get(k)
            if self._qlin is not None:
                out[k] = self._qlin_time(k, T)
            else:
                out[k] = cv(T) if cv is not None else lin(self._lin[k], T)
        if self._moe is not None:
            out["router"], out["experts"] = self._moe.times(T)
            out["alltoall"] = self._a2a_fixed + self._a2a_tok * T
        out["lm_head"] = lin(self._lin["lm_head"], S)
        out["sampler"] = self._sampler * S
        out["elementwise"] = self._elem * T
        out["attn_prefill"] = sum(
            max(self._ap_f * (c * p + c * (c + 1) // 2), self._ap_new * c + self._ap_prior * p)
            for c, p in zip(shape.ctx_new_tokens, shape.ctx_prior_tokens)
        ) + 0.0
        if self._ap_rows and shape.ctx_new_tokens:
            out["attn_prefill"] = max(out["attn_prefill"],
                                      self._longest_program(shape.ctx_new_tokens, shape.ctx_prior_tokens))
        dfix, per_kv = self._decode_kv(nd) if n else (0.0, 0.0)
        out["attn_decode"] = self._ad_req * nd + dfix
        out["attn_decode_kv"] = self._decode_kv_time(per_kv, shape, nd) if n else 0.0
        out["kernel_floor"] = self._floor
        out["allreduce"] = self._ar_fixed + self._ar_tok * T if self._ar_tok else 0.0
        gpu_rest = sum(out[k] for k in GPU_TERMS if k != "attn_decode_kv")
        ctx = bool(shape.ctx_new_tokens)
        sched = self._sched(len(shape.ctx_new_tokens) + n, sum(shape.ctx_new_tokens))
        if self.overlap_scheduler:  # what of the host's work shows past gpu_rest, split pro rata
            h = self._host_work(shape.graph, ctx, pw > 0, n > 0)
            shown = max(h + sched - gpu_rest, 0.0)
            out["host_launch"] = shown * h / (h + sched) if h + sched else 0.0
            out["scheduler"] = shown - out["host_launch"]
        else:
            out["host_launch"] = self._launch(gpu_rest, shape.graph, ctx, pw > 0, n > 0)
            out["scheduler"] = sched
        return out

    def stage_time(self, shape: IterationShape) -> tuple[float, float, dict[str, float]]:
        """(seconds but the decode KV reads, seconds of the decode KV reads, the breakdown)
        of `shape` on this model's GPUs with no scheduler: a pipeline stage's part of an
        iteration (sim/pipeline.py). The launch overhead not hidden under the GPU's work is
        in the first."""
        bd = self.breakdown(shape)
        kv = bd["attn_decode_kv"]
        return sum(v for k, v in bd.items() if k not in ("attn_decode_kv", "scheduler")), kv, bd

    def scheduler_time(self, n_requests: int, ctx_tokens: int) -> float:
        """The host's scheduling work of an iteration of `n_requests` (`ctx_tokens` new context tokens)."""
        return self._sched(n_requests, ctx_tokens)

    def launch_work(self, shape: IterationShape) -> float:
        """The host's whole launch work for an iteration of `shape`, none of it hidden
        (`breakdown`'s ``host_launch`` is the part of it the GPU's work does not hide)."""
        ctx = bool(shape.ctx_new_tokens)
        return self._host_work(shape.graph, ctx, ctx and shape.piecewise_tokens > 0, shape.n_decode > 0)

    def work(self, shape: IterationShape) -> dict[str, tuple[float, float, float, float]]:
        """Per GPU: (FLOPs, weight bytes, KV-cache bytes, activation bytes) of each GPU term
        of `shape` that moves data or computes (linears, lm_head, attention, router,
        experts) -- what the roofline terms price; ``sharding conserves the work``: summed
        over the tp GPUs the FLOPs and the weight and KV bytes are the unsharded model's
        plus the replicated KV heads and padded vocabulary (the replicated hidden state's
        activations are read on every GPU)."""
        out: dict[str, tuple[float, float, float, float]] = {}
        n = shape.n_decode
        nd = self._decode_tokens(n, shape.graph, shape.padded_decode)
        T = sum(shape.ctx_new_tokens) + nd
        S = shape.n_ctx_sampling + nd
        m = self.model
        L, hd, b, kvb = m.num_layers, m.head_dim, m.dtype_bytes, m.kv_elem_bytes
        hg, kvg = m.num_heads // self.tp, m.kv_heads_per_gpu(self.tp)
        for k in self._dense:
            cf, w, ca = self._raw[k]
            if self._qlin is not None:  # the quantised weights' bytes
                K, N = (self.model.linear_shapes(self.tp) if not m.is_moe else _attn_shapes(m, self.tp, self.ep))[k]
                w = L * float(m.quant.weight_bytes(K, N, b))
            out[k] = (cf * T, w if T else 0.0, 0.0, ca * T)
        cf, w, ca = self._raw["lm_head"]
        out["lm_head"] = (cf * S, w if S else 0.0, 0.0, ca * S)
        f = kvr = act = 0.0
        for c, p in zip(shape.ctx_new_tokens, shape.ctx_prior_tokens):
            f += L * 4.0 * hd * hg * (c * p + c * (c + 1) / 2)
            kvr += L * float(2 * kvg * hd * kvb) * (c + p)  # new K/V written, cached read
            act += L * float(2 * hg * hd * b + 2 * kvg * hd * b) * c
        out["attn_prefill"] = (f, 0.0, kvr, act)
        kv = shape.decode_kv_sum if n else 0
        out["attn_decode"] = (L * 4.0 * hd * hg * kv, 0.0, L * float(2 * kvg * hd * kvb) * (kv + nd),
                              L * float(2 * hg * hd * b) * nd)
        if self._moe is not None:
            for k, (f, w, a) in self._moe.work(T).items():
                out[k] = (f, w, 0.0, a)
        return out

    def gpu_time(self, shape: IterationShape) -> float:
        """GPU work only (no host or scheduler overhead)."""
        bd = self.breakdown(shape)
        return sum(bd[k] for k in GPU_TERMS)


__all__ = ["GemmCurve", "RooflineConfig", "RooflineCostModel", "GPU_TERMS", "HOST_TERMS", "LINEARS"]
