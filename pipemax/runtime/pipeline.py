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

import torch

from .stage import PendingTokens, StageExecutor
from .step_plan import StagePlan, apply_kv_ops


class StageClock:
    """When each stage's work of each step ran on the device: CUDA events there (read once the
    run is over, so timing adds no synchronisation), the host clock on the CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[int, object, object]] = []  # (stage, start, end)

    def now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1000 if self.cuda else end - start

    def stats(self, num_stages: int) -> dict:
        """Per stage busy seconds and bubble fraction, and the share of the run the device had no
        work queued (it waited for the host). Stages share one device here, so they add up."""
        if not self.marks:
            return {}
        if self.cuda:
            self.marks[-1][2].synchronize()
        busy = [0.0] * num_stages
        for stage, start, end in self.marks:
            busy[stage] += self.seconds(start, end)
        wall = self.seconds(self.marks[0][1], self.marks[-1][2])
        return {
            "device_seconds": wall,
            "stage_busy_seconds": busy,
            "stage_bubble_fraction": [max(0.0, 1 - b / wall) if wall else 0.0 for b in busy],
            "device_waited_for_host_fraction": max(0.0, 1 - sum(busy) / wall) if wall else 0.0,
        }


class InProcessPipeline:
    name = "inprocess"

    def __init__(self, stages: list[StageExecutor]):
        self.stages = stages
        self.clock = StageClock(stages[0].device)

    def start_run(self) -> None:
        self.clock = StageClock(self.stages[0].device)

    def submit(self, plan: StagePlan) -> PendingTokens:
        hidden = None
        for stage in self.stages:
            hidden = stage.execute(plan, hidden, self.clock)
        return hidden

    def stats(self) -> dict:
        return self.clock.stats(len(self.stages))

    def apply(self, kv_ops, released: list[int]) -> None:
        """KV operations and sampler releases without a step (after an aborted run)."""
        for stage in self.stages:
            apply_kv_ops(stage.kv, kv_ops)
            stage.release(released)

    def close(self) -> None:
        pass


def describe_run(stats: dict) -> str:
    """One line of a run's pipeline figures for summaries ("" when nothing ran)."""
    if not stats.get("steps"):
        return ""
    line = (f"pipeline: {stats['stages']} stage(s) of {'/'.join(map(str, stats['stage_layers']))} layers, "
            f"{stats['micro_batches']} micro-batch(es), {stats['steps']} steps of {stats['mean_micro_batch_seqs']:.1f} "
            "sequences on average")
    if "stage_busy_seconds" in stats:
        busy = ", ".join(f"{1 - bubble:.0%}" for bubble in stats["stage_bubble_fraction"])
        line += (f"; stage busy {busy} of {stats['device_seconds']:.2f} s; device waited for the host "
                 f"{stats['device_waited_for_host_fraction']:.0%}")
    return line
