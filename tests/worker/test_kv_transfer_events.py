"""The order KVTransfers puts copies and steps in on CUDA, checked on the CPU.

Its waits exist only on CUDA (on the CPU every copy runs at once, in program order), so no CPU run
of the engine reaches them. Here torch.cuda's streams and events are fakes: the real KVTransfers,
KVManager and KVPool take the CUDA path, each copy or step lands on a fake stream, and
`FakeCuda.precedes(a, b)` answers what the device would guarantee: a finishes before b starts,
through the order of b's stream and the events it waited for (followed from stream to stream).
The copies themselves run at once on CPU tensors.

Each test replays plans that the scheduler's manager (RecordingKVManager) logged, as a stage does,
and asserts the ordering facts of kv_transfers.py's docstring.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from pipemax.core.kv_manager import KVManager
from pipemax.core.step_plan import RecordingKVManager
from pipemax.worker import kv_transfers
from pipemax.worker.kv_pool import KVPool, KVPoolSpec
from pipemax.worker.kv_transfers import KVTransfers


@dataclass(eq=False)
class Work:
    """A copy or a step on a stream: "to_gpu" (prefetch, fetch, promotion), "to_host" (offload,
    demotion), "rows_to_host" (write-through) or "compute"; source and destination chunk ids."""
    name: str
    stream: FakeStream
    src: tuple = ()
    dst: tuple = ()


class FakeStream:
    def __init__(self, name: str):
        self.name = name
        self.queue: list = []  # Work and the FakeEvents waited for, in the order they were enqueued

    def wait_event(self, event: FakeEvent) -> None:
        self.queue.append(event)

    def wait_stream(self, other: FakeStream) -> None:
        event = FakeEvent()
        event.record(other)
        self.wait_event(event)


class FakeEvent:
    def __init__(self, enable_timing: bool = False):
        self.stream, self.position = None, 0  # never recorded: waiting for it waits for nothing, as on CUDA

    def record(self, stream: FakeStream) -> None:
        self.stream, self.position = stream, len(stream.queue)  # completes once everything before it did

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: FakeEvent) -> float:
        return 0.0


class FakeCuda:
    """torch.cuda's streams and events replaced (for the test's duration), and the work logged."""

    def __init__(self, monkeypatch):
        self.compute = FakeStream("compute")
        self.current = self.compute
        self.work: list[Work] = []
        names = {kv_transfers.PREFETCH_PRIORITY: "host-to-device", kv_transfers.WRITE_BACK_PRIORITY: "device-to-host"}
        monkeypatch.setattr(torch.cuda, "Stream", lambda device=None, priority=0: FakeStream(names[priority]))
        monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: self.current)
        monkeypatch.setattr(torch.cuda, "stream", self.use)

    @contextlib.contextmanager
    def use(self, stream: FakeStream):
        before, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = before

    def enqueue(self, name: str, src=(), dst=()) -> Work:
        work = Work(name, self.current, tuple(src), tuple(dst))
        self.current.queue.append(work)
        self.work.append(work)
        return work

    def last(self, name: str) -> Work:
        return [work for work in self.work if work.name == name][-1]

    def precedes(self, first: Work, later: Work) -> bool:
        """Whether `first` has finished whenever `later` starts: it is before `later` on its stream,
        or before an event that `later`'s stream waited for earlier, and so on."""
        scanned: dict[FakeStream, int] = {}  # stream -> length of its queue's prefix already searched
        frontier = [(later.stream, later.stream.queue.index(later))]
        while frontier:
            stream, end = frontier.pop()
            start = scanned.get(stream, 0)
            if end <= start:
                continue
            scanned[stream] = end
            for item in stream.queue[start:end]:
                if item is first:
                    return True
                if isinstance(item, FakeEvent) and item.stream is not None:
                    frontier.append((item.stream, item.position))
        return False


class Stage:
    """One stage's KV manager, pool and transfers on the fake device, driven as StageExecutor.execute
    drives them, with a logged compute in place of the model."""

    def __init__(self, monkeypatch, num_gpu_chunks: int, num_host_chunks: int, staging_chunks: int = 0):
        self.cuda = FakeCuda(monkeypatch)
        spec = KVPoolSpec(num_layers=1, num_kv_heads=1, head_dim=16, chunk_tokens=8, dtype=torch.float32)
        self.kv = KVManager(num_gpu_chunks, num_host_chunks, spec.chunk_tokens, staging_chunks)
        self.pool = KVPool(spec, num_gpu_chunks, num_host_chunks, "cpu", backend="torch")
        with monkeypatch.context() as building:
            building.setattr(self.pool, "device", torch.device("cuda"))  # so the transfers take the CUDA path
            self.transfers = KVTransfers(self.pool)
        assert self.transfers.cuda and self.transfers.h2d.name == "host-to-device"
        for method, name in (("prefetch", "to_gpu"), ("offload", "to_host")):
            monkeypatch.setattr(self.pool, method, self._logged(getattr(self.pool, method), name))
        write_back = self.pool.write_back

        def logged_write_back(gpu_chunk_ids, host_chunk_ids, rows):
            self.cuda.enqueue("rows_to_host", gpu_chunk_ids, host_chunk_ids)
            write_back(gpu_chunk_ids, host_chunk_ids, rows)

        monkeypatch.setattr(self.pool, "write_back", logged_write_back)

    def _logged(self, copy, name: str):
        def logged(src, dst):
            self.cuda.enqueue(name, src, dst)
            copy(src, dst)
        return logged

    def run(self, ops, computed: dict[int, range]) -> Work:
        """One plan: its KV operations replayed, then a step computing the positions `computed`
        of each sequence, whose new rows a staged sequence writes through to its host copy."""
        self.transfers.replay(self.kv, ops)
        rows_of = {seq_id: self.kv.write_back_rows(seq_id, positions.start, positions.stop)
                   for seq_id, positions in computed.items() if self.kv.sequence(seq_id).staged}
        self.transfers.before_compute()
        chunks = [chunk for seq_id in computed for chunk in self.kv.chunk_table(seq_id)]
        step = self.cuda.enqueue("compute", dst=chunks)
        self.transfers.after_compute(list(computed))
        self.transfers.write_back(rows_of)
        self.transfers.end_step()
        return step


def test_a_prefetch_waits_for_its_sequences_last_write_back(monkeypatch):
    # 4 owned chunks, then a staging ring of 2 slots x 2 chunks: slot 0 is [4, 6), slot 1 [6, 8).
    scheduler, stage = RecordingKVManager(8, 8, 8, staging_chunks=2), Stage(monkeypatch, 8, 8, staging_chunks=2)
    cuda = stage.cuda
    scheduler.begin_step(0)
    scheduler.allocate_host(0, 5)  # prefilled in slot 0, its rows written through after the step
    first_step = stage.run(scheduler.take_log(), {0: range(0, 5)})
    first_rows = cuda.last("rows_to_host")
    assert first_rows.src == (4,) * 5 and cuda.precedes(first_step, first_rows)

    scheduler.begin_step(1)
    scheduler.stage(0)  # into slot 1 (never used): its host copy comes back, then it decodes a token
    scheduler.append(0)
    second_step = stage.run(scheduler.take_log(), {0: range(5, 6)})
    prefetch = cuda.last("to_gpu")
    assert prefetch.dst == (6,)
    assert cuda.precedes(first_rows, prefetch)  # the host copy it reads is whole
    assert cuda.precedes(prefetch, second_step)
    second_rows = cuda.last("rows_to_host")

    scheduler.begin_step(2)
    scheduler.stage(0)  # back into slot 0
    stage.run(scheduler.take_log(), {})
    prefetch = cuda.last("to_gpu")
    assert prefetch.dst == (4,) and cuda.precedes(second_rows, prefetch)  # with the row decoded in step 1
    # The copies ran on streams of their own: nothing above holds by program order alone.
    assert {first_rows.stream.name, prefetch.stream.name, second_step.stream.name} == {
        "device-to-host", "host-to-device", "compute"}


def test_a_prefetch_into_a_slot_waits_for_the_slots_last_step_and_its_write_through(monkeypatch):
    scheduler, stage = RecordingKVManager(8, 8, 8, staging_chunks=2), Stage(monkeypatch, 8, 8, staging_chunks=2)
    cuda = stage.cuda
    scheduler.begin_step(0)
    scheduler.allocate_host(1, 5)  # in slot 0, its host copy written in step 0
    stage.run(scheduler.take_log(), {1: range(0, 5)})
    scheduler.begin_step(1)
    stage.run(scheduler.take_log(), {})
    scheduler.begin_step(2)
    scheduler.allocate_host(0, 5)  # slot 0 again, for another sequence
    slots_last_step = stage.run(scheduler.take_log(), {0: range(0, 5)})
    slots_last_rows = cuda.last("rows_to_host")
    scheduler.begin_step(3)
    stage.run(scheduler.take_log(), {})

    scheduler.begin_step(4)
    scheduler.stage(1)  # back into slot 0: it overwrites what step 2 read and wrote through
    stage.run(scheduler.take_log(), {})
    prefetch = cuda.last("to_gpu")
    assert prefetch.dst == slots_last_rows.src[:1] == (4,)
    assert cuda.precedes(slots_last_step, prefetch) and cuda.precedes(slots_last_rows, prefetch)


def test_a_fetch_waits_for_the_offload_that_wrote_its_host_copy_and_an_offload_for_the_fetch(monkeypatch):
    scheduler, stage = RecordingKVManager(4, 8, 8), Stage(monkeypatch, 4, 8)
    cuda = stage.cuda
    scheduler.begin_step(0)
    scheduler.allocate(0, 16)  # chunks 0, 1
    scheduler.allocate(1, 16)  # chunks 2, 3
    first_step = stage.run(scheduler.take_log(), {0: range(0, 16), 1: range(0, 16)})
    scheduler.begin_step(1)
    scheduler.offload(1)  # to host chunks 0, 1
    assert scheduler.offload(0) == [(0, 2), (1, 3)]
    scheduler.free(1)
    scheduler.fetch(0)  # the budget moved twice in one plan (auto): back to owned chunks, no step between
    assert scheduler.offload(0) == [(0, 0), (1, 1)]  # and out again, to other host chunks than it came from
    stage.run(scheduler.take_log(), {})
    first_offload, second_offload = [work for work in cuda.work if work.src == (0, 1) and work.name == "to_host"]
    fetch = cuda.last("to_gpu")
    assert cuda.precedes(first_step, first_offload)  # it copies what the step wrote
    assert cuda.precedes(first_offload, fetch)  # the fetch reads the host copy the offload wrote
    assert cuda.precedes(fetch, second_offload)  # which copies the chunks the fetch filled


def test_a_freed_chunk_is_written_again_only_after_the_steps_and_copies_that_used_it(monkeypatch):
    scheduler, stage = RecordingKVManager(4, 8, 8), Stage(monkeypatch, 4, 8)
    cuda = stage.cuda
    scheduler.begin_step(0)
    scheduler.allocate(0, 16)  # chunks 0, 1
    scheduler.allocate(1, 5)  # chunk 2
    first_step = stage.run(scheduler.take_log(), {0: range(0, 16), 1: range(0, 5)})

    # An offloaded sequence's chunks go to the next allocation at once: its step waits for the copy.
    scheduler.begin_step(1)
    scheduler.offload(0)
    assert scheduler.allocate(2, 16) == [0, 1]
    scheduler.append(1)
    second_step = stage.run(scheduler.take_log(), {2: range(0, 16), 1: range(5, 6)})
    offload = cuda.last("to_host")
    assert offload.src == (0, 1)
    assert cuda.precedes(first_step, offload) and cuda.precedes(offload, second_step)

    # A finished sequence's chunk is refilled by a fetch: after the last step that used it.
    scheduler.begin_step(2)
    scheduler.free(1)
    assert scheduler.fetch(0) == [(0, 2), (1, 3)]
    stage.run(scheduler.take_log(), {})
    fetch = cuda.last("to_gpu")
    assert fetch.dst == (2, 3) and cuda.precedes(second_step, fetch)


def test_a_chunk_taken_and_freed_again_in_one_plan_keeps_the_events_of_its_earlier_owner(monkeypatch):
    scheduler, stage = RecordingKVManager(4, 8, 8), Stage(monkeypatch, 4, 8)
    cuda = stage.cuda
    scheduler.begin_step(0)
    scheduler.allocate(0, 8)  # chunk 0
    scheduler.allocate(1, 8)  # chunk 1
    stage.run(scheduler.take_log(), {0: range(0, 8), 1: range(0, 8)})
    scheduler.begin_step(1)
    scheduler.offload(1)  # host-resident from now on
    stage.run(scheduler.take_log(), {})

    scheduler.begin_step(2)
    scheduler.offload(0)  # reads chunk 0 on the device-to-host stream
    assert scheduler.allocate(2, 8) == [0]  # takes it at once ...
    scheduler.free(2)  # ... and is preempted before any step
    assert scheduler.fetch(1) == [(0, 0)]  # so the fetch of another sequence overwrites chunk 0 next
    stage.run(scheduler.take_log(), {})
    offload, fetch = cuda.last("to_host"), cuda.last("to_gpu")
    assert offload.src == fetch.dst == (0,) and cuda.precedes(offload, fetch)


def cache_two_prefixes(scheduler, stage, gpu_chunks: int, wanted: set) -> Work:
    """Sequences 0 and 1 computed in GPU chunks 0 and 1 (and sequence 5 in chunk 2 if there is
    one), then cached as entries 0 and 1 and finished: unheld, and demoted when evicted while
    in `wanted`. The step that computed them."""
    scheduler.prefix_cache.wanted = lambda entry: entry in wanted
    scheduler.begin_step(0)
    for seq_id in [0, 1, 5][:gpu_chunks]:
        scheduler.allocate(seq_id, 8)
    step = stage.run(scheduler.take_log(), {seq_id: range(0, 8) for seq_id in scheduler.sequences})
    scheduler.begin_step(1)
    scheduler.cache_chunk(0, 0), scheduler.cache_chunk(1, 0)
    scheduler.free(0), scheduler.free(1)
    return step


def test_a_promotion_waits_for_the_demotion_that_frees_its_chunk(monkeypatch):
    scheduler, stage = RecordingKVManager(2, 2, 8), Stage(monkeypatch, 2, 2)
    cuda = stage.cuda
    wanted = {0, 1}
    first_step = cache_two_prefixes(scheduler, stage, 2, wanted)
    scheduler.allocate(2, 8)  # evicts entry 0: demoted to the host
    second_step = stage.run(scheduler.take_log(), {2: range(0, 8)})
    first_demotion = cuda.last("to_host")
    assert first_demotion.src == (0,)
    assert cuda.precedes(first_step, first_demotion)  # after every step that read it
    assert cuda.precedes(first_demotion, second_step)  # before the chunk's next writer

    scheduler.begin_step(2)
    scheduler.allocate_with_prefix(3, [0], 8)  # entry 0 comes back into entry 1's chunk, entry 1 demoted
    third_step = stage.run(scheduler.take_log(), {3: range(7, 8)})
    second_demotion, promotion = cuda.last("to_host"), cuda.last("to_gpu")
    assert second_demotion.src == (1,) and promotion.dst == (1,)
    assert cuda.precedes(second_demotion, promotion)  # it reads chunk 1 before the promotion fills it
    assert cuda.precedes(promotion, third_step)

    scheduler.begin_step(3)
    wanted.discard(0)  # entry 0's host copy gives way first
    scheduler.offload(2)  # into the host chunk the promotion read: the copy waits for that read
    stage.run(scheduler.take_log(), {})
    offload = cuda.last("to_host")
    assert offload.dst == promotion.src and cuda.precedes(promotion, offload)


def test_a_promotion_waits_for_the_demotion_that_wrote_its_host_copy(monkeypatch):
    scheduler, stage = RecordingKVManager(3, 2, 8), Stage(monkeypatch, 3, 2)
    cuda = stage.cuda
    cache_two_prefixes(scheduler, stage, 3, wanted={0, 1})
    scheduler.allocate(2, 8)  # evicts entry 0: demoted to the host
    scheduler.free(5)  # chunk 2, untouched since step 0, is free
    stage.run(scheduler.take_log(), {2: range(0, 8)})
    demotion = cuda.last("to_host")

    scheduler.begin_step(2)
    scheduler.allocate_with_prefix(3, [0], 8)  # entry 0 comes back into chunk 2
    stage.run(scheduler.take_log(), {3: range(7, 8)})
    promotion = cuda.last("to_gpu")
    assert promotion.src == demotion.dst and promotion.dst == (2,) and cuda.precedes(demotion, promotion)
