"""The simulated executor: prices a batch with a cost model instead of running it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from servesim.policies.graph_padding import GraphPadding

from .speculation import AcceptanceModel, DrafterCost, chain, launch_and_gpu, verify_segment, verify_shape
from .types import CostModel, DecodePrice, ScheduledBatch, StepResult


@dataclass
class SimSpeculation:
    """Speculative decoding on the simulated clock: what is accepted, what drafting costs."""

    acceptance: AcceptanceModel
    drafter: DrafterCost
    # per generation request, the tokens beyond one that the drafter's next first step
    # catches up (the GPU backend's ``kv_len + 1 - dlen - 1``): 1 after a verification that
    # accepted all its drafts (the bonus token and the last draft), one more after each step
    # it drafted nothing in; absent: 0
    catch_up: dict = field(default_factory=dict)
    # the token counts of the verification's piecewise graphs (speculation.verify_shape);
    # None: verification priced by the cost model as a decode step with the drafts' tokens
    verify_padding: GraphPadding | None = None
    chunked_verify: bool = False  # price verification as the GPU backend runs it (verify_shape)


class SimExecutor:
    needs_block_ids = False  # prices shapes; never needs request objects or block ids

    def __init__(self, cost_model: CostModel, overlap: bool = False, speculation: SimSpeculation | None = None):
        self.cost_model = cost_model
        # the overlap scheduler: iteration n+1 is decided while n runs (the GPU executor
        # lags so by construction; on the simulated clock it is this executor's to say)
        self.overlap = overlap
        self.speculation = speculation
        # its decode-stretch price is the cost model's decode_affine of the batch (a function
        # of n and its graph size), so the engine may keep it per batch size; not for a
        # subclass that plans otherwise
        self.fixed_stretch_plans = type(self).plan_decode_stretch is SimExecutor.plan_decode_stretch

    def execute(self, batch: ScheduledBatch) -> StepResult:
        spec = self.speculation
        if spec is None and not batch.drafts:  # (the common case: a plain iteration, priced)
            return StepResult(self.cost_model.price(batch.shape))
        if batch.drafts and spec is None:
            raise RuntimeError("the engine proposed drafts but the executor has no speculation model")
        drafts = batch.drafts
        ks = [k for _, k in drafts]
        if not any(ks):
            # no request drafts (none in generation, or every one at k = 0): the GPU backend
            # runs the plain iteration, its drafter only over the context chunks
            if drafts and spec.drafter.catches_up:
                prev = spec.catch_up
                spec.catch_up = {r: prev.get(r, 0) + 1 for r, _ in drafts}
            acc = [0] * len(drafts)
            pre = spec.drafter.context_segments(batch.shape) if spec is not None else []
            if not pre:
                return StepResult(self.cost_model.price(batch.shape), accepted=acc)
            # the GPU backend's drafter processes the prompts after the target's pass
            host, gpu, rest = launch_and_gpu(self.cost_model, batch.shape)
            return StepResult(chain([(host, gpu)] + pre) + rest, accepted=acc)
        rids = [r for r, _ in drafts]
        accepted = spec.acceptance.accepted(rids, ks)
        extra = 0
        if spec.drafter.catches_up:  # (only a GPU-structured draft model's pricing reads it)
            prev = spec.catch_up
            extra = sum(prev.get(r, 0) for r, k in drafts if k)
            spec.catch_up = {r: (int(a == k) if k else prev.get(r, 0) + 1) for r, k, a in zip(rids, ks, accepted)}
        vs = verify_shape(batch.shape, ks, spec.verify_padding) if spec.chunked_verify else None
        segs = spec.drafter.segments(batch.shape, extra, ks)
        if vs is None or segs is None:
            target = self.cost_model.price(batch.shape if vs is None else vs)
            return StepResult(target + spec.drafter.price(batch.shape, extra), accepted=accepted)
        # the GPU backend's iteration: drafting, then verification, launched with no host
        # sync in between (the verification's host launch overlaps the drafter's GPU work;
        # its piecewise graphs' serial part follows it: verify_segment)
        seg, rest = verify_segment(self.cost_model, vs)
        return StepResult(chain(segs + [seg]) + rest, accepted=accepted)

    def plan_decode_stretch(self, n_decode: int, padded_decode: int) -> DecodePrice:
        graph = padded_decode > 0
        return DecodePrice(*self.cost_model.decode_affine(n_decode, graph, padded_decode),
                           *self.cost_model.decode_split(n_decode, graph, padded_decode))

    def admits_arrivals_until(self, now: float, last_start: float, last_end: float) -> float:
        """With the overlap scheduler an iteration that follows the last one back to back
        was decided when the last one started: later arrivals wait one iteration more."""
        return last_start if self.overlap and now <= last_end + 1e-9 else now

    def iteration_duration(self, start_s: float, result: StepResult) -> float:
        return result.duration_s

    def start_clock(self, clock: Callable[[], float]) -> None:
        raise TypeError("the simulated executor runs on the simulated clock, not a wall clock")

    def finish(self) -> dict[int, float]:
        return {}
