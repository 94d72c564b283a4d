"""Speculative decoding in the simulator: how many drafts are accepted, and what drafting
and verification cost.

Acceptance (an outcome the simulated executor draws; a GPU computes it): position i of a
request's drafts is accepted with probability alpha_i given that positions 1..i-1 were
(TensorRT-LLM's linear verification stops at the first rejection), so a request with k
drafts accepts a = the number of leading successes and emits a + 1 tokens (the accepted
drafts and the target's own next token). alpha is one number for every position, a list
per position, the per-position rates a run measured (its iterations table), or per
request a Beta(a, b) draw. Draws come from one generator seeded by the run's seed: same
config and seed, same bytes.

Cost, on top of the target's verification (priced by the target's cost model with the
draft tokens in the shape): the drafter. A draft model runs k decode steps at the batch's
size (its own cost model: its spec, the same hardware, its own calibration profile when
given) plus its own pass over the iteration's context chunks; an EAGLE head runs a
one-layer model k times; Medusa heads one pass of k lm_head-sized GEMMs; n-gram lookup
costs host time only.

A draft model's decode steps run as its own CUDA graphs whenever it has one for the
step's rows (``graph_padding``: the GPU backend's `DraftModel` captures the target's
decode sizes and twice those), whether or not the target's iteration is a graph: an
iteration that verifies drafts beside context chunks runs the target eagerly but still
drafts through the drafter's graphs. The first step catches up on the tokens the drafter
has not seen: one per request, two for a request whose previous verification accepted
all its drafts (the drafter never consumed the last one); the executor tells `price`
how many of those there are (``catch_up_extra``).

Verification (`verify_shape`), as the GPU backend runs it: every generation request is a
context chunk of its 1 + k positions over its cached KV (paged prefill attention, no
decode-attention kernels), every position a sampled row (lm_head and sampler over all of
them). A decode-only iteration runs through the verification's piecewise CUDA graphs,
captured at the decode-graph batch sizes times 1 + max_draft_len tokens (eager beyond the
largest); an iteration with context chunks runs as the engine's piecewise graphs when
they are on (its ``piecewise_tokens`` count the drafts), else eagerly. So the target's
cost model prices it as the context iteration it is, with the calibrated prefill-attention
and piecewise/eager launch terms, not as a decode graph with extra tokens. Drafting and
verification are launched with no host sync in between (`chain`): the verification's host
launch overlaps the drafter's GPU work, but the serial part of its piecewise graphs (the
launch the calibration finds unhidden even on a GPU-bound pass) follows that work
(`verify_segment`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from servesim.policies.graph_padding import GraphPadding

from .cost_model import GPU_TERMS
from .types import IterationShape


def verify_shape(shape: IterationShape, ks: list[int], verify_padding: GraphPadding | None) -> IterationShape | None:
    """The target's verification pass of an iteration whose generation requests carry
    linear drafts (``ks[i]`` for the i-th of ``shape.n_decode``), as a context iteration:
    the context chunks, then one chunk of 1 + k tokens per generation request over its
    cached KV (the shape holds only their sum: spread evenly), every verified position
    sampled. ``verify_padding``: the token counts of the verification's piecewise graphs
    (None: none captured). None when the drafts are not linear (an EAGLE tree's nodes)."""
    n = shape.n_decode
    if len(ks) != n or sum(ks) != shape.decode_draft_tokens:
        return None
    cached = shape.decode_kv_sum - n  # decode_kv_sum counts each request's new token
    q, r = divmod(cached, n) if n else (0, 0)
    new = tuple([1 + k for k in ks])
    prior = (q + 1,) * r + (q,) * (n - r)  # q + (i < r)
    T = sum(shape.ctx_new_tokens) + n + shape.decode_draft_tokens  # + sum(new)
    if shape.ctx_new_tokens:
        pw = shape.piecewise_tokens
    else:
        pw = verify_padding.padded(T) if shape.graph and verify_padding is not None else 0
    return IterationShape(ctx_new_tokens=shape.ctx_new_tokens + new, ctx_prior_tokens=shape.ctx_prior_tokens + prior,
                          n_ctx_sampling=shape.n_ctx_sampling + n + shape.decode_draft_tokens, piecewise_tokens=pw,
                          host_to_gpu_bytes=shape.host_to_gpu_bytes, gpu_to_host_bytes=shape.gpu_to_host_bytes)


class AcceptanceModel:
    """Draws the number of accepted drafts per request."""

    def __init__(self, alpha: list[float] | None = None, beta: tuple[float, float] | None = None, seed: int = 0):
        if (alpha is None) == (beta is None):
            raise ValueError("give per-position alpha or a beta distribution, not both")
        self.alpha = None if alpha is None else np.asarray(alpha, dtype=np.float64)
        if self.alpha is not None and (self.alpha.ndim != 1 or not len(self.alpha)
                                       or np.any((self.alpha < 0) | (self.alpha > 1))):
            raise ValueError("acceptance rates must be in [0, 1]")
        self.beta = beta
        self.rng = np.random.default_rng([int(seed), 0x5BEC])
        self._per_request: dict[int, float] = {}
        self._buf: list[float] = []  # uniforms drawn ahead (_uniforms)
        self._pos = 0
        self._alpha_list: dict[int, list[float]] = {}

    def _alphas(self, kmax: int) -> np.ndarray:
        a = self.alpha
        if len(a) >= kmax:
            return a[:kmax]
        return np.concatenate([a, np.full(kmax - len(a), a[-1])])  # the last rate for later positions

    def _request_alpha(self, rid: int) -> float:
        v = self._per_request.get(rid)
        if v is None:
            a, b = self.beta
            # per request, deterministic in (seed, request id), independent of batch order
            v = self._per_request[rid] = float(np.random.default_rng([int(rid), 0xBE7A]).beta(a, b))
        return v

    _BLOCK = 1 << 15  # uniforms drawn ahead at a time

    def _uniforms(self, m: int) -> tuple[list[float], int]:
        """The generator's next ``m`` uniforms, as (a list, the index of the first): drawn in
        blocks ahead, consumed in order, so they are the values ``rng.random(m)`` would give
        call after call (the same stream; only the generator's own state runs ahead)."""
        buf, pos = self._buf, self._pos
        if pos + m > len(buf):
            buf = self._buf = buf[pos:] + self.rng.random(max(self._BLOCK, m)).tolist()
            pos = 0
        self._pos = pos + m
        return buf, pos

    def accepted(self, rids: list[int], ks: list[int]) -> list[int]:
        """Accepted drafts of each request (ks[i] drafts for request rids[i]): the leading
        successes of ``u < alpha`` over its first ks[i] positions of an (n, max(ks)) draw."""
        n = len(ks)
        if not n:
            return []
        kmax = max(ks)
        if kmax == 0:
            return [0] * n
        u, pos = self._uniforms(n * kmax)
        out = [0] * n
        if self.alpha is not None:
            al = self._alpha_list.get(kmax)
            if al is None:
                al = self._alpha_list[kmax] = self._alphas(kmax).tolist()
            for i, k in enumerate(ks):
                a = 0
                while a < k and u[pos + a] < al[a]:
                    a += 1
                out[i] = a
                pos += kmax
        else:
            for i, (r, k) in enumerate(zip(rids, ks)):
                al = self._request_alpha(r)
                a = 0
                while a < k and u[pos + a] < al:
                    a += 1
                out[i] = a
                pos += kmax
        return out


def alpha_from_run(iterations, max_len: int) -> list[float]:
    """Per-position conditional acceptance from a run's iterations table (columns
    draft_proposed_by_position, draft_accepted_by_position): the marginal rate m_i =
    accepted_i / proposed_i, turned into alpha_i = m_i / m_(i-1) (exact when every request
    drafted the same k)."""
    prop = iterations.column("draft_proposed_by_position").to_pylist()
    acc = iterations.column("draft_accepted_by_position").to_pylist()
    P = np.zeros(max_len)
    A = np.zeros(max_len)
    for p, a in zip(prop, acc):
        if p:
            m = min(len(p), max_len)
            P[:m] += p[:m]
            A[:m] += a[:m]
    if not P[0]:
        raise ValueError("the run proposed no draft tokens")
    n = int(np.flatnonzero(P)[-1]) + 1
    m = A[:n] / P[:n]
    prev = np.concatenate([[1.0], m[:-1]])
    alpha = np.divide(m, prev, out=np.zeros(n), where=prev > 0)
    return np.clip(alpha, 0.0, 1.0).tolist()


def launch_and_gpu(cost_model, shape: IterationShape) -> tuple[float, float, float]:
    """(host launch seconds that delay the GPU, GPU seconds, seconds of the rest: the
    scheduler and host copies) of one priced shape, from the cost model's breakdown: a
    launch that the model hides under the shape's own GPU work delays nothing after it;
    one that it does not hide occupies the host for the GPU work plus the unhidden part."""
    bd = cost_model.breakdown(shape)
    gpu = sum(bd[k] for k in GPU_TERMS)
    unhidden = bd["host_launch"]
    return (gpu + unhidden if unhidden > 0 else 0.0), gpu, cost_model.price(shape) - gpu - unhidden


def verify_segment(cost_model, vs: IterationShape) -> tuple[tuple[float, float], float]:
    """The target's verification pass ``vs`` (`verify_shape`) after the drafter's steps: a
    `chain` segment (host seconds it adds before its GPU work can end, GPU seconds it
    occupies the GPU) and the seconds of the rest (`launch_and_gpu`).

    Through piecewise graphs (one graph per layer piece, the attention launched eagerly
    between them) the part of the launch that the calibration finds unhidden however long
    the pass's GPU work is -- (1 - context_launch_overlap) of the launch work whenever the
    GPU's work is the longer: a constant that no host lead could leave on a GPU-bound pass
    -- is serial time of the pieces on the GPU's side, so it follows the drafter's GPU work
    instead of hiding under it. Only launch work beyond the GPU's (a host-bound pass) is host
    time that the drafter's GPU work hides (a cost model that does not say its launch work,
    a pipeline's, counts the pass as GPU-bound). An eager verification (beside context
    chunks with piecewise graphs off) is host-paced: its segment is `launch_and_gpu`'s."""
    host, gpu, rest = launch_and_gpu(cost_model, vs)
    if not (vs.piecewise_tokens and host):
        return (host, gpu), rest
    work = getattr(cost_model, "launch_work", None)
    serial = host - gpu - (max(work(vs) - gpu, 0.0) if work is not None else 0.0)
    return (host, gpu + max(serial, 0.0)), rest


def chain(segments) -> float:
    """Seconds until the GPU finishes ``segments`` ((host launch seconds, GPU seconds) in
    launch order, none waiting on the host in between): segment i's GPU work runs after
    segment i-1's and cannot end before the host has launched it."""
    h = g = 0.0
    for host, gpu in segments:
        h += host
        g = max(g + gpu, h)
    return g


def draft_step_rows(ks: list[int]) -> list[int]:
    """Rows of each of a draft model's decode steps for requests drafting ``ks`` tokens (the
    GPU backend's `DraftModel.propose`): step j (from 0) runs the requests with k > j."""
    kmax = max(ks, default=0)
    return [sum(1 for k in ks if k > j) for j in range(kmax)]


@dataclass
class DrafterCost:
    """Seconds of drafting per iteration, serial before the target's verification."""

    proposer: str
    drafter: object = None  # a cost model (RooflineCostModel) of the draft model / EAGLE head
    host_s_per_request: float = 0.0  # n-gram lookup (and any proposer's host work) per request and step
    # a draft model's decode-graph sizes (None: it runs its steps as the target's iteration
    # runs, graph or eager: CUDA graphs off, or a cost model without the GPU's structure)
    graph_padding: GraphPadding | None = None

    def __post_init__(self):
        self._steps: dict[int, tuple[float, float, float]] = {}

    @property
    def catches_up(self) -> bool:
        """Whether `segments` prices the first step's catch-up rows (a GPU-structured draft
        model): only then does the executor need to track them."""
        return self.proposer == "draft_model" and self.graph_padding is not None and self.drafter is not None

    def _graph_step(self, rows: int) -> tuple[float, float, float]:
        """(host launch, GPU seconds at no KV, GPU seconds per KV token) of one draft-model
        decode step of ``rows`` rows in its graphs (eager beyond them)."""
        r = self._steps.get(rows)
        if r is None:
            pad = self.graph_padding.padded(rows)
            base = IterationShape(n_decode=rows, graph=pad > 0, padded_decode=pad)
            host, gpu, _ = launch_and_gpu(self.drafter, base)
            r = self._steps[rows] = (host - gpu if host else 0.0, gpu, self.drafter.decode_affine(rows, pad > 0, pad)[1])
        return r

    def segments(self, shape: IterationShape, catch_up_extra: int = 0,
                 ks: list[int] | None = None) -> list[tuple[float, float]] | None:
        """The drafting of a GPU-structured draft model (``graph_padding`` set) as
        (host launch, GPU seconds) segments for `chain`, in launch order: its eager pass
        over the context chunks (samples nothing), then its k decode steps through its
        graphs, launched back to back with no host sync in between, so each costs its GPU
        time and the host runs ahead. Step j has a row for every request drafting at least
        j + 1 tokens (``ks``, the drafts of the shape's generation requests; None: all of
        them draft ``draft_steps``), the first step also the catch-up rows. None: this
        drafter is priced serially (`price`)."""
        if not self.catches_up:
            return None
        k, n = shape.draft_steps, shape.n_decode
        segs = []
        h0 = self.host_s_per_request * n * (k > 0)
        if h0:
            segs.append((h0, 0.0))
        segs += self.context_segments(shape)
        if n and k:
            kv_mean = shape.decode_kv_sum / n  # a request's KV length with its newest token
            for j, rows in enumerate(draft_step_rows(ks if ks is not None else [k] * n)):
                host, g0, per_kv = self._graph_step(rows + catch_up_extra if j == 0 else rows)
                segs.append((host, g0 + per_kv * (kv_mean + j) * rows))
        return segs

    def context_segments(self, shape: IterationShape) -> list[tuple[float, float]]:
        """A GPU-structured draft model's eager pass over an iteration's context chunks
        (it keeps its own KV of every prompt; it samples nothing), as a `chain` segment:
        it runs in every iteration with context chunks, drafting or not."""
        if self.proposer != "draft_model" or self.graph_padding is None or self.drafter is None \
                or not shape.ctx_new_tokens:
            return []
        host, gpu, _ = launch_and_gpu(self.drafter, IterationShape(
            ctx_new_tokens=shape.ctx_new_tokens, ctx_prior_tokens=shape.ctx_prior_tokens))
        return [(host, gpu)]

    def price(self, shape: IterationShape, catch_up_extra: int = 0) -> float:
        segs = self.segments(shape, catch_up_extra)
        if segs is not None:
            return chain(segs)
        k = shape.draft_steps
        n = shape.n_decode
        t = self.host_s_per_request * n * (k > 0)
        if self.drafter is None:
            return t
        if self.proposer == "draft_model":
            if shape.ctx_new_tokens:  # the drafter keeps its own KV: it processes the prompts too
                t += self.drafter.price(IterationShape(
                    ctx_new_tokens=shape.ctx_new_tokens, ctx_prior_tokens=shape.ctx_prior_tokens,
                    n_ctx_sampling=shape.n_ctx_sampling))
            if n and k:
                # k autoregressive steps at the batch's size, each attending one more token
                fixed, per_kv = self.drafter.decode_affine(n, shape.graph, shape.padded_decode)
                t += k * fixed + per_kv * (k * shape.decode_kv_sum + n * k * (k - 1) / 2)
        elif self.proposer == "eagle" and n and k:
            fixed, per_kv = self.drafter.decode_affine(n, shape.graph, shape.padded_decode)
            t += k * fixed + per_kv * (k * shape.decode_kv_sum + n * k * (k - 1) / 2)
        elif self.proposer == "medusa" and n and k:
            t += self.drafter.decode_affine(n, shape.graph, shape.padded_decode)[0]
        return t
