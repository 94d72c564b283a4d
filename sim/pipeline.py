"""Pipeline parallelism: the price of an iteration on ``pp`` stages of ``L / pp`` layers.

`PipelineCostModel` implements the ``CostModel`` protocol (sim/types.py) for a replica
of ``tp * pp`` GPUs. Its model of TensorRT-LLM's pipeline-parallel executor:

* **Micro-batches.** The engine's iteration (every scheduled request advances: a context
  chunk, or one generated token) runs as ``m = min(micro_batches, requests)`` micro-batches
  of disjoint requests (``micro_batches`` defaults to ``pp``: TensorRT-LLM keeps ``pp``
  micro-batches in flight, so that in steady state every stage works on another one).
  Context chunks go largest first to the micro-batch with the fewest tokens, then the
  generation requests one by one to the one with the fewest; the decode KV the shape
  sums (``decode_kv_sum``) is shared in proportion to the generation requests (the shape
  does not say whose KV is longer), a CUDA graph's padding likewise, and the chunks that
  sample a token are the first ``n_ctx_sampling`` ones.
* **Stages.** Stage ``s`` of micro-batch ``j`` takes ``tau[s][j]``: the roofline price of
  that micro-batch on ``L / pp`` layers split over ``tp`` GPUs (sim/cost_model.py, its GPU
  work and the launch overhead it does not hide, no scheduler); only the last stage runs
  lm_head and the sampler. Between stages the micro-batch's hidden states (``tokens x
  hidden`` in the serving dtype; each TP rank sends its full copy to its peer, in
  parallel) cross the link -- NVLink (or PCIe) inside a server, ``network_bytes_per_s``
  when the stage boundary is between servers -- in ``delta = collective latency + one step
  + bytes / (link x allreduce_bandwidth_efficiency)``; the sampled tokens go back from the
  last stage to the first in one latency.
* **The iteration** is the pipeline's steady-state period:
  ``period = max(max_s sum_j tau[s][j], max_j (sum_s tau[s][j] + transfers_j))`` -- the
  busiest stage working through every micro-batch, or one micro-batch's round trip through
  every stage (its next token needs this one: the autoregressive dependency). With ``m =
  pp`` equal micro-batches the two nearly agree and every stage is busy; with fewer
  requests than stages (``m < pp``) the round trip dominates and stages idle (the
  pipeline bubble, ``1 - sum_s sum_j tau / (pp x period)``). Every request in the batch
  emits one token per period, so the engine's iteration time *is* each request's
  inter-token latency and ``requests / period`` its throughput: the two are one number.
  The host schedules the whole batch once per iteration (``scheduler_overhead_*``), added
  to the period (hidden under it with the overlap scheduler).
* **Decode stretches** (the engine's closed form): for a generation-only shape the price
  is ``fixed + per_kv * decode_kv_sum`` with ``fixed`` the larger of the two bounds' fixed
  parts and ``per_kv`` the larger of their slopes -- exactly the period when the requests
  split evenly into ``pp`` micro-batches (both slopes are then the full model's KV cost
  over ``pp``), and an upper bound on it otherwise.

Speculative decoding on a pipeline is not modelled (refused by the run's checks).
"""

from __future__ import annotations

import heapq
from dataclasses import replace

from servesim.policies.parallelism import Layout

from .cost_model import GPU_TERMS, HOST_TERMS, RooflineConfig, RooflineCostModel
from .specs import HardwareSpec, ModelSpec
from .types import IterationShape


class PipelineCostModel:
    """Implements the ``CostModel`` protocol of ``sim/types.py`` (see the module doc)."""

    def __init__(self, model: ModelSpec, hw: HardwareSpec, cfg: RooflineConfig | None, layout: Layout,
                 cuda_graphs: bool = True, overlap_scheduler: bool = False):
        cfg = cfg if cfg is not None else RooflineConfig()
        pp = layout.pp
        if pp < 2 or model.num_layers % pp:
            raise ValueError(f"a pipeline of {pp} stages for {model.num_layers} layers (policies/parallelism.py "
                             "checks a layout)")
        self.model, self.hw, self.cfg, self.layout = model, hw, cfg, layout
        self.pp, self.m = pp, layout.num_micro_batches
        self.cuda_graphs, self.overlap_scheduler = cuda_graphs, overlap_scheduler
        stage = replace(model, num_layers=model.num_layers // pp)
        kw = dict(tp=layout.tp, ep=layout.ep, cuda_graphs=cuda_graphs, overlap_scheduler=False)
        self.mid = RooflineCostModel(stage, hw, cfg, lm_head=False, **kw)
        self.last = RooflineCostModel(stage, hw, cfg, lm_head=True, **kw)
        # stage boundaries: (latency, seconds per token) each; GPUs of stage s are
        # [s * tp, (s + 1) * tp), servers of gpus_per_node
        lat = cfg.allreduce_latency_s + cfg.collective_step_latency_s
        act = model.hidden_size * model.dtype_bytes
        gpn, tp = hw.gpus_per_node, layout.tp
        self._hops = []
        for s in range(pp - 1):
            cross = (s * tp) // gpn != ((s + 1) * tp) // gpn
            link = (hw.network_bytes_per_s if cross and hw.network_bytes_per_s else hw.link_bytes_per_s)
            self._hops.append((lat, act / (link * cfg.allreduce_bandwidth_efficiency)))
        self._back = lat  # the sampled tokens, last stage to first
        self._pcie = hw.pcie_bytes_per_s
        self._affine: dict[tuple[int, bool, int], tuple[float, float]] = {}

    # --- splitting ------------------------------------------------------------------
    def split(self, shape: IterationShape) -> list[IterationShape]:
        """The iteration's micro-batches (module doc)."""
        chunks = list(zip(shape.ctx_new_tokens, shape.ctx_prior_tokens))
        n = shape.n_decode
        items = len(chunks) + n
        m = max(1, min(self.m, items))
        if m == 1:
            return [shape]
        ctx: list[list[int]] = [[] for _ in range(m)]
        dec = [0] * m
        heap = [(0, j) for j in range(m)]
        for i in sorted(range(len(chunks)), key=lambda i: (-chunks[i][0], i)):
            tok, j = heapq.heappop(heap)
            ctx[j].append(i)
            heapq.heappush(heap, (tok + chunks[i][0], j))
        if n:
            if not chunks:
                dec = [n // m + (j < n % m) for j in range(m)]
            else:
                for _ in range(n):
                    tok, j = heapq.heappop(heap)
                    dec[j] += 1
                    heapq.heappush(heap, (tok + 1, j))
        T = shape.num_tokens
        out = []
        cum = 0
        for j in range(m):
            idx = sorted(ctx[j])
            nj = dec[j]
            # the KV in proportion to the requests (cumulative rounding: the sums add up, each
            # micro-batch within one token of its share)
            kv = (shape.decode_kv_sum * (cum + nj) // n - shape.decode_kv_sum * cum // n) if n else 0
            cum += nj
            graph = shape.graph and nj > 0
            pad = -(-shape.padded_decode * nj // n) if graph and shape.padded_decode else 0
            tj = sum(chunks[i][0] for i in idx) + nj
            pw = max(-(-shape.piecewise_tokens * tj // T), tj) if shape.piecewise_tokens and idx else 0
            out.append(IterationShape(
                ctx_new_tokens=tuple(chunks[i][0] for i in idx), ctx_prior_tokens=tuple(chunks[i][1] for i in idx),
                n_ctx_sampling=sum(1 for i in idx if i < shape.n_ctx_sampling), n_decode=nj, decode_kv_sum=kv,
                graph=graph, padded_decode=max(pad, nj) if graph else 0, piecewise_tokens=pw))
        return out

    # --- the period --------------------------------------------------------------------
    def _stages(self, mb: IterationShape):
        """(per stage: (fixed s, kv s, breakdown)) of one micro-batch, first to last."""
        a = self.mid.stage_time(mb)
        return [a] * (self.pp - 1) + [self.last.stage_time(mb)]

    def _transfer(self, mb: IterationShape) -> float:
        nd = mb.padded_decode if mb.graph and mb.padded_decode > mb.n_decode else mb.n_decode
        T = sum(mb.ctx_new_tokens) + nd
        return sum(lat + per * T for lat, per in self._hops) + self._back

    def _bounds(self, mbs: list[IterationShape]):
        """(resource bound, cycle bound, stage busy times, transfers of the critical micro-batch, per-mb stages)."""
        st = [self._stages(mb) for mb in mbs]
        tr = [self._transfer(mb) for mb in mbs]
        busy = [sum(st[j][s][0] + st[j][s][1] for j in range(len(mbs))) for s in range(self.pp)]
        cyc = [sum(a + k for a, k, _ in st[j]) + tr[j] for j in range(len(mbs))]
        jc = max(range(len(mbs)), key=lambda j: cyc[j])
        return max(busy), cyc[jc], busy, tr[jc], st

    def _sched(self, shape: IterationShape) -> float:
        return self.last.scheduler_time(len(shape.ctx_new_tokens) + shape.n_decode, sum(shape.ctx_new_tokens))

    def _with_host(self, period: float, sched: float) -> float:
        if self.overlap_scheduler:
            return period if period > sched else sched
        return period + sched

    # --- CostModel protocol -----------------------------------------------------------
    def decode_affine(self, n_decode: int, graph: bool, padded_decode: int) -> tuple[float, float]:
        key = (n_decode, graph, padded_decode)
        r = self._affine.get(key)
        if r is not None:
            return r
        if graph and not self.cuda_graphs:
            raise ValueError("a CUDA-graph iteration priced by a cost model built with cuda_graphs=False")
        if n_decode <= 0:
            r = (0.0, 0.0)
        else:
            base = IterationShape(n_decode=n_decode, decode_kv_sum=0, graph=graph, padded_decode=padded_decode)
            mbs = self.split(base)
            st = [self._stages(mb) for mb in mbs]
            m = len(mbs)
            fixed_r = max(sum(st[j][s][0] for j in range(m)) for s in range(self.pp))
            fixed_c = max(sum(a for a, _, _ in st[j]) + self._transfer(mbs[j]) for j in range(m))
            n_max = max(mb.n_decode for mb in mbs)
            ckv = self.mid.decode_kv_rate(n_max)  # every stage's seconds per KV token (L / pp layers)
            slope = max(ckv, self.pp * ckv * n_max / n_decode)
            sched = self._sched(base)
            fixed = max(fixed_r, fixed_c)
            r = (self._with_host(fixed, sched), slope)
        self._affine[key] = r
        return r

    def decode_split(self, n_decode: int, graph: bool, padded_decode: int) -> tuple[float, float]:
        """None: a pipeline's stages are priced on shares of the KV sum (the split bound is not)."""
        return 0.0, 0.0

    def price(self, shape: IterationShape) -> float:
        extra = (shape.host_to_gpu_bytes + shape.gpu_to_host_bytes) / self._pcie \
            if shape.host_to_gpu_bytes or shape.gpu_to_host_bytes else 0.0
        if shape.decode_draft_tokens:
            raise ValueError("speculative decoding on a pipeline is not modelled")
        if not shape.ctx_new_tokens:
            fixed, per_kv = self.decode_affine(shape.n_decode, shape.graph, shape.padded_decode)
            return fixed + per_kv * shape.decode_kv_sum + extra
        if shape.graph and not self.cuda_graphs:
            raise ValueError("a CUDA-graph iteration priced by a cost model built with cuda_graphs=False")
        r, c, _, _, _ = self._bounds(self.split(shape))
        return self._with_host(r if r > c else c, self._sched(shape)) + extra

    def breakdown(self, shape: IterationShape) -> dict[str, float]:
        """Seconds per term (GPU_TERMS + HOST_TERMS) summing to the price (without host
        copies): the mean stage's busy time by term, ``stage_transfer`` the critical
        micro-batch's transfers where its round trip sets the period, ``pipeline_bubble`` the
        rest of the period that the mean stage idles, ``scheduler`` what the host adds."""
        out = dict.fromkeys(GPU_TERMS + HOST_TERMS, 0.0)
        if shape.num_tokens == 0:
            return out
        total = self.price(shape) - ((shape.host_to_gpu_bytes + shape.gpu_to_host_bytes) / self._pcie)
        mbs = self.split(shape)
        r, c, busy, tr, st = self._bounds(mbs)
        for stages in st:
            for _, _, bd in stages:
                for k, v in bd.items():
                    if k != "scheduler":
                        out[k] += v / self.pp
        if not shape.ctx_new_tokens:  # the closed form's period (module doc)
            period = total - (0.0 if self.overlap_scheduler else self._sched(shape))
            if self.overlap_scheduler:
                period = min(period, max(r, c))
        else:
            period = max(r, c)
        mean_busy = sum(busy) / self.pp
        idle = max(period - mean_busy, 0.0)
        out["stage_transfer"] = min(tr, idle) if c >= r else 0.0
        out["pipeline_bubble"] = idle - out["stage_transfer"]
        out["scheduler"] = total - sum(v for k, v in out.items() if k != "scheduler")
        return out

    def gpu_time(self, shape: IterationShape) -> float:
        bd = self.breakdown(shape)
        return sum(bd[k] for k in GPU_TERMS)

    def bubble_fraction(self, shape: IterationShape) -> float:
        """Share of the stages' time idle in this iteration's period (0: every stage busy)."""
        mbs = self.split(shape)
        r, c, busy, _, _ = self._bounds(mbs)
        period = max(r, c)
        return 1.0 - sum(busy) / (self.pp * period) if period > 0 else 0.0


__all__ = ["PipelineCostModel"]


def run_layout(cfg, model: ModelSpec, hw: HardwareSpec, where: str = "") -> Layout:
    """The checked layout of a run (`cfg`: sim/config.py RunConfig); ConfigError naming
    the ``cluster.*`` key (or the setting that cannot go with it) otherwise."""
    from servesim.policies.parallelism import check_layout

    from .types import ConfigError

    layout = Layout.of(cfg.cluster)
    check_layout(model, hw, layout, where)
    sp = cfg.speculative
    if layout.pp > 1 and sp is not None and sp.max_draft_len:
        raise ConfigError("speculative decoding on a pipeline (pipeline_parallel > 1) is not modelled",
                          f"{where}cluster.pipeline_parallel")
    return layout


def make_layout_cost_model(model: ModelSpec, hw: HardwareSpec, cfg: RooflineConfig | None, layout: Layout,
                           cuda_graphs: bool = True, overlap_scheduler: bool = False):
    """The cost model of one replica split as `layout`: a `PipelineCostModel` for
    pipeline_parallel > 1, else the roofline over its tp GPUs (and ep expert groups)."""
    if layout.pp > 1:
        return PipelineCostModel(model, hw, cfg, layout, cuda_graphs, overlap_scheduler)
    if layout.ep > 1:
        return RooflineCostModel(model, hw, cfg, tp=layout.tp, cuda_graphs=cuda_graphs,
                                 overlap_scheduler=overlap_scheduler, ep=layout.ep)
    return RooflineCostModel(model, hw, cfg, tp=layout.tp, cuda_graphs=cuda_graphs,
                             overlap_scheduler=overlap_scheduler)


def gpu_backend_problems(cfg, model: ModelSpec) -> list[tuple[str, str]]:
    """Why `--backend gpu` cannot run this setup's model or layout (its model is a dense
    Llama on tensor-parallel GPUs only): an MoE model, pipeline or expert parallelism."""
    out = []
    if model.is_moe:
        out.append(("model", f"model {model.name} is a mixture of experts ({model.num_experts} experts, top-"
                    f"{model.num_experts_per_tok}): the gpu backend runs dense Llama-family models only (simulate "
                    "it with --backend sim)"))
    if cfg.cluster.pipeline_parallel > 1:
        out.append(("cluster.pipeline_parallel", f"{cfg.cluster.pipeline_parallel}: the gpu backend has no pipeline "
                    "parallelism (simulate it with --backend sim)"))
    if cfg.cluster.expert_parallel > 1:
        out.append(("cluster.expert_parallel", f"{cfg.cluster.expert_parallel}: the gpu backend has no expert "
                    "parallelism"))
    return out
