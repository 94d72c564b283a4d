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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from servesim.policies.graph_padding import GraphPadding

from .types import IterationShape


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

    def accepted(self, rids: list[int], ks: list[int]) -> list[int]:
        """Accepted drafts of each request (ks[i] drafts for request rids[i])."""
        n = len(ks)
        if not n:
            return []
        kmax = max(ks)
        if kmax == 0:
            return [0] * n
        u = self.rng.random((n, kmax))
        if self.alpha is not None:
            ok = u < self._alphas(kmax)
        else:
            ok = u < np.array([self._request_alpha(r) for r in rids])[:, None]
        ok &= np.arange(kmax) < np.asarray(ks)[:, None]  # positions past a request's k: not drafted
        return np.cumprod(ok, axis=1).sum(axis=1).tolist()


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


@dataclass
class DrafterCost:
    """Seconds of drafting per iteration, serial before the target's verification."""

    proposer: str
    drafter: object = None  # a cost model (RooflineCostModel) of the draft model / EAGLE head
    host_s_per_request: float = 0.0  # n-gram lookup (and any proposer's host work) per request and step
    # a draft model's decode-graph sizes (None: it runs its steps as the target's iteration
    # runs, graph or eager: CUDA graphs off, or a cost model without the GPU's structure)
    graph_padding: GraphPadding | None = None

    def _step(self, rows: int, shape: IterationShape) -> tuple[float, float]:
        """(fixed, per_kv) of one draft-model decode step of ``rows`` rows."""
        gp = self.graph_padding
        if gp is None:
            return self.drafter.decode_affine(rows, shape.graph, shape.padded_decode)
        pad = gp.padded(rows)
        return self.drafter.decode_affine(rows, pad > 0, pad)

    def price(self, shape: IterationShape, catch_up_extra: int = 0) -> float:
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
                # k autoregressive steps at the batch's size, each attending one more token;
                # the first one with the catch-up rows
                f1, per_kv = self._step(n + catch_up_extra, shape)
                fixed = self._step(n, shape)[0] if k > 1 else 0.0
                t += f1 + (k - 1) * fixed + per_kv * (k * shape.decode_kv_sum + n * k * (k - 1) / 2)
        elif self.proposer == "eagle" and n and k:
            fixed, per_kv = self.drafter.decode_affine(n, shape.graph, shape.padded_decode)
            t += k * fixed + per_kv * (k * shape.decode_kv_sum + n * k * (k - 1) / 2)
        elif self.proposer == "medusa" and n and k:
            t += self.drafter.decode_affine(n, shape.graph, shape.padded_decode)[0]
        return t
