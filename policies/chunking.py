"""Context-chunking policies: how many of a context request's remaining tokens run now.

`chunk(remaining, budget, tokens_per_block)` returns the number of new context tokens to
schedule for one request given the iteration's remaining token budget, or 0 to leave it
for a later iteration. A chunk that does not finish the prompt is a multiple of
`tokens_per_block` (TensorRT-LLM's rule), so chunk boundaries fall on block boundaries,
and never more than `remaining` or `budget` (the engine trusts it: `sim check-policy`
checks it). The policy sees three numbers, never the request or the executor.

Worked example (``scheduler.chunking: {class: my_policies:Halves, args: {min_tokens: 64}}``):
give each context at most half the budget left, so two prompts progress side by side::

    class Halves:
        name = "halves"
        splits = True

        def __init__(self, min_tokens=64):
            self.min_tokens = min_tokens

        def chunk(self, remaining, budget, tokens_per_block):
            n = min(remaining, max(budget // 2, min(self.min_tokens, budget)))
            if n < remaining:
                n -= n % tokens_per_block
            return n
"""

from __future__ import annotations

from typing import Protocol


class ChunkPolicy(Protocol):
    name: str
    splits: bool  # False: a context runs whole in one iteration (a prompt over the token budget never fits)

    def chunk(self, remaining: int, budget: int, tokens_per_block: int) -> int: ...


class NoChunking:
    """The whole remaining context in one iteration, or wait."""

    name = "none"
    splits = False

    def chunk(self, remaining: int, budget: int, tokens_per_block: int) -> int:
        return remaining if remaining <= budget else 0


class FixedChunk:
    """At most `chunk_size` tokens per iteration, fewer when the budget is short."""

    name = "fixed"
    splits = True

    def __init__(self, chunk_size: int):
        self.chunk_size = chunk_size

    def chunk(self, remaining: int, budget: int, tokens_per_block: int) -> int:
        n = min(remaining, self.chunk_size, budget)
        if n < remaining:
            n -= n % tokens_per_block
        return n


class FillBudget(FixedChunk):
    """Sarathi-style: fill whatever budget is left after the generation tokens."""

    name = "fill_budget"

    def __init__(self) -> None:
        super().__init__(chunk_size=1 << 62)


CHUNK_POLICIES: dict[str, type] = {p.name: p for p in (NoChunking, FixedChunk, FillBudget)}


def make_chunk_policy(enabled: bool, chunk_size: int | None) -> ChunkPolicy:
    if not enabled:
        return NoChunking()
    if chunk_size is None:
        return FillBudget()
    return FixedChunk(chunk_size)
