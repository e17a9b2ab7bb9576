"""One stage's KV copies between its GPU pool and its pinned host pool, off the compute stream.

Prefetches (host -> staging or owned chunks) run on a host-to-device stream, offloads and
write-back rows (GPU -> host) on a device-to-host stream; both are Triton kernels that read or
write the pinned host pool directly (kv_pool.py). The stage replays each plan's KV operations
through `replay`, which runs their copies and orders everything by CUDA events, never a
synchronize, and never more than the chunks involved need:

  - the staging ring (kv_manager.py): step n computes its host-resident sequences in slot
    n mod 2. The slot remembers the events that ended its last step's compute and write-through
    on this stage; a prefetch into the slot (issued when the plan arrives, while the step before
    computes) and the compute of the step that uses it wait for them, so the ring never holds
    more than the step computing and the step being prefetched;
  - each sequence remembers the event that ended its last step's compute and the event that
    ended its last copy to the host; a prefetch waits for that last write to the host (it reads
    the host copy back);
  - when a sequence's owned chunks are freed (finished, preempted, offloaded), each chunk
    remembers those events: its last reader and writers; when its host chunks are freed, each
    remembers the last prefetch that read it, and the next copy writing it waits;
  - an offload waits for its sequence's last compute and last prefetch or fetch; a write-back for
    this step's compute;
  - a step's compute waits for its prefetches and for the events of chunks newly handed to it.

Shared prefix chunks (kv_prefix_cache.py) have many readers: a sequence letting one go marks it
with the stage's latest compute and write-back events (every read so far came before them). A
demotion (GPU -> host) waits for those; the chunk's next writer waits for the demotion. A promotion
(host -> GPU) waits for the chunk it fills and for the demotion that wrote its host copy, and the
step waits for it. A host chunk a promotion reads is written again (once the host tier gave it
up) only after that read: the write-back stream waits for it.

So no chunk is written before every copy and step touching its previous contents has run,
though the KV manager hands freed ids out at once. On the CPU the copies run at once, in order,
and nothing needs waiting for.

Priorities (CUDA stream priorities, lower is more urgent): activations between stages first
(NCCL's high-priority streams, distributed.init_world), then the prefetch for the next
micro-batch, then write-back, which nothing waits for until its sequence's next prefetch.
Priorities only order the blocks waiting for an SM; they never preempt running work.
"""

from __future__ import annotations

import time

import torch

from pipemax.core.kv_manager import KVManager, RowCopy
from pipemax.core.step_plan import apply_kv_ops

from .kv_pool import KVPool, KVPoolSpec

PREFETCH_PRIORITY = -1  # ahead of write-back and of compute kernels' waiting blocks
WRITE_BACK_PRIORITY = 0  # the default priority: behind everything more urgent


class KVTransfers:
    def __init__(self, pool: KVPool):
        self.pool = pool
        self.enabled = pool.num_host_chunks > 0  # offload on: without a host pool this is all a no-op
        self.cuda = pool.device.type == "cuda"
        if self.cuda:
            self.h2d = torch.cuda.Stream(device=pool.device, priority=PREFETCH_PRIORITY)
            self.d2h = torch.cuda.Stream(device=pool.device, priority=WRITE_BACK_PRIORITY)
        self.last_compute: dict[int, object] = {}  # seq_id -> event ending its last step
        self.last_to_host: dict[int, object] = {}  # seq_id -> event ending its last copy to the host
        self.chunk_busy: dict[int, list] = {}  # freed GPU chunk -> events to wait for before writing it
        self.claimed: dict[int, list] = {}  # chunk handed out this plan -> its busy events (till compute)
        self.compute_waits: list = []  # events the next step's compute must wait for
        self.host_busy: dict[int, object] = {}  # host chunk -> the event ending the last copy reading or writing it
        self.latest_compute = None  # the event ending this stage's latest step
        self.latest_to_host = None  # the event ending this stage's latest copy to the host
        self.last_from_host: dict[int, object] = {}  # seq_id -> the event ending its last prefetch
        self.slot = 0  # the staging slot of the step being replayed
        self.slot_busy: list[list] = [[], []]  # per slot: its last step's compute and write-through events
        self.chunk_bytes = pool.spec.chunk_bytes
        self.row_bytes = pool.spec.chunk_bytes // pool.spec.chunk_tokens
        self.bytes_prefetched = 0
        self.bytes_offloaded = 0
        self.bytes_written_back = 0
        self.copy_seconds = 0.0  # CPU: time spent copying; CUDA: folded from completed events
        self.marks: list = []  # CUDA: (start event, end event) not yet folded into copy_seconds
        self.timeline = None  # timeline.Timeline, when the run keeps one
        self.track = "stage"  # the timeline's name for this stage

    # ---- replaying a plan's KV operations ----------------------------------------------------
    def replay(self, kv: KVManager, ops) -> None:
        """Apply the scheduler's KV operations to this stage's manager, with their copies (no
        host pool: no copies, nothing to order)."""
        apply_kv_ops(kv, ops, self if self.enabled else None)

    def begin_step(self, step: int) -> None:
        """The plan's step (its number) uses staging slot step mod 2."""
        self.slot = step % 2

    def end_step(self) -> None:
        """The step's compute and write-through are issued: the slot's next user waits for them."""
        if self.cuda:
            self.slot_busy[self.slot] = [e for e in (self.latest_compute, self.latest_to_host) if e is not None]

    def freeing(self, seq_id: int, gpu_chunks: list[int], finished: bool = False, cached=(),
                host_chunks=()) -> None:
        """The sequence's owned chunks (and host chunks) are about to be freed: each remembers
        what last used it (a shared prefix chunk in `cached`: everything so far on this stage)."""
        if not self.cuda:
            return
        read = self.last_from_host.pop(seq_id, None) if finished else None
        if read is not None:
            for chunk in host_chunks:
                self.host_busy[chunk] = read
        events = [e for e in (self.last_compute.get(seq_id), self.last_to_host.get(seq_id)) if e is not None]
        shared_events = [e for e in (self.latest_compute, self.latest_to_host) if e is not None]
        cached = set(cached)
        for chunk in gpu_chunks:
            # Taken and freed again before any compute (a preemption in the same plan): the copies
            # of its earlier owner may still be running, and the next writer must wait for them too.
            self.chunk_busy[chunk] = (shared_events if chunk in cached else events) + self.claimed.pop(chunk, [])
        if finished:
            self.last_compute.pop(seq_id, None)
            self.last_to_host.pop(seq_id, None)

    def claim(self, gpu_chunks: list[int]) -> None:
        """Chunks handed to a sequence whose step will write them: that compute waits for them."""
        if not self.cuda:
            return
        for chunk in gpu_chunks:
            events = self.chunk_busy.pop(chunk, [])
            if events:
                self.claimed[chunk] = events
                self.compute_waits += events

    def claim_host(self, host_chunks: list[int]) -> None:
        """Host chunks handed to a sequence, written next by copies to the host: those copies
        (one stream) come after any promotion still reading them."""
        if not self.cuda:
            return
        for chunk in host_chunks:
            event = self.host_busy.pop(chunk, None)
            if event is not None:
                self.d2h.wait_event(event)

    # ---- copies --------------------------------------------------------------------------
    def demote(self, pairs: list[tuple[int, int]]) -> None:
        """(GPU chunk, host chunk) pairs of cached prefix chunks leaving the GPU, GPU -> host,
        before the GPU chunks' next writer."""
        gpu_ids, host_ids = zip(*pairs)
        self.bytes_offloaded += len(pairs) * self.chunk_bytes
        waits = []
        if self.cuda:
            for gpu, host in pairs:
                waits += self.chunk_busy.get(gpu, []) + self.claimed.get(gpu, []) + [self.host_busy.pop(host, None)]
        with self._copy("d2h", "demote prefix", waits) as scope:
            self.pool.offload(gpu_ids, host_ids)
        if self.cuda:
            for gpu, host in pairs:
                self.chunk_busy[gpu] = [scope.end]
                self.claimed.pop(gpu, None)
                self.host_busy[host] = scope.end

    def promote(self, pairs: list[tuple[int, int]]) -> None:
        """(host chunk, GPU chunk) pairs of cached prefix chunks coming back for a hit, host ->
        GPU, before the step that reads them."""
        host_ids, gpu_ids = zip(*pairs)
        self.bytes_prefetched += len(pairs) * self.chunk_bytes
        waits = []
        if self.cuda:
            for host, gpu in pairs:
                waits += self.chunk_busy.pop(gpu, []) + self.claimed.pop(gpu, []) + [self.host_busy.get(host)]
        with self._copy("h2d", "promote prefix", waits) as scope:
            self.pool.prefetch(host_ids, gpu_ids)
        if self.cuda:
            self.compute_waits.append(scope.end)
            for host, gpu in pairs:
                self.host_busy[host] = scope.end
                self.claimed[gpu] = [scope.end]

    def prefetch(self, seq_id: int, pairs: list[tuple[int, int]], host_freed: bool = False) -> None:
        """(host chunk, GPU chunk) pairs of one sequence, host -> its staging slot (a staged
        sequence) or owned chunks (a fetch, after which its host chunks are freed: host_freed)."""
        if not pairs:
            return
        host_ids, gpu_ids = zip(*pairs)
        self.bytes_prefetched += len(pairs) * self.chunk_bytes
        waits = [self.last_to_host.get(seq_id)]  # its host copy's last rows must have landed
        if self.cuda:
            waits += self.slot_busy[self.slot]  # the slot's last compute and write-through
            for chunk in gpu_ids:
                waits += self.chunk_busy.pop(chunk, []) + self.claimed.pop(chunk, [])
        with self._copy("h2d", "prefetch", waits) as scope:
            self.pool.prefetch(host_ids, gpu_ids)
        if self.cuda:
            self.compute_waits.append(scope.end)
            self.last_from_host[seq_id] = scope.end
            if host_freed:
                for chunk in host_ids:
                    self.host_busy[chunk] = scope.end

    def offload(self, seq_id: int, pairs: list[tuple[int, int]]) -> None:
        """(GPU chunk, host chunk) pairs of one sequence, GPU -> host, after its last step."""
        if not pairs:
            return
        gpu_ids, host_ids = zip(*pairs)
        self.bytes_offloaded += len(pairs) * self.chunk_bytes
        # After its last step, and after the last copy that filled its chunks (a fetch back to
        # owned chunks with no step since, under auto: the budget moved twice).
        with self._copy("d2h", "offload", [self.last_compute.get(seq_id), self.last_from_host.get(seq_id)]) as scope:
            self.pool.offload(gpu_ids, host_ids)
        if self.cuda:
            self.last_to_host[seq_id] = scope.end

    def write_back(self, rows_of: dict[int, list[RowCopy]]) -> None:
        """New rows of staged sequences (seq_id -> rows) to their host copies, all layers at once
        after this step's compute (call after_compute first): a decode step's few rows."""
        rows = [row for seq_rows in rows_of.values() for row in seq_rows]
        if not rows:
            return
        self.bytes_written_back += len(rows) * self.row_bytes
        waits = [self.last_compute.get(seq_id) for seq_id in rows_of]
        with self._copy("d2h", "write rows", waits[:1]) as scope:  # one step: one compute event
            self.pool.write_back([r.gpu_chunk for r in rows], [r.host_chunk for r in rows], [r.row for r in rows])
        if self.cuda:
            for seq_id in rows_of:
                self.last_to_host[seq_id] = scope.end

    def write_back_by_layer(self, rows_of: dict[int, list[RowCopy]]):
        """For a step whose staged sequences carry prefill rows: the hook the attention calls
        right after storing each layer's KV. Each call copies that layer's rows to the host on
        the write-back stream, after an event at that point of the compute stream, so a
        prefill's KV reaches the host while the following layers compute. None without rows."""
        rows = [row for seq_rows in rows_of.values() for row in seq_rows]
        if not rows:
            return None
        ids = self.pool.row_ids([r.gpu_chunk for r in rows], [r.host_chunk for r in rows], [r.row for r in rows])
        if self.cuda:  # allocated on the compute stream, read by copies on the write-back stream:
            for tensor in ids:  # the allocator must not hand them out again before those copies ran
                tensor.record_stream(self.d2h)
        layer_bytes = len(rows) * self.row_bytes // self.pool.spec.num_layers

        def after_store(layer: int) -> None:
            self.bytes_written_back += layer_bytes
            stored = None
            if self.cuda:
                stored = torch.cuda.Event()
                stored.record(torch.cuda.current_stream(self.pool.device))
            with self._copy("d2h", f"write rows L{layer}", [stored]) as scope:
                self.pool.write_rows(ids, layer, 1)
            if self.cuda:
                for seq_id in rows_of:
                    self.last_to_host[seq_id] = scope.end

        return after_store

    # ---- the compute stream ------------------------------------------------------------------
    def before_compute(self) -> None:
        """The step's compute waits for its prefetches and for the chunks it was handed."""
        self.claimed = {}  # this compute waits for them: later writers come after it on this stream
        if self.cuda:  # (new rows go into the slot too: after its last write-through)
            self.compute_waits += self.slot_busy[self.slot]
        if not self.cuda or not self.compute_waits:
            self.compute_waits = []
            return
        stream = torch.cuda.current_stream(self.pool.device)
        for event in {id(e): e for e in self.compute_waits}.values():
            stream.wait_event(event)
        self.compute_waits = []

    def after_compute(self, seq_ids: list[int]) -> None:
        """Marks the end of a step's compute for its sequences' later copies and chunk reuse."""
        if not self.cuda or not self.enabled:
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.pool.device))
        self.latest_compute = event
        for seq_id in seq_ids:
            self.last_compute[seq_id] = event

    def reset(self) -> None:
        """No sequence left (after an abort): the events stay valid, the bookkeeping goes."""
        self.last_compute.clear()
        self.last_to_host.clear()
        self.compute_waits = []
        self.claimed = {}
        self.host_busy.clear()
        self.last_from_host.clear()
        self.slot_busy = [[], []]
        if self.cuda:  # a later step must not overwrite chunks that copies still read
            torch.cuda.current_stream(self.pool.device).wait_stream(self.h2d)
            torch.cuda.current_stream(self.pool.device).wait_stream(self.d2h)
        self.chunk_busy.clear()

    # ---- figures -------------------------------------------------------------------------
    def counters(self) -> dict:
        """Totals since this stage was built: bytes moved, and the copies' own time (CUDA: summed
        from completed events, no waiting)."""
        if self.cuda:
            pending = []
            for start, end in self.marks:
                if end.query():
                    self.copy_seconds += start.elapsed_time(end) / 1000
                else:
                    pending.append((start, end))
            self.marks = pending
        return {"bytes_prefetched": self.bytes_prefetched, "bytes_offloaded": self.bytes_offloaded,
                "bytes_written_back": self.bytes_written_back, "copy_seconds": self.copy_seconds}

    def _copy(self, kind: str, name: str, waits: list):
        return _CopyScope(self, kind, name, [w for w in waits if w is not None])


class _CopyScope:
    """Runs a copy on its stream after the events it depends on, and records its end."""

    def __init__(self, transfers: KVTransfers, kind: str, name: str, waits: list):
        self.t, self.kind, self.name, self.waits = transfers, kind, name, waits
        self.end = None

    def __enter__(self):
        t = self.t
        if not t.cuda:
            self.started = time.perf_counter()
            return self
        self.stream = t.h2d if self.kind == "h2d" else t.d2h
        for event in {id(e): e for e in self.waits}.values():
            self.stream.wait_event(event)
        self.context = torch.cuda.stream(self.stream)
        self.context.__enter__()
        self.start = torch.cuda.Event(enable_timing=True)
        self.start.record(self.stream)
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
        self.end = torch.cuda.Event(enable_timing=True)
        self.end.record(self.stream)
        self.context.__exit__(*exc)
        if self.kind == "d2h":
            t.latest_to_host = self.end
        if t.timeline is not None:
            t.timeline.add(track, self.name, self.start, self.end)
        t.marks.append((self.start, self.end))
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


def measure_copy_bandwidth(spec: KVPoolSpec, device: torch.device, total_bytes: int = 64 * 2**20) -> float:
    """Bytes per second of this engine's own prefetch: chunks of `spec`, scattered over a pinned
    host pool, gathered into a device pool by the copy kernel (KVPool.prefetch), timed once at
    start-up: the rate a prefetch budget can count on. Every stage of the engine copies in the
    same step: in process they share this device and this rate; a pipeline of stage processes
    on several GPUs that share a PCIe switch gets less each, which `pipemax autotune` measures
    (microbench.concurrent_prefetch_rate) and `--prefetch-gbs` passes on."""
    count = max(4, total_bytes // spec.chunk_bytes)
    pool = KVPool(spec, count, count, device, "triton" if device.type == "cuda" else "torch")
    generator = torch.Generator().manual_seed(0)
    host_ids = torch.randperm(count, generator=generator).tolist()
    gpu_ids = torch.randperm(count, generator=generator).tolist()
    pool.prefetch(host_ids, gpu_ids)  # warm-up: the kernel compiled, the pages touched
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(torch.cuda.current_stream(device))
        for _ in range(3):
            pool.prefetch(host_ids, gpu_ids)
        end.record(torch.cuda.current_stream(device))
        end.synchronize()  # at start-up, not in the step loop
        return 3 * count * spec.chunk_bytes / (start.elapsed_time(end) / 1000)
    started = time.perf_counter()
    pool.prefetch(host_ids, gpu_ids)
    return count * spec.chunk_bytes / max(time.perf_counter() - started, 1e-9)
