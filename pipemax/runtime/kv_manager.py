"""KV manager: which chunks belong to which sequence, and where each sequence's KV lives.

Pure Python, no tensors (the pool in kv_pool.py owns those). Two id spaces: GPU chunks
[0, num_gpu_chunks) and host chunks [0, num_host_chunks). Allocation is deterministic (lowest
free id first), so every pipeline stage, driven by the same decisions, picks the same ids and
stages never exchange chunk tables.

A sequence moves through these residencies:

    allocate -> GPU --begin_offload--> OFFLOADING --finish_offload--> HOST
                 ^                                                     |  ^
      make_gpu_resident                                  begin_prefetch  release_staging
                 |                                                     v  |
               STAGED <--finish_prefetch-- PREFETCHING <---------------+  |
                 +--------------------------------------------------------+

GPU: its chunks are GPU chunks it owns. HOST: the authoritative chunks are host chunks.
STAGED: host-resident, with a staging copy in GPU chunks that attention reads; tokens appended
while staged get a GPU row and, written through by the stage, the same row in the host copy, so
release_staging never copies anything back. OFFLOADING / PREFETCHING: a copy is in flight; the
caller finishes it once the copy's event has completed.

Every chunk is in exactly one state: free, owned (by one GPU- or host-resident sequence) or
staging (GPU chunks only). A request that cannot be met raises before anything changes.

Freed ids are handed out again at once. With asynchronous copies, the caller (the stage
executor) calls release_staging / free / finish_* only after the events of every kernel and copy
that touches those chunks have completed; otherwise a new owner could be overwritten.
"""

from __future__ import annotations

import enum
import heapq
from collections import OrderedDict
from dataclasses import dataclass, field


class Residency(enum.Enum):
    GPU = "gpu"
    OFFLOADING = "offloading"
    HOST = "host"
    PREFETCHING = "prefetching"
    STAGED = "staged"


class ChunkState(enum.Enum):
    FREE = "free"
    OWNED = "owned"
    STAGING = "staging"
    CACHED = "cached"  # a full chunk of a cached prefix (prefix caching): shared, reference-counted


class PoolExhaustedError(RuntimeError):
    """Not enough free chunks in a pool; nothing was allocated."""

    def __init__(self, pool: str, requested: int, free: int, total: int):
        super().__init__(
            f"{pool} KV pool exhausted: {requested} chunk(s) requested, {free} free of {total}"
        )
        self.pool = pool
        self.requested = requested
        self.free = free


class KVStateError(RuntimeError):
    """An operation that the sequence's residency does not allow (or an unknown sequence)."""


class ChunkAllocator:
    """Free list of one pool's chunk ids; lowest id first so allocation is deterministic."""

    def __init__(self, name: str, num_chunks: int):
        if num_chunks < 0:
            raise ValueError(f"{name} pool cannot have {num_chunks} chunks")
        self.name = name
        self.num_chunks = num_chunks
        self.states = [ChunkState.FREE] * num_chunks
        self._free_heap = list(range(num_chunks))

    @property
    def num_free(self) -> int:
        return len(self._free_heap)

    def check_available(self, count: int) -> None:
        if count > self.num_free:
            raise PoolExhaustedError(self.name, count, self.num_free, self.num_chunks)

    def allocate(self, count: int, state: ChunkState) -> list[int]:
        self.check_available(count)
        chunk_ids = [heapq.heappop(self._free_heap) for _ in range(count)]
        for chunk_id in chunk_ids:
            self.states[chunk_id] = state
        return chunk_ids

    def free(self, chunk_ids: list[int]) -> None:
        for chunk_id in chunk_ids:  # validate all before changing any
            if not 0 <= chunk_id < self.num_chunks:
                raise KVStateError(f"{self.name} chunk id {chunk_id} is outside the pool of {self.num_chunks}")
            if self.states[chunk_id] is ChunkState.FREE:
                raise KVStateError(f"{self.name} chunk {chunk_id} freed twice")
        if len(set(chunk_ids)) != len(chunk_ids):
            raise KVStateError(f"{self.name} chunk ids listed twice in one free: {chunk_ids}")
        for chunk_id in chunk_ids:
            self.states[chunk_id] = ChunkState.FREE
            heapq.heappush(self._free_heap, chunk_id)

    def set_state(self, chunk_ids: list[int], state: ChunkState) -> None:
        for chunk_id in chunk_ids:
            self.states[chunk_id] = state


@dataclass
class SequenceKV:
    seq_id: int
    num_tokens: int
    residency: Residency
    gpu_chunks: list[int] = field(default_factory=list)  # owned (GPU) or staging (PREFETCHING/STAGED)
    host_chunks: list[int] = field(default_factory=list)  # authoritative when host-resident


@dataclass(frozen=True)
class RowCopy:
    """One token row to write through from a staging chunk to the host copy."""

    gpu_chunk: int
    host_chunk: int
    row: int


class KVManager:
    def __init__(self, num_gpu_chunks: int, num_host_chunks: int, chunk_tokens: int):
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
        self.chunk_tokens = chunk_tokens
        self.gpu = ChunkAllocator("GPU", num_gpu_chunks)
        self.host = ChunkAllocator("host", num_host_chunks)
        self.sequences: dict[int, SequenceKV] = {}
        self.cache_refs: dict[int, int] = {}  # cached prefix chunk -> sequences holding it
        self.cache_lru: OrderedDict[int, None] = OrderedDict()  # unreferenced cached chunks, oldest first
        self.on_evict = None  # called with each evicted cached chunk (the scheduler's prefix index)

    def reset(self) -> None:
        """Every chunk free, no sequence: the state of a new manager (after an aborted run)."""
        self.gpu = ChunkAllocator("GPU", self.gpu.num_chunks)
        self.host = ChunkAllocator("host", self.host.num_chunks)
        self.sequences = {}
        self.cache_refs, self.cache_lru = {}, OrderedDict()

    # ---- queries -------------------------------------------------------------------------
    def chunks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.chunk_tokens)

    def sequence(self, seq_id: int) -> SequenceKV:
        try:
            return self.sequences[seq_id]
        except KeyError:
            raise KVStateError(f"unknown sequence {seq_id}") from None

    def residency(self, seq_id: int) -> Residency:
        return self.sequence(seq_id).residency

    def chunk_table(self, seq_id: int) -> list[int]:
        """GPU chunk ids that attention reads, in position order."""
        seq = self._expect(seq_id, Residency.GPU, Residency.STAGED)
        return list(seq.gpu_chunks)

    def slots(self, seq_id: int, start: int, end: int) -> list[int]:
        """GPU slots (chunk_id * chunk_tokens + row) of positions [start, end)."""
        seq = self._expect(seq_id, Residency.GPU, Residency.STAGED)
        if not 0 <= start <= end <= seq.num_tokens:
            raise IndexError(f"positions [{start}, {end}) outside sequence {seq_id} of {seq.num_tokens} tokens")
        chunk_tokens = self.chunk_tokens
        return [seq.gpu_chunks[p // chunk_tokens] * chunk_tokens + p % chunk_tokens for p in range(start, end)]

    def write_back_rows(self, seq_id: int, start: int, end: int) -> list[RowCopy]:
        """Rows of positions [start, end) to copy from staging to the host copy (write-through)."""
        seq = self._expect(seq_id, Residency.STAGED)
        if not 0 <= start <= end <= seq.num_tokens:
            raise IndexError(f"positions [{start}, {end}) outside sequence {seq_id} of {seq.num_tokens} tokens")
        chunk_tokens = self.chunk_tokens
        return [
            RowCopy(seq.gpu_chunks[p // chunk_tokens], seq.host_chunks[p // chunk_tokens], p % chunk_tokens)
            for p in range(start, end)
        ]

    # ---- lifecycle -----------------------------------------------------------------------
    # ---- prefix caching: shared, reference-counted GPU chunks ----------------------------------
    @property
    def gpu_available(self) -> int:
        """GPU chunks an allocation can get: the free ones and the unreferenced cached ones."""
        return self.gpu.num_free + len(self.cache_lru)

    def _take_gpu(self, count: int, state: ChunkState, keep: frozenset = frozenset()) -> list[int]:
        """count GPU chunks, evicting unreferenced cached chunks (least recently used first, none
        in keep) when the free ones do not suffice. Raises before changing anything."""
        evictable = [chunk for chunk in self.cache_lru if chunk not in keep]
        if count > self.gpu.num_free + len(evictable):
            raise PoolExhaustedError(self.gpu.name, count, self.gpu.num_free + len(evictable), self.gpu.num_chunks)
        for chunk in evictable[:max(0, count - self.gpu.num_free)]:
            del self.cache_lru[chunk], self.cache_refs[chunk]
            self.gpu.free([chunk])
            if self.on_evict is not None:
                self.on_evict(chunk)
        return self.gpu.allocate(count, state)

    def allocate_with_prefix(self, seq_id: int, shared: list[int], num_tokens: int) -> list[int]:
        """A new GPU-resident sequence whose first chunks are the cached chunks `shared` (one more
        reference each), with private chunks for the rest of num_tokens; its chunk table."""
        if seq_id in self.sequences:
            raise KVStateError(f"sequence {seq_id} already has KV chunks")
        for chunk in shared:
            if not 0 <= chunk < self.gpu.num_chunks or self.gpu.states[chunk] is not ChunkState.CACHED:
                raise KVStateError(f"GPU chunk {chunk} is not a cached prefix chunk")
        count = self.chunks_for(num_tokens) - len(shared)
        if count < 0 or len(set(shared)) != len(shared):
            raise ValueError(f"{len(shared)} shared chunks for {num_tokens} tokens")
        private = self._take_gpu(count, ChunkState.OWNED, keep=frozenset(shared))
        for chunk in shared:
            self.cache_refs[chunk] += 1
            self.cache_lru.pop(chunk, None)
        self.sequences[seq_id] = SequenceKV(seq_id, num_tokens, Residency.GPU, gpu_chunks=list(shared) + private)
        return list(shared) + private

    def cache_chunk(self, seq_id: int, index: int) -> int:
        """The sequence's full chunk `index` becomes a cached prefix chunk it holds (one
        reference); its id."""
        seq = self._expect(seq_id, Residency.GPU)
        if (index + 1) * self.chunk_tokens > seq.num_tokens:
            raise KVStateError(f"chunk {index} of sequence {seq_id} is not full")
        chunk = seq.gpu_chunks[index]
        if self.gpu.states[chunk] is not ChunkState.OWNED:
            raise KVStateError(f"GPU chunk {chunk} is {self.gpu.states[chunk].value}, not the sequence's own")
        self.gpu.set_state([chunk], ChunkState.CACHED)
        self.cache_refs[chunk] = 1
        return chunk

    def _release_gpu(self, chunks: list[int]) -> None:
        """Free a sequence's GPU chunks; cached ones lose a reference and, unreferenced, stay cached."""
        own = []
        for chunk in chunks:
            if self.gpu.states[chunk] is ChunkState.CACHED:
                self.cache_refs[chunk] -= 1
                if self.cache_refs[chunk] == 0:
                    self.cache_lru[chunk] = None
            else:
                own.append(chunk)
        self.gpu.free(own)

    def allocate(self, seq_id: int, num_tokens: int) -> list[int]:
        """A new GPU-resident sequence with room for num_tokens; returns its chunk table."""
        if seq_id in self.sequences:
            raise KVStateError(f"sequence {seq_id} already has KV chunks")
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        chunks = self._take_gpu(self.chunks_for(num_tokens), ChunkState.OWNED)
        self.sequences[seq_id] = SequenceKV(seq_id, num_tokens, Residency.GPU, gpu_chunks=chunks)
        return list(chunks)

    def allocate_staged(self, seq_id: int, num_tokens: int) -> list[int]:
        """A new host-resident sequence, staged for its first step: its KV is computed into
        staging chunks and written through to its host chunks as it is produced, so after the
        step the staging goes without an offload copy. Returns its (staging) chunk table."""
        if seq_id in self.sequences:
            raise KVStateError(f"sequence {seq_id} already has KV chunks")
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        count = self.chunks_for(num_tokens)
        self.gpu.check_available(count)
        self.host.check_available(count)
        host_chunks = self.host.allocate(count, ChunkState.OWNED)
        gpu_chunks = self.gpu.allocate(count, ChunkState.STAGING)
        self.sequences[seq_id] = SequenceKV(seq_id, num_tokens, Residency.STAGED, gpu_chunks=gpu_chunks,
                                            host_chunks=host_chunks)
        return list(gpu_chunks)

    def append(self, seq_id: int, count: int = 1) -> None:
        """Room for `count` more tokens. A staged sequence grows its host copy in step."""
        seq = self._expect(seq_id, Residency.GPU, Residency.STAGED)
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        new_chunks = self.chunks_for(seq.num_tokens + count) - len(seq.gpu_chunks)
        if seq.residency is Residency.STAGED:
            self.gpu.check_available(new_chunks)
            self.host.check_available(new_chunks)
            seq.host_chunks += self.host.allocate(new_chunks, ChunkState.OWNED)
            seq.gpu_chunks += self.gpu.allocate(new_chunks, ChunkState.STAGING)
        else:
            seq.gpu_chunks += self._take_gpu(new_chunks, ChunkState.OWNED, keep=frozenset(seq.gpu_chunks))
        seq.num_tokens += count

    def begin_offload(self, seq_id: int) -> list[tuple[int, int]]:
        """GPU -> host: allocates host chunks; returns (gpu_chunk, host_chunk) pairs to copy."""
        seq = self._expect(seq_id, Residency.GPU)
        if any(self.gpu.states[chunk] is ChunkState.CACHED for chunk in seq.gpu_chunks):
            raise KVStateError(f"sequence {seq_id} holds shared prefix chunks: it stays on the GPU")
        seq.host_chunks = self.host.allocate(len(seq.gpu_chunks), ChunkState.OWNED)
        seq.residency = Residency.OFFLOADING
        return list(zip(seq.gpu_chunks, seq.host_chunks))

    def finish_offload(self, seq_id: int) -> None:
        seq = self._expect(seq_id, Residency.OFFLOADING)
        self.gpu.free(seq.gpu_chunks)
        seq.gpu_chunks = []
        seq.residency = Residency.HOST

    def begin_prefetch(self, seq_id: int) -> list[tuple[int, int]]:
        """Host -> staging: allocates staging chunks; returns (host_chunk, gpu_chunk) pairs."""
        seq = self._expect(seq_id, Residency.HOST)
        seq.gpu_chunks = self.gpu.allocate(len(seq.host_chunks), ChunkState.STAGING)
        seq.residency = Residency.PREFETCHING
        return list(zip(seq.host_chunks, seq.gpu_chunks))

    def finish_prefetch(self, seq_id: int) -> None:
        self._expect(seq_id, Residency.PREFETCHING).residency = Residency.STAGED

    def release_staging(self, seq_id: int) -> None:
        """Staged -> host: the host copy is current (write-through), so staging just goes."""
        seq = self._expect(seq_id, Residency.STAGED)
        self.gpu.free(seq.gpu_chunks)
        seq.gpu_chunks = []
        seq.residency = Residency.HOST

    def make_gpu_resident(self, seq_id: int) -> None:
        """Staged -> GPU: staging chunks become the sequence's own; the host copy is dropped."""
        seq = self._expect(seq_id, Residency.STAGED)
        self.gpu.set_state(seq.gpu_chunks, ChunkState.OWNED)
        self.host.free(seq.host_chunks)
        seq.host_chunks = []
        seq.residency = Residency.GPU

    def free(self, seq_id: int) -> None:
        """Drop a finished (or preempted) sequence. Not while one of its copies is in flight."""
        seq = self._expect(seq_id, Residency.GPU, Residency.HOST, Residency.STAGED)
        self._release_gpu(seq.gpu_chunks)
        self.host.free(seq.host_chunks)
        del self.sequences[seq_id]

    def _expect(self, seq_id: int, *allowed: Residency) -> SequenceKV:
        seq = self.sequence(seq_id)
        if seq.residency not in allowed:
            names = " or ".join(r.value for r in allowed)
            raise KVStateError(f"sequence {seq_id} is {seq.residency.value}; this needs it {names}")
        return seq
