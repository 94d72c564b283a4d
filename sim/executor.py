"""The simulated executor: prices a batch with a cost model instead of running it."""

from __future__ import annotations

from .types import CostModel, ScheduledBatch, StepResult


class SimExecutor:
    needs_requests = False  # prices shapes; never needs request objects or block ids

    def __init__(self, cost_model: CostModel, overlap: bool = False):
        self.cost_model = cost_model
        # the overlap scheduler: iteration n+1 is decided while n runs (the GPU executor
        # lags so by construction; on the simulated clock it is this executor's to say)
        self.overlap = overlap

    def execute(self, batch: ScheduledBatch) -> StepResult:
        return StepResult(self.cost_model.price(batch.shape))

    def admits_arrivals_until(self, now: float, last_start: float, last_end: float) -> float:
        """With the overlap scheduler an iteration that follows the last one back to back
        was decided when the last one started: later arrivals wait one iteration more."""
        return last_start if self.overlap and now <= last_end + 1e-9 else now
