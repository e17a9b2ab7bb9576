"""How much KV offload=auto may keep on the host: the prefetch budget of each micro-batch's step.

On each stage, a step's host-resident KV is prefetched into its staging slot while the step
launched just before it computes there (kv_manager.py: the ring holds two steps, so the prefetch
cannot start earlier). So a step's budget is the transfer bandwidth, with every GPU copying at
once, times the predicted time of the step before it on the busiest device: the previous
micro-batch in launch order, predicted by the cost model from what its last step carried (one that
has not run yet, because the GPU pool was full, as carrying what this one did). Without a fitted
model, or with one micro-batch (its next step is launched only after this one's tokens are back:
nothing computes while it would copy), the budget is 0 and auto offloads nothing.
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
        count = len(self.last_load)
        known = [load for load in self.last_load if load is not None]
        if count < 2 or not known:
            return 0
        typical = self.last_load[micro_batch] or known[0]
        before = self.last_load[(micro_batch - 1) % count] or typical
        seconds = self.cost_model.predict(*before)
        if seconds is None:
            return 0
        return int(self.bytes_per_second * seconds // self.chunk_bytes)


def staging_slot_chunks(offload: str, num_gpu_chunks: int, num_micro_batches: int, prefix_caching: bool,
                        budget_chunks: int = 0) -> int:
    """S, one slot of the staging ring (kv_manager.py), carved from a GPU pool of num_gpu_chunks.

    force: the ring is the whole pool (two thirds of it under prefix caching, whose shared chunks
    and the prompts that start from them live in the owned region: with M micro-batches a step
    then holds S + (N - 2 S) / M chunks, 5/3 of the N / M it holds without offload at M = 4). auto: what one step's prefetch
    can bring back (budget_chunks, from a fitted cost model), at most a quarter of the pool, and
    only with three micro-batches or more: the ring takes 2 S from the owned region and gives each
    micro-batch S, so with M micro-batches the GPU holds KV for N - 2 S + M S tokens' chunks, a
    gain only when M > 2. Otherwise 0: offload moves nothing, exactly as off."""
    if offload == "force":
        return num_gpu_chunks // 3 if prefix_caching else num_gpu_chunks // 2
    if offload == "auto" and num_micro_batches >= 3:
        return max(0, min(num_gpu_chunks // 4, budget_chunks))
    return 0
