"""Speculative decoding: how many draft tokens each generation request carries into an
iteration (the proposer's decision), with TensorRT-LLM's scheduling semantics.

A generation request with k draft tokens brings 1 + k tokens into the iteration (its last
sampled token and the k drafts to verify); ``max_num_tokens`` counts all of them. Draft
lengths are capped so that a request never writes KV past its last output token
(k <= output_len - generated - 1): GUARANTEED_NO_EVICT's reservation for the whole output
then also covers the drafts, and the last step may verify fewer. What is accepted is an
outcome, not a decision: the executor reports it (the simulator draws it from an acceptance
model, sim/speculation.py; a GPU verifies real tokens).

Proposers differ in what drafting costs and how verification is shaped:

- ``draft_model``: a smaller model of the same family runs k autoregressive steps;
- ``ngram``: prompt lookup, proposes from the request's own tokens (host work only);
- ``medusa``: k heads on the target's last hidden state, one pass;
- ``eagle``: a one-layer head run k times; ``tree_nodes`` > k verifies a tree of
  candidates (the node count is what the target computes per request).

Worked example (``speculative.draft_policy: my_policies:ShortDraftsNearTheEnd``): the
proposer (``speculative.proposer``) still prices the drafting; the policy chooses k per
request and step from what it sees (the tokens it still has to emit)::

    class ShortDraftsNearTheEnd:
        name = "short_near_end"
        max_draft_len = 4

        def draft_len(self, remaining):
            return min(self.max_draft_len, max(remaining // 8, 1), max(remaining - 1, 0))

        def verify_tokens(self, k):
            return k
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

PROPOSERS = ("draft_model", "ngram", "medusa", "eagle")


class DraftPolicy(Protocol):
    name: str
    max_draft_len: int  # k; 0 turns speculation off

    def draft_len(self, remaining: int) -> int:
        """Draft tokens for a generation request that still has `remaining` tokens to emit."""
        ...

    def verify_tokens(self, k: int) -> int:
        """Tokens the target computes for a request with k drafts (besides its own one)."""
        ...


@dataclass(frozen=True)
class FixedDraft:
    """Every request drafts k tokens (fewer near its end)."""

    name: str
    max_draft_len: int
    tree_nodes: int = 0  # eagle: candidate-tree nodes verified per request (0: a chain of k)

    def draft_len(self, remaining: int) -> int:
        k = self.max_draft_len
        return k if k < remaining else max(remaining - 1, 0)

    def verify_tokens(self, k: int) -> int:
        if self.tree_nodes and k == self.max_draft_len:
            return self.tree_nodes
        return k


DRAFT_POLICIES: dict[str, type] = {"fixed": FixedDraft}


def fit_draft_lens(ks: list[int], budget: int) -> list[int]:
    """Trim draft lengths so that they total at most `budget` (the token budget left after
    one token per generation request): the longest drafts lose a token first, so every
    request keeps as many drafts as the budget allows, deterministically."""
    total = sum(ks)
    if total <= budget:
        return ks
    if budget <= 0:
        return [0] * len(ks)
    # the largest cap c with sum(min(k, c)) <= budget, then hand out what is left in order
    lo, hi = 0, max(ks)
    while lo < hi:
        c = (lo + hi + 1) // 2
        if sum(min(k, c) for k in ks) <= budget:
            lo = c
        else:
            hi = c - 1
    out = [min(k, lo) for k in ks]
    left = budget - sum(out)
    for i, k in enumerate(ks):
        if left <= 0:
            break
        if k > out[i]:
            out[i] += 1
            left -= 1
    return out


def make_draft_policy(proposer: str, max_draft_len: int, tree_nodes: int = 0) -> FixedDraft | None:
    """The proposer's policy, or None when speculation is off (k = 0)."""
    if proposer not in PROPOSERS:
        raise ValueError(f"unknown proposer {proposer!r} (one of {', '.join(PROPOSERS)})")
    if max_draft_len <= 0:
        return None
    return FixedDraft(proposer, max_draft_len, tree_nodes if proposer == "eagle" else 0)
