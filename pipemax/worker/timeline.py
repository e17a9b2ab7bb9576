"""What ran when in this process during a run: each stage's compute, its prefetch and write-back
copies, and the host's planning. It gives the share of copy time hidden behind compute, and with
--trace a Chrome / Perfetto trace file (open it at ui.perfetto.dev or chrome://tracing).

Device work is marked with CUDA events (on the CPU, the host clock) and read only at the end of
the run, so recording costs no synchronisation in the step loop. Stage processes other than this
one keep their own time: in a distributed pipeline the timeline shows stage 0.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch


class Timeline:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.host_start = time.perf_counter()
        self.device_start = None
        if self.cuda:
            self.device_start = torch.cuda.Event(enable_timing=True)
            self.device_start.record(torch.cuda.current_stream(device))
        self.marks: list[tuple[str, str, object, object]] = []  # (track, name, start, end)

    def add(self, track: str, name: str, start, end) -> None:
        """A device interval: CUDA events on a GPU, host clock readings on the CPU."""
        self.marks.append((track, name, start, end))

    def add_host(self, name: str, start: float, end: float) -> None:
        self.marks.append(("host", name, ("host", start), ("host", end)))

    def intervals(self) -> list[tuple[str, str, float, float]]:
        """(track, name, start s, end s) from the run's start. Waits for the device once: call it
        after the run."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        out = []
        for track, name, start, end in self.marks:
            out.append((track, name, self._seconds(start), self._seconds(end)))
        return out

    def _seconds(self, mark) -> float:
        if isinstance(mark, tuple):  # the host's clock
            return mark[1] - self.host_start
        if isinstance(mark, float):
            return mark - self.host_start
        return self.device_start.elapsed_time(mark) / 1000

    def write_trace(self, path: str | Path, intervals=None) -> None:
        intervals = self.intervals() if intervals is None else intervals
        tracks = sorted({track for track, *_ in intervals}, key=_track_order)
        tid = {track: index for index, track in enumerate(tracks)}
        events = [{"name": "thread_name", "ph": "M", "pid": 0, "tid": tid[track], "args": {"name": track}}
                  for track in tracks]
        events += [{"name": name, "ph": "X", "pid": 0, "tid": tid[track], "ts": start * 1e6,
                    "dur": max(0.0, end - start) * 1e6} for track, name, start, end in intervals]
        # A temporary file renamed over the trace: a failed write leaves the old file whole.
        path = Path(path)
        partial = path.with_name(f".{path.name}.partial")
        try:
            partial.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)


def hidden_fraction(intervals: list[tuple[str, str, float, float]], concurrent: bool = True) -> float | None:
    """The share of copy time that ran while compute ran (on this process's device); None
    without copies. concurrent=False: copies and compute share one thread (the CPU), so a copy
    inside a compute span still ran alone: none is hidden."""
    compute = _union([(s, e) for track, _, s, e in intervals if track.endswith("compute")])
    copies = [(s, e) for track, _, s, e in intervals if track.endswith(("prefetch", "write-back"))]
    total = sum(e - s for s, e in copies)
    if total <= 0:
        return None
    if not concurrent:
        return 0.0
    hidden, first = 0.0, 0  # one sweep: copies by start, compute spans disjoint and sorted
    for start, end in sorted(copies):
        while first < len(compute) and compute[first][1] <= start:
            first += 1
        index = first
        while index < len(compute) and compute[index][0] < end:
            hidden += max(0.0, min(end, compute[index][1]) - max(start, compute[index][0]))
            index += 1
    return hidden / total


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def _track_order(track: str):
    return (track != "host", track)
