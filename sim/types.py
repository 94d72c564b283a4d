"""Core types shared by the engine, the policies and the executors.

This module imports nothing from the project (only the standard library) so that
`sim/` and `policies/` can both import it without an import cycle.

Time is in seconds, lengths in tokens. A request's KV length after an iteration is the
number of its tokens whose keys/values sit in the cache: after the context phase it is
`prompt_len`; every generation step writes one more (the token sampled last step).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Protocol


class ConfigError(Exception):
    """Bad user input. Carries a list of (location, message) pairs.

    `location` names the file and key path (or line), e.g.
    ``experiments/x.yaml: variants[1].scheduler.max_num_tokens``.
    The CLI prints every problem and exits with status 2.
    """

    def __init__(self, problems: list[tuple[str, str]] | str, location: str = ""):
        if isinstance(problems, str):
            problems = [(location, problems)]
        self.problems = problems
        super().__init__("\n".join(f"{loc}: {msg}" if loc else msg for loc, msg in problems))


class Phase(enum.IntEnum):
    WAITING = 0  # arrived, not admitted (or paused and waiting to resume)
    CONTEXT = 1  # admitted, prompt (or recompute) not fully processed
    GENERATION = 2  # producing one token per iteration
    FINISHED = 3
    REJECTED = 4  # can never fit (KV pool or token budget): counted, never run


@dataclass(slots=True, eq=False)
class Request:
    """One request of a workload plus the engine's bookkeeping for it."""

    request_id: int
    arrival_s: float
    prompt_len: int
    output_len: int
    priority: int = 0
    tenant: str = ""
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None
    block_hashes: tuple[int, ...] | None = None  # one per prefix block (S2)
    prompt_tokens: tuple[int, ...] | None = None

    # --- engine state -------------------------------------------------------
    phase: Phase = Phase.WAITING
    replica: int = -1
    admit_seq: int = -1  # admission order (MAX_UTILIZATION pauses the newest)
    context_target: int = 0  # tokens the context phase must have in cache
    context_done: int = 0  # of those, already in the KV cache (computed or reused)
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache
    generated: int = 0  # tokens emitted so far (valid when not in GENERATION)
    gen_base_iter: int = 0  # GENERATION: iteration index where `generated` was last stored
    finish_iter: int = -1  # GENERATION: iteration whose end emits the last token
    preemptions: int = 0
    reserved_blocks: int = 0  # blocks promised by the capacity policy
    first_scheduled_s: float = float("nan")
    first_token_s: float = float("nan")
    finish_s: float = float("nan")
    # Emitted tokens as spans of consecutive iterations (first_iter, n_tokens): token
    # times are the end times of those iterations. Kept compact so the simulator never
    # does per-token Python work.
    spans: list[tuple[int, int]] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)  # KV block ids, materialised lazily
    # Prefix cache (S2): chain keys of the prompt's full blocks at the engine's block size,
    # the tokens of each (for collision-proof matching, when known), the cache nodes this
    # request holds and the index of its block each one is (increasing; the matched
    # prefix first, then the blocks it inserted past keys other requests had cached).
    block_keys: tuple[int, ...] | None = None
    block_contents: tuple | None = None
    nodes: list = field(default_factory=list)
    node_blocks: list[int] = field(default_factory=list)
    retention: object = None  # RetentionSpec (policies/retention.py) or None
    swapped_blocks: int = 0  # KV blocks held on the host while paused by swap preemption
    reject_reason: str = ""  # REJECTED: why it can never run (see Engine._reject)
    # Disaggregated serving (sim/disagg.py): the request arrives at a decode replica with
    # its prompt's KV (`swapped_blocks` of it) moved there from the prefill replica that
    # emitted its first token, at iteration `first_token_at` = (replica, iteration).
    transfer_in: bool = False
    first_token_at: tuple[int, int] | None = None
    prefill_replica: int = -1
    kv_transfer_s: float | None = None  # time its KV spent on the link (queueing and sharing included)

    def kv_len_at(self, it: int) -> int:
        """KV length *before* iteration `it` for a request in GENERATION."""
        return self.prompt_len + self.generated + (it - self.gen_base_iter) - 1


@dataclass(slots=True)
class ContextChunk:
    """A piece of one request's context phase scheduled in an iteration."""

    request: Request
    num_tokens: int  # new tokens computed this iteration
    prior_tokens: int  # tokens already in the KV cache before this chunk (reused or earlier chunks)
    is_last: bool  # completes the context phase: samples the first (or next) token


@dataclass(slots=True)
class IterationShape:
    """What a cost model needs to price one iteration (no request objects)."""

    ctx_new_tokens: tuple[int, ...] = ()  # per context chunk
    ctx_prior_tokens: tuple[int, ...] = ()  # per context chunk: cached tokens it attends to
    n_ctx_sampling: int = 0  # context chunks that sample a token (last chunk of a prompt)
    n_decode: int = 0  # generation requests (one token each)
    decode_kv_sum: int = 0  # sum over generation requests of the KV length attended (incl. new token)
    # the longest KV length a generation request attends (incl. new token); 0: unknown (the
    # decode attention kernel's split bound is then not priced: sim/kv_attention.py SplitBound)
    decode_kv_max: int = 0
    graph: bool = False  # runs as a captured CUDA graph (generation-only iterations)
    padded_decode: int = 0  # batch size the graph runs at (>= n_decode); 0 when not a graph
    # iterations with context chunks under runtime.piecewise_graphs: the token count the
    # piecewise CUDA graphs run at (>= num_tokens; token-wise work padded to it, attention
    # eager on the real rows); 0: eager
    piecewise_tokens: int = 0
    host_to_gpu_bytes: int = 0  # KV blocks copied back from the host (offload tier, swap-in)
    gpu_to_host_bytes: int = 0  # KV blocks of swapped-out (preempted) requests copied to the host
    # speculative decoding: draft tokens the target verifies beside the generation requests'
    # own tokens (summed over them; an EAGLE tree's nodes), and the drafter's sequential
    # steps this iteration (the longest draft)
    decode_draft_tokens: int = 0
    draft_steps: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(self.ctx_new_tokens) + self.n_decode + self.decode_draft_tokens


@dataclass(slots=True)
class ScheduledBatch:
    """One engine iteration: context chunks first, then generation requests (packed)."""

    iteration: int
    shape: IterationShape
    context: list[ContextChunk]
    # the generation requests, with their block ids materialised, when the executor
    # `needs_block_ids`; empty otherwise (a simulated executor prices the shape)
    generation: list[Request]
    # KV block copies (src id, dst id) to run before the forward pass (partial reuse)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    # swap preemption (only when the executor needs block ids): requests paused by swapping
    # this iteration, with the block ids their KV occupied (already released: the copy to
    # the host runs before this iteration's forward pass writes anything), and requests
    # whose KV comes back from the host into their new blocks before the forward pass
    swap_out: list[tuple[int, list[int]]] = field(default_factory=list)
    swap_in: list[int] = field(default_factory=list)
    # speculative decoding: (request id, draft tokens k) of every generation request, in
    # `generation`'s order (when the executor needs block ids), when speculation is on
    drafts: list[tuple[int, int]] = field(default_factory=list)


@dataclass(slots=True)
class StepResult:
    duration_s: float
    # Sampled token ids per request (GPU backend); the simulator leaves it empty because
    # output lengths are forced by the workload.
    tokens: dict[int, list[int]] = field(default_factory=dict)
    # speculative decoding: drafts accepted per entry of `ScheduledBatch.drafts`
    accepted: list[int] = field(default_factory=list)


class CostModel(Protocol):
    """Prices iterations. Implementations: roofline (sim/cost_model.py), calibrated (S4).

    Contract: for a generation-only shape, ``price(shape) ==
    fixed + per_kv * shape.decode_kv_sum`` where ``(fixed, per_kv) =
    decode_affine(n_decode, graph, padded)``. The simulated executor hands the affine form
    to the engine (`Executor.plan_decode_stretch`) to advance decode-only stretches in
    closed form, so the two must agree exactly.
    """

    def price(self, shape: IterationShape) -> float: ...

    def decode_affine(self, n_decode: int, graph: bool, padded_decode: int) -> tuple[float, float]: ...

    def decode_split(self, n_decode: int, graph: bool, padded_decode: int) -> tuple[float, float]:
        """(per_longest, per_kv_split): a generation-only iteration's price is ``fixed +
        max(per_kv * decode_kv_sum, per_longest * decode_kv_max + per_kv_split * decode_kv_sum)``
        (the decode attention kernel's split bound); (0, 0): the affine form alone."""
        ...


class DecodePrice(NamedTuple):
    """Every iteration of a decode-only stretch at a batch lasts fixed_s + max(per_kv_token_s *
    decode_kv_sum, per_longest_token_s * decode_kv_max + split_per_kv_token_s * decode_kv_sum)
    (the sum of the KV lengths its generation requests attend to; the longest of them; the
    second line: the decode attention kernel's split bound, none when per_longest_token_s is
    0): the engine advances a stretch in closed form on whichever line holds (cutting it where
    they cross)."""

    fixed_s: float
    per_kv_token_s: float
    per_longest_token_s: float = 0.0
    split_per_kv_token_s: float = 0.0


class Executor(Protocol):
    """Runs (GPU) or prices (sim) scheduled batches: the engine's only source of time.

    What an executor can do is declared here, never probed: the engine calls exactly these.
    """

    # The engine materialises block ids (and hands it the generation requests, swap lists)
    # for every iteration: a real executor addresses the KV pool by them; a simulated one
    # prices shapes and needs none.
    needs_block_ids: bool
    # plan_decode_stretch's answer depends only on its arguments (the simulated executor's
    # cost model): the engine keeps one plan per batch size instead of asking every stretch
    fixed_stretch_plans: bool

    def execute(self, batch: ScheduledBatch) -> StepResult: ...

    def plan_decode_stretch(self, n_decode: int, padded_decode: int) -> DecodePrice | None:
        """The closed-form price of decode-only iterations of `n_decode` requests (run as a
        CUDA graph at `padded_decode` rows when > 0), for the engine to advance a stretch
        of them at once; None: every iteration must be executed (a real GPU)."""
        ...

    def admits_arrivals_until(self, now: float, last_start: float, last_end: float) -> float:
        """The arrival time up to which requests can join the iteration starting at `now`
        that follows one that ran over [last_start, last_end]: `now` for an executor whose
        clock is the real one; a simulated overlap scheduler decided it when the last one
        started."""
        ...

    def iteration_duration(self, start_s: float, result: StepResult) -> float:
        """The duration to record for the iteration that started at `start_s`, asked once
        the engine has applied `result`: its price on a simulated clock; on a real one the
        time since `start_s` (the engine's bookkeeping included, so iterations tile the
        timeline as the simulator's do)."""
        ...

    def start_clock(self, clock: Callable[[], float]) -> None:
        """The clock (seconds) a wall-clock driver runs on; a simulated executor has none."""
        ...

    def finish(self) -> dict[int, float]:
        """Complete any work in flight; returns {iteration: end time} for iterations whose
        end became known only now (an overlapped GPU's tokens reach the host after the
        next iteration was launched), which the engine records."""
        ...
