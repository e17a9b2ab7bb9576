"""How step plans reach the stages: the transport interface and its in-process implementation.

The engine hands each micro-batch step to `submit` and later reads the sampled tokens from what
it returned; it never waits for a step before it has launched the other micro-batches'. A
transport also carries the KV operations and sampler releases of an aborted run (`apply`), so
every stage's KV manager stays in step with the scheduler's.

InProcessPipeline: every stage in this process, on one device, taking turns. Kernels are queued
on the device in stage order, so the host returns from `submit` as soon as the last stage's
work is queued; a P-stage schedule then runs time-shared on one GPU, and P = 1 with two
micro-batches lets the host plan one while the device runs the other.
"""

from __future__ import annotations

import time

from .stage import PendingTokens, StageExecutor
from .step_plan import StagePlan, apply_kv_ops


class InProcessPipeline:
    name = "inprocess"

    def __init__(self, stages: list[StageExecutor]):
        self.stages = stages
        self.host_seconds = [0.0] * len(stages)  # time the host spent launching each stage's work

    def submit(self, plan: StagePlan) -> PendingTokens:
        hidden = None
        for index, stage in enumerate(self.stages):
            start = time.perf_counter()
            hidden = stage.execute(plan, hidden)
            self.host_seconds[index] += time.perf_counter() - start
        return hidden

    def apply(self, kv_ops, released: list[int]) -> None:
        """KV operations and sampler releases without a step (after an aborted run)."""
        for stage in self.stages:
            apply_kv_ops(stage.kv, kv_ops)
            stage.release(released)

    def close(self) -> None:
        pass
