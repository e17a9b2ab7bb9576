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

Every chunk is in exactly one state: free, owned (by one GPU- or host-resident sequence), staging
(GPU chunks only) or cached (a full chunk of a computed prefix, shared: kv_prefix_cache.py). Every
allocation may take unheld cached chunks back (evicting, or demoting to the host, the least
useful first). A request that cannot be met raises before anything changes.

Freed ids are handed out again at once. With asynchronous copies, the caller (the stage
executor) calls release_staging / free / finish_* only after the events of every kernel and copy
that touches those chunks have completed; otherwise a new owner could be overwritten.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .kv_chunks import ChunkAllocator, ChunkState, KVStateError, PoolExhaustedError
from .kv_prefix_cache import PrefixChunkCache

__all__ = ["ChunkAllocator", "ChunkState", "KVManager", "KVStateError", "PoolExhaustedError", "Residency", "RowCopy",
           "SequenceKV"]


class Residency(enum.Enum):
    GPU = "gpu"
    OFFLOADING = "offloading"
    HOST = "host"
    PREFETCHING = "prefetching"
    STAGED = "staged"


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
        self.prefix_cache = PrefixChunkCache(self.gpu, self.host)

    def reset(self) -> None:
        """Every chunk free, no sequence: the state of a new manager (after an aborted run)."""
        self.gpu = ChunkAllocator("GPU", self.gpu.num_chunks)
        self.host = ChunkAllocator("host", self.host.num_chunks)
        self.sequences = {}
        hooks = self.prefix_cache
        self.prefix_cache = PrefixChunkCache(self.gpu, self.host)
        self.prefix_cache.wanted, self.prefix_cache.on_drop, self.prefix_cache.on_evict = (
            hooks.wanted, hooks.on_drop, hooks.on_evict)

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

    # ---- prefix caching: shared, reference-counted cached chunks (kv_prefix_cache.py) ----------
    @property
    def gpu_available(self) -> int:
        """GPU chunks an allocation can get: the free ones and the unheld cached ones."""
        return self.prefix_cache.gpu_available()

    @property
    def host_available(self) -> int:
        """Host chunks an allocation can get: the free ones and the cached prefix copies."""
        return self.prefix_cache.host_available()

    def _take_gpu(self, count: int, state: ChunkState, host_reserve: int = 0) -> list[int]:
        return self.prefix_cache.take_gpu(count, state, host_reserve=host_reserve)

    def _take_host(self, count: int) -> list[int]:
        return self.prefix_cache.take_host(count, ChunkState.OWNED)

    def allocate_with_prefix(self, seq_id: int, shared: list[int], num_tokens: int) -> list[int]:
        """A new GPU-resident sequence whose first chunks are the cached entries `shared` (one
        more reference each; a host-only one is promoted to the GPU), with private chunks for the
        rest of num_tokens; its chunk table."""
        if seq_id in self.sequences:
            raise KVStateError(f"sequence {seq_id} already has KV chunks")
        private = self.chunks_for(num_tokens) - len(shared)
        if private < 0:
            raise ValueError(f"{len(shared)} shared chunks for {num_tokens} tokens")
        table = self.prefix_cache.acquire(list(shared), private)
        self.sequences[seq_id] = SequenceKV(seq_id, num_tokens, Residency.GPU, gpu_chunks=table)
        return list(table)

    def cache_chunk(self, seq_id: int, index: int) -> int:
        """The sequence's full chunk `index` becomes a cached prefix chunk it holds (one
        reference); the cache entry's id."""
        seq = self._expect(seq_id, Residency.GPU, Residency.STAGED)
        if (index + 1) * self.chunk_tokens > seq.num_tokens:
            raise KVStateError(f"chunk {index} of sequence {seq_id} is not full")
        chunk = seq.gpu_chunks[index]
        if self.gpu.states[chunk] not in (ChunkState.OWNED, ChunkState.STAGING):
            raise KVStateError(f"GPU chunk {chunk} is {self.gpu.states[chunk].value}, not the sequence's own")
        return self.prefix_cache.add(chunk)

    def evict_cached(self, tier: str, entry: int, demote: bool = False) -> None:
        """Replay of one eviction the scheduler's manager decided (kv_prefix_cache.py)."""
        if tier == "gpu":
            self.prefix_cache.evict_gpu(entry, demote)
        else:
            self.prefix_cache.evict_host(entry)

    def _release_gpu(self, chunks: list[int]) -> None:
        """Free a sequence's GPU chunks; cached ones lose a reference and, unheld, stay cached.
        Last chunk first: a prefix's deeper chunks are then evicted before the ones they follow."""
        own = []
        for chunk in reversed(chunks):
            if self.gpu.states[chunk] is ChunkState.CACHED:
                self.prefix_cache.release(chunk)
            else:
                own.append(chunk)
        self.gpu.free(own)

    # ---- lifecycle -----------------------------------------------------------------------
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
        self._check_room(count, count)
        # GPU chunks first (as the stages replay it: demotions, logged before, take host chunks
        # first there too), leaving the host chunks this sequence takes next.
        gpu_chunks = self._take_gpu(count, ChunkState.STAGING, host_reserve=count)
        host_chunks = self._take_host(count)
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
            self._check_room(new_chunks, new_chunks)
            seq.gpu_chunks += self._take_gpu(new_chunks, ChunkState.STAGING, host_reserve=new_chunks)
            seq.host_chunks += self._take_host(new_chunks)
        else:
            seq.gpu_chunks += self._take_gpu(new_chunks, ChunkState.OWNED)
        seq.num_tokens += count

    def begin_offload(self, seq_id: int) -> list[tuple[int, int]]:
        """GPU -> host: allocates host chunks; returns (gpu_chunk, host_chunk) pairs to copy."""
        seq = self._expect(seq_id, Residency.GPU)
        seq.host_chunks = self._take_host(len(seq.gpu_chunks))  # (shared prefix chunks: a private copy)
        seq.residency = Residency.OFFLOADING
        return list(zip(seq.gpu_chunks, seq.host_chunks))

    def finish_offload(self, seq_id: int) -> None:
        seq = self._expect(seq_id, Residency.OFFLOADING)
        self._release_gpu(seq.gpu_chunks)
        seq.gpu_chunks = []
        seq.residency = Residency.HOST

    def begin_prefetch(self, seq_id: int) -> list[tuple[int, int]]:
        """Host -> staging: allocates staging chunks; returns (host_chunk, gpu_chunk) pairs."""
        seq = self._expect(seq_id, Residency.HOST)
        seq.gpu_chunks = self._take_gpu(len(seq.host_chunks), ChunkState.STAGING)
        seq.residency = Residency.PREFETCHING
        return list(zip(seq.host_chunks, seq.gpu_chunks))

    def finish_prefetch(self, seq_id: int) -> None:
        self._expect(seq_id, Residency.PREFETCHING).residency = Residency.STAGED

    def release_staging(self, seq_id: int) -> None:
        """Staged -> host: the host copy is current (write-through), so staging just goes."""
        seq = self._expect(seq_id, Residency.STAGED)
        self._release_gpu(seq.gpu_chunks)
        seq.gpu_chunks = []
        seq.residency = Residency.HOST

    def make_gpu_resident(self, seq_id: int) -> None:
        """Staged -> GPU: staging chunks become the sequence's own; the host copy is dropped."""
        seq = self._expect(seq_id, Residency.STAGED)
        self.gpu.set_state([c for c in seq.gpu_chunks if self.gpu.states[c] is ChunkState.STAGING], ChunkState.OWNED)
        self.host.free(seq.host_chunks)
        seq.host_chunks = []
        seq.residency = Residency.GPU

    def free(self, seq_id: int) -> None:
        """Drop a finished (or preempted) sequence. Not while one of its copies is in flight."""
        seq = self._expect(seq_id, Residency.GPU, Residency.HOST, Residency.STAGED)
        self._release_gpu(seq.gpu_chunks)
        self.host.free(seq.host_chunks)
        del self.sequences[seq_id]

    def _check_room(self, gpu_chunks: int, host_chunks: int) -> None:
        if gpu_chunks > self.gpu_available:
            raise PoolExhaustedError(self.gpu.name, gpu_chunks, self.gpu_available, self.gpu.num_chunks)
        if host_chunks > self.host_available:
            raise PoolExhaustedError(self.host.name, host_chunks, self.host_available, self.host.num_chunks)

    def _expect(self, seq_id: int, *allowed: Residency) -> SequenceKV:
        seq = self.sequence(seq_id)
        if seq.residency not in allowed:
            names = " or ".join(r.value for r in allowed)
            raise KVStateError(f"sequence {seq_id} is {seq.residency.value}; this needs it {names}")
        return seq
