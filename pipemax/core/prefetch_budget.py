"""How much KV offload=auto may keep on the host: the prefetch budget of each micro-batch.

A micro-batch's host-resident KV must come back over PCIe before its next step on a stage, while
the other micro-batches compute there. So its budget is the transfer bandwidth times the
predicted compute time of the micro-batches ahead of it (a sliding window: each other
micro-batch's step, predicted by the cost model from what its last step carried; one that has
not run yet, because the GPU pool was full, as carrying what this one did). Without a fitted
model, or with one micro-batch, there is nothing to hide a copy behind: the budget is 0 and auto
offloads nothing.
"""

from __future__ import annotations

from .cost_model import StepCostModel


class PrefetchBudget:
    def __init__(self, cost_model: StepCostModel, bytes_per_second: float, chunk_bytes: int, num_micro_batches: int):
        self.cost_model = cost_model
        self.bytes_per_second = bytes_per_second
        self.chunk_bytes = chunk_bytes  # bytes one chunk moves on the busiest link
        self.last_load: list[tuple[int, int] | None] = [None] * num_micro_batches

    def record(self, micro_batch: int, batch_tokens: int, context_tokens: int) -> None:
        """What micro-batch's step carried (its next step is predicted to carry about as much)."""
        self.last_load[micro_batch] = (batch_tokens, context_tokens)

    def budget_chunks(self, micro_batch: int) -> int:
        """Chunks micro-batch may prefetch before its next step without the step waiting."""
        seconds = 0.0
        known = [load for load in self.last_load if load is not None]
        if not known:
            return 0
        typical = self.last_load[micro_batch] or known[0]
        for other, load in enumerate(self.last_load):
            if other == micro_batch:
                continue
            # A micro-batch that has not run yet (the pool was full) will carry about as much.
            predicted = self.cost_model.predict(*(load or typical))
            if predicted is None:
                return 0
            seconds += predicted
        return int(self.bytes_per_second * seconds // self.chunk_bytes)
