"""One stage's KV copies between its GPU pool and its pinned host pool, off the compute stream.

Prefetches (host -> staging chunks) run on a host-to-device stream, offloads and write-back rows
(GPU -> host) on a device-to-host stream; both are Triton kernels that read or write the pinned
host pool directly (kv_pool.py). Ordering is by CUDA events, never a synchronize:

  - a copy out of the GPU pool waits for the compute queued before it (the KV it copies was
    produced there);
  - a prefetch waits for that compute too (its staging chunks may have been freed by a step still
    reading them) and for the last device-to-host copy (chunks freed by an offload still being
    read, or a host copy still being written);
  - a step's compute waits for the last prefetch (its KV) and the last device-to-host copy
    (chunks it writes may just have been freed by one).

The KV manager frees and hands out ids at once; these rules are what makes that safe: no chunk
is written again before every copy touching it has run. They are coarser than per-chunk events
(a step waits for every earlier copy, not only its own), which costs nothing while copies finish
within the step before them, the regime the scheduler's budget aims for.

On the CPU the copies run at once, in order, and nothing needs waiting for.
"""

from __future__ import annotations

import time

import torch

from .kv_manager import RowCopy
from .kv_pool import KVPool


class KVTransfers:
    def __init__(self, pool: KVPool):
        self.pool = pool
        self.cuda = pool.device.type == "cuda"
        if self.cuda:
            self.h2d = torch.cuda.Stream(device=pool.device)
            self.d2h = torch.cuda.Stream(device=pool.device)
            self.last_h2d: torch.cuda.Event | None = None
            self.last_d2h: torch.cuda.Event | None = None
        self.chunk_bytes = pool.spec.chunk_bytes
        self.row_bytes = pool.spec.chunk_bytes // pool.spec.chunk_tokens
        self.bytes_prefetched = 0
        self.bytes_offloaded = 0
        self.bytes_written_back = 0
        self.copy_seconds = 0.0  # CPU only: time spent copying (on CUDA the copies overlap compute)
        self.marks: list = []  # CUDA: (kind, start event, end event) for the stats
        self.timeline = None  # timeline.Timeline, when the run keeps one
        self.track = "stage"  # the timeline's name for this stage

    # ---- copies --------------------------------------------------------------------------
    def prefetch(self, pairs: list[tuple[int, int]]) -> None:
        """(host chunk, GPU chunk) pairs, host -> staging."""
        if not pairs:
            return
        host_ids, gpu_ids = zip(*pairs)
        self.bytes_prefetched += len(pairs) * self.chunk_bytes
        with self._on("h2d", "prefetch", wait_for_d2h=True):
            self.pool.prefetch(host_ids, gpu_ids)

    def offload(self, pairs: list[tuple[int, int]]) -> None:
        """(GPU chunk, host chunk) pairs, GPU -> host."""
        if not pairs:
            return
        gpu_ids, host_ids = zip(*pairs)
        self.bytes_offloaded += len(pairs) * self.chunk_bytes
        with self._on("d2h", "offload"):
            self.pool.offload(gpu_ids, host_ids)

    def write_back(self, rows: list[RowCopy]) -> None:
        """New rows of staged sequences, written through to their host copies."""
        if not rows:
            return
        self.bytes_written_back += len(rows) * self.row_bytes
        with self._on("d2h", "write rows"):
            self.pool.write_back([r.gpu_chunk for r in rows], [r.host_chunk for r in rows], [r.row for r in rows])

    def before_compute(self) -> None:
        """The compute stream waits for the copies queued so far (see the module's rules)."""
        if not self.cuda:
            return
        stream = torch.cuda.current_stream(self.pool.device)
        for event in (self.last_h2d, self.last_d2h):
            if event is not None:
                stream.wait_event(event)

    # ---- figures -------------------------------------------------------------------------
    def counters(self) -> dict:
        """Totals since this stage was built: bytes moved, and the copies' own time (CUDA: summed
        from completed events, no waiting)."""
        seconds = self.copy_seconds
        if self.cuda:
            done = [m for m in self.marks if m[2].query()]
            seconds += sum(start.elapsed_time(end) / 1000 for _, start, end in done)
            self.copy_seconds = seconds
            self.marks = [m for m in self.marks if not m[2].query()]
        return {"bytes_prefetched": self.bytes_prefetched, "bytes_offloaded": self.bytes_offloaded,
                "bytes_written_back": self.bytes_written_back, "copy_seconds": seconds}

    def _on(self, kind: str, name: str, wait_for_d2h: bool = False):
        return _CopyScope(self, kind, name, wait_for_d2h)


class _CopyScope:
    """Runs a copy on its stream after the work it depends on, and records its end."""

    def __init__(self, transfers: KVTransfers, kind: str, name: str, wait_for_d2h: bool):
        self.t, self.kind, self.name, self.wait_for_d2h = transfers, kind, name, wait_for_d2h

    def __enter__(self):
        t = self.t
        if not t.cuda:
            self.started = time.perf_counter()
            return self
        stream = t.h2d if self.kind == "h2d" else t.d2h
        stream.wait_stream(torch.cuda.current_stream(t.pool.device))  # the compute queued so far
        if self.wait_for_d2h and t.last_d2h is not None:
            stream.wait_event(t.last_d2h)
        self.context = torch.cuda.stream(stream)
        self.context.__enter__()
        self.start = torch.cuda.Event(enable_timing=True)
        self.start.record(stream)
        self.stream = stream
        return self

    def __exit__(self, *exc):
        t = self.t
        track = f"{t.track} {'prefetch' if self.kind == 'h2d' else 'write-back'}"
        if not t.cuda:
            ended = time.perf_counter()
            t.copy_seconds += ended - self.started
            if t.timeline is not None:
                t.timeline.add(track, self.name, self.started, ended)
            return False
        end = torch.cuda.Event(enable_timing=True)
        end.record(self.stream)
        self.context.__exit__(*exc)
        if t.timeline is not None:
            t.timeline.add(track, self.name, self.start, end)
        if self.kind == "h2d":
            t.last_h2d = end
        else:
            t.last_d2h = end
        t.marks.append((self.kind, self.start, end))
        if len(t.marks) > 256:
            t.counters()  # fold the completed ones
        return False


def transfer_stats(now: list[dict], before: list[dict]) -> dict:
    """A run's copies on every stage together: totals of `counters()` now minus at its start, and
    the bandwidth the copies achieved while they ran."""
    total = {key: sum(n.get(key, 0) - b.get(key, 0) for n, b in zip(now, before))
             for key in ("bytes_prefetched", "bytes_offloaded", "bytes_written_back", "copy_seconds")}
    moved = total["bytes_prefetched"] + total["bytes_offloaded"] + total["bytes_written_back"]
    total["copy_gb_per_s"] = moved / total["copy_seconds"] / 1e9 if total["copy_seconds"] else 0.0
    return total


def measure_copy_bandwidth(device: torch.device, nbytes: int = 64 * 2**20) -> float:
    """Bytes per second of one large copy from pinned host memory to `device` (host to host on
    the CPU), timed once at start-up: the rate a prefetch budget can count on."""
    if device.type == "cuda":
        source = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        target = torch.empty(nbytes, dtype=torch.uint8, device=device)
        target.copy_(source, non_blocking=True)  # warm-up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        stream = torch.cuda.current_stream(device)
        start.record(stream)
        for _ in range(3):
            target.copy_(source, non_blocking=True)
        end.record(stream)
        end.synchronize()  # at start-up, not in the step loop
        return 3 * nbytes / (start.elapsed_time(end) / 1000)
    source = torch.empty(nbytes, dtype=torch.uint8)
    target = torch.empty(nbytes, dtype=torch.uint8)
    target.copy_(source)
    started = time.perf_counter()
    target.copy_(source)
    return nbytes / max(time.perf_counter() - started, 1e-9)
