"""The simulated executor: prices a batch with a cost model instead of running it."""

from __future__ import annotations

from .types import CostModel, ScheduledBatch, StepResult


class SimExecutor:
    needs_requests = False  # prices shapes; never needs request objects or block ids

    def __init__(self, cost_model: CostModel):
        self.cost_model = cost_model

    def execute(self, batch: ScheduledBatch) -> StepResult:
        return StepResult(self.cost_model.price(batch.shape))
