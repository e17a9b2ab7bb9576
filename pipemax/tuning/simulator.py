"""Timing a schedule on a server that is not at hand: a discrete-event model of P stages x M
micro-batches, over the engine's own schedule (offload_schedule.plan_schedule: the real scheduler,
without tensors).

The model, per step in launch order:
  - the host launches a round's steps at once, then waits for the steps that round takes back,
    as engine.run does; a micro-batch is launched again only after its last step came back;
  - stage s computes a step after stage s - 1 has (plus the activations' transfer over the link
    between them) and after its own previous step, in launch order;
  - a step's prefetch (host -> GPU) is issued when the step is launched (the host replays every
    stage's KV operations then) and runs on the stage's copy engine, one copy at a time; the step
    computes only when its prefetch has landed; write-back rows share the opposite direction and
    delay nothing;
  - a stage's compute time is its cost model, alpha * tokens + beta * context + delta.
It answers throughput, each stage's utilisation (and so its bubbles) and the PCIe bytes moved.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipemax.core.offload_schedule import Schedule


@dataclass(frozen=True)
class StageCosts:
    alpha: float  # seconds per token computed
    beta: float  # seconds per context token read by attention
    delta: float  # seconds per step (weights, launches)

    def seconds(self, tokens: int, context_tokens: int) -> float:
        return self.alpha * tokens + self.beta * context_tokens + self.delta


@dataclass(frozen=True)
class SimulatedServer:
    stages: tuple[StageCosts, ...]  # one per pipeline stage
    pcie_bytes_per_second: float  # host <-> GPU, each direction, per GPU
    link_bytes_per_second: float  # activations between consecutive stages
    chunk_bytes: tuple[int, ...]  # one KV chunk of each stage's layers
    activation_bytes_per_token: int  # hidden state handed from stage to stage


@dataclass
class Simulation:
    seconds: float
    generated_tokens: int
    computed_tokens: int
    stage_busy_seconds: list[float]
    prefetched_bytes: int
    written_back_bytes: int

    @property
    def generated_tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0

    @property
    def stage_utilisation(self) -> list[float]:
        return [busy / self.seconds if self.seconds else 0.0 for busy in self.stage_busy_seconds]

    @property
    def prefetch_gbs(self) -> float:
        """Host -> GPU traffic of each GPU, GB/s over the run (one direction: the prefetch budget's)."""
        moved = self.prefetched_bytes / len(self.stage_busy_seconds)
        return moved / self.seconds / 1e9 if self.seconds else 0.0

    @property
    def pcie_gbs(self) -> float:
        """PCIe traffic of each GPU (a stage per GPU), both directions, GB/s over the run."""
        moved = (self.prefetched_bytes + self.written_back_bytes) / len(self.stage_busy_seconds)
        return moved / self.seconds / 1e9 if self.seconds else 0.0


def simulate(schedule: Schedule, server: SimulatedServer, chunk_tokens: int) -> Simulation:
    stages = len(server.stages)
    stage_free = [0.0] * stages
    copy_free = [0.0] * stages
    busy = [0.0] * stages
    finished_at: dict[int, float] = {}  # step index -> when its last stage finished
    host = 0.0
    prefetched = written_back = computed = 0
    row_bytes = [chunk // chunk_tokens for chunk in server.chunk_bytes]
    for round_ in schedule.rounds:
        launched_at = host
        for step in round_.launched:
            arrival = launched_at
            for stage, costs in enumerate(server.stages):
                ready = arrival
                if step.prefetch_chunks:
                    copy_start = max(launched_at, copy_free[stage])
                    copy_free[stage] = copy_start + step.prefetch_chunks * server.chunk_bytes[stage] / \
                        server.pcie_bytes_per_second
                    ready = max(ready, copy_free[stage])
                start = max(ready, stage_free[stage])
                duration = costs.seconds(step.tokens, step.context_tokens)
                stage_free[stage] = start + duration
                busy[stage] += duration
                arrival = stage_free[stage]
                if stage + 1 < stages:
                    arrival += step.tokens * server.activation_bytes_per_token / server.link_bytes_per_second
                prefetched += step.prefetch_chunks * server.chunk_bytes[stage]
                written_back += step.written_back_rows * row_bytes[stage]
            finished_at[step.index] = stage_free[-1]
            computed += step.tokens
        for index in round_.returned:  # the host waits for these before its next round
            host = max(host, finished_at[index])
    seconds = max([host, *stage_free])
    generated = sum(outputs for _, outputs in schedule.requests)  # every request finishes in a schedule
    return Simulation(seconds, generated, computed, busy, prefetched, written_back)
