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
from collections import deque

import torch

from pipemax.core.step_plan import StagePlan
from pipemax.worker.kv_transfers import transfer_stats
from pipemax.worker.stage import PendingTokens, StageExecutor


class StageClock:
    """When each stage's work of each step ran on the device: CUDA events there (read once they
    have completed, so timing adds no synchronisation), the host clock on the CPU. Completed
    marks fold into running sums, so a long job keeps a handful of events, not all of them."""

    def __init__(self, device: torch.device, num_stages: int):
        self.device = device
        self.cuda = device.type == "cuda"
        self.marks: deque = deque()  # (stage, start, end), not yet folded
        self.busy = [0.0] * num_stages
        self.timeline = None  # timeline.Timeline, when the run keeps one
        self.step: tuple | None = None  # (start, end) of the current step's work in this process
        self.first_start = None
        self.last_end = None

    def now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def begin_step(self) -> None:
        self.step = None

    def step_span(self):
        """(start, end) of this process's device work for the step begun last (None if none)."""
        return self.step

    def span_seconds(self, span) -> float | None:
        """A step's device seconds once its work has run (None while it has not: no waiting)."""
        start, end = span
        if self.cuda and not end.query():
            return None
        return self._seconds(start, end)

    def add(self, stage: int, start, end) -> None:
        self.step = (start if self.step is None else self.step[0], end)
        if self.timeline is not None:
            self.timeline.add(f"stage {stage} compute", "step", start, end)
        if self.first_start is None:
            self.first_start = start
        self.last_end = end
        self.marks.append((stage, start, end))
        if len(self.marks) > 64:
            self._fold()

    def _fold(self) -> None:
        while self.marks and (not self.cuda or self.marks[0][2].query()):
            stage, start, end = self.marks.popleft()
            self.busy[stage] += self._seconds(start, end)

    def folded_busy(self) -> float:
        """Device seconds of the marks already complete, every stage together (no waiting)."""
        self._fold()
        return sum(self.busy)

    def _seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1000 if self.cuda else end - start

    def stats(self) -> dict:
        """Per stage busy seconds and bubble fraction, and the share of the run the device had no
        work queued (it waited for the host). Stages share one device here, so they add up."""
        if self.first_start is None:
            return {}
        if self.cuda:
            self.last_end.synchronize()
        self._fold()
        busy = self.busy
        wall = self._seconds(self.first_start, self.last_end)
        return {
            "device_seconds": wall,
            "stage_busy_seconds": list(busy),
            "stage_bubble_fraction": [max(0.0, 1 - b / wall) if wall else 0.0 for b in busy],
            "device_waited_for_host_fraction": max(0.0, 1 - sum(busy) / wall) if wall else 0.0,
        }


class InProcessPipeline:
    def __init__(self, stages: list[StageExecutor]):
        self.stages = stages
        stages[0].sampled_source = stages[-1]  # a step may take input ids the step before samples (running ahead)
        self.start_run()

    def start_run(self, timeline=None) -> None:
        self.clock = StageClock(self.stages[0].device, len(self.stages))
        self.clock.timeline = timeline
        for stage in self.stages:
            stage.transfers.timeline = timeline
        self.counters_at_start = [stage.transfers.counters() for stage in self.stages]

    def submit(self, plan: StagePlan) -> PendingTokens:
        self.clock.begin_step()
        hidden, batch = None, None
        for stage in self.stages:
            hidden, batch = stage.execute(plan, hidden, self.clock, batch)
        return hidden

    def stats(self) -> dict:
        stats = self.clock.stats()
        stats["transfers"] = transfer_stats([stage.transfers.counters() for stage in self.stages],
                                            self.counters_at_start)
        return stats

    def reset(self) -> None:
        """Every stage back to no sequences (after an aborted run, maybe mid-step)."""
        for stage in self.stages:
            stage.reset()

    def close(self) -> None:
        pass
