r"""KV manager: which chunks belong to which sequence, and where each sequence's KV lives.

Pure Python, no tensors (the pool in kv_pool.py owns those). Two id spaces: GPU chunks
[0, num_gpu_chunks) and host chunks [0, num_host_chunks). Allocation is deterministic (lowest
free id first), so every pipeline stage, driven by the same decisions, picks the same ids and
stages never exchange chunk tables.

The GPU ids split in two regions:

    [0, owned)                      owned: GPU-resident sequences and cached prefix chunks
    [owned, owned + S)              staging slot 0 \ the staging ring: step n computes its
    [owned + S, owned + 2 S)        staging slot 1 /  host-resident sequences in slot n mod 2

A sequence is GPU-resident (its KV in owned chunks) or host-resident (its KV in host chunks,
the authoritative copy). A host-resident sequence that a step computes is staged for that step:
`begin_step(slot)` opens the slot and `stage` gives the sequence ring ids there, handed out in
plan order from the slot's start, so every stage computes the same ids without being told and
nothing is ever released: the next step that uses the slot simply hands its ids out again. A
stage prefetches the host copy into those ids before the step and writes the step's new rows
through to the host copy (kv_transfers.py); the slot's next user waits for both. So on each
stage the GPU holds the host-resident KV of at most the step computing and the step being
prefetched, whatever the number of micro-batches in flight.

Moves between the two: `offload` (GPU -> host: host chunks taken, owned chunks freed) and
`fetch` (host -> GPU: owned chunks taken, host chunks freed); the caller runs their copies.

Every owned chunk is free, owned (by one GPU-resident sequence) or cached (a full chunk of a
computed prefix, shared: kv_prefix_cache.py). Every allocation may take unheld cached chunks
back (evicting, or demoting to the host, the least useful first). A request that cannot be met
raises before anything changes.

Freed ids are handed out again at once. With asynchronous copies, the caller (the stage
executor) orders a chunk's next writer after the events of every kernel and copy that touched
its previous contents; otherwise a new owner could be overwritten.
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
    HOST = "host"


@dataclass
class SequenceKV:
    seq_id: int
    num_tokens: int
    residency: Residency
    gpu_chunks: list[int] = field(default_factory=list)  # owned chunks (GPU-resident)
    host_chunks: list[int] = field(default_factory=list)  # the authoritative copy (host-resident)
    staging: list[int] | None = None  # host-resident and staged: this step's ring ids
    last_staging: tuple[int, list[int]] | None = None  # (step, its ring ids when that step ended)

    @property
    def staged(self) -> bool:
        return self.staging is not None


@dataclass(frozen=True)
class RowCopy:
    """One token row to write through from a staging chunk to the host copy."""

    gpu_chunk: int
    host_chunk: int
    row: int


class KVManager:
    def __init__(self, num_gpu_chunks: int, num_host_chunks: int, chunk_tokens: int, staging_chunks: int = 0):
        """num_gpu_chunks: the whole GPU pool, of which 2 x staging_chunks form the staging ring
        (at its top) and the rest the owned region."""
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
        if staging_chunks < 0 or 2 * staging_chunks > num_gpu_chunks:
            raise ValueError(f"a staging ring of 2 x {staging_chunks} chunks does not fit a pool of "
                             f"{num_gpu_chunks} GPU chunks")
        self.chunk_tokens = chunk_tokens
        self.num_gpu_chunks = num_gpu_chunks
        self.staging_chunks = staging_chunks  # S: one slot of the ring
        self.ring_base = num_gpu_chunks - 2 * staging_chunks  # = the owned region's size
        self.gpu = ChunkAllocator("GPU", self.ring_base)
        self.host = ChunkAllocator("host", num_host_chunks)
        self.sequences: dict[int, SequenceKV] = {}
        self.prefix_cache = PrefixChunkCache(self.gpu, self.host)
        self.ring_writer: dict[int, tuple[int, int]] = {}  # staging chunk -> (sequence, step) that last took it
        self._open_slot(0)

    def reset(self) -> None:
        """Every chunk free, no sequence: the state of a new manager (after an aborted run)."""
        self.gpu = ChunkAllocator("GPU", self.gpu.num_chunks)
        self.host = ChunkAllocator("host", self.host.num_chunks)
        self.sequences = {}
        hooks = self.prefix_cache
        self.prefix_cache = PrefixChunkCache(self.gpu, self.host)
        self.prefix_cache.wanted, self.prefix_cache.on_drop, self.prefix_cache.on_evict = (
            hooks.wanted, hooks.on_drop, hooks.on_evict)
        self.ring_writer = {}
        self._open_slot(0)

    # ---- the staging ring ------------------------------------------------------------------
    def _open_slot(self, step: int) -> None:
        self.step = step
        slot = self.slot = step % 2
        self.ring_cursor = self.ring_base + slot * self.staging_chunks
        self.ring_end = self.ring_cursor + self.staging_chunks
        self.staged_ids: list[int] = []

    def begin_step(self, step: int) -> None:
        """Step `step` (the launch count: an unlaunched plan's number is used again): the previous
        step's staging ends (nothing to release: its slot's ids are handed out again two steps
        later) and slot step mod 2 hands out ids from its start."""
        if step < 0:
            raise ValueError(f"a step number is >= 0, got {step}")
        for seq_id in self.staged_ids:
            seq = self.sequences.get(seq_id)
            if seq is not None and seq.staging is not None:
                seq.last_staging = (self.step, seq.staging)
                seq.staging = None
        self._open_slot(step)

    @property
    def ring_room(self) -> int:
        """Staging chunks the open slot has left."""
        return self.ring_end - self.ring_cursor

    def _take_ring(self, count: int, seq_id: int) -> list[int]:
        if count > self.ring_room:
            raise PoolExhaustedError("staging", count, self.ring_room, self.staging_chunks)
        chunks = list(range(self.ring_cursor, self.ring_cursor + count))
        self.ring_cursor += count
        for chunk in chunks:
            self.ring_writer[chunk] = (seq_id, self.step)
        return chunks

    def is_staging_chunk(self, chunk: int) -> bool:
        return chunk >= self.ring_base

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
        return list(self._gpu_table(self.sequence(seq_id)))

    def _gpu_table(self, seq: SequenceKV) -> list[int]:
        if seq.residency is Residency.GPU:
            return seq.gpu_chunks
        if seq.staging is None:
            raise KVStateError(f"sequence {seq.seq_id} is host-resident and not staged for this step")
        return seq.staging

    def slots(self, seq_id: int, start: int, end: int) -> list[int]:
        """GPU slots (chunk_id * chunk_tokens + row) of positions [start, end)."""
        seq = self.sequence(seq_id)
        table = self._gpu_table(seq)
        if not 0 <= start <= end <= seq.num_tokens:
            raise IndexError(f"positions [{start}, {end}) outside sequence {seq_id} of {seq.num_tokens} tokens")
        chunk_tokens = self.chunk_tokens
        return [table[p // chunk_tokens] * chunk_tokens + p % chunk_tokens for p in range(start, end)]

    def write_back_rows(self, seq_id: int, start: int, end: int) -> list[RowCopy]:
        """Rows of positions [start, end) to copy from staging to the host copy (write-through)."""
        seq = self._expect(seq_id, Residency.HOST)
        table = self._gpu_table(seq)
        if not 0 <= start <= end <= seq.num_tokens:
            raise IndexError(f"positions [{start}, {end}) outside sequence {seq_id} of {seq.num_tokens} tokens")
        chunk_tokens = self.chunk_tokens
        return [RowCopy(table[p // chunk_tokens], seq.host_chunks[p // chunk_tokens], p % chunk_tokens)
                for p in range(start, end)]

    # ---- prefix caching: shared, reference-counted cached chunks (kv_prefix_cache.py) ----------
    @property
    def gpu_available(self) -> int:
        """Owned chunks an allocation can get: the free ones and the unheld cached ones."""
        return self.prefix_cache.gpu_available()

    @property
    def host_available(self) -> int:
        """Host chunks an allocation can get: the free ones and the cached prefix copies."""
        return self.prefix_cache.host_available()

    def _take_gpu(self, count: int, state: ChunkState) -> list[int]:
        return self.prefix_cache.take_gpu(count, state)

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
        """The GPU-resident sequence's full chunk `index` becomes a cached prefix chunk it holds
        (one reference); the cache entry's id. (A staged chunk cannot: its slot is reused.)"""
        seq = self._expect(seq_id, Residency.GPU)
        if (index + 1) * self.chunk_tokens > seq.num_tokens:
            raise KVStateError(f"chunk {index} of sequence {seq_id} is not full")
        chunk = seq.gpu_chunks[index]
        if self.gpu.states[chunk] is not ChunkState.OWNED:
            raise KVStateError(f"GPU chunk {chunk} is {self.gpu.states[chunk].value}, not the sequence's own")
        return self.prefix_cache.add(chunk)

    def evict_cached(self, tier: str, entry: int, demote: bool = False) -> None:
        """Replay of one eviction the scheduler's manager decided (kv_prefix_cache.py)."""
        if tier == "gpu":
            self.prefix_cache.evict_gpu(entry, demote)
        else:
            self.prefix_cache.evict_host(entry)

    def _release_gpu(self, chunks: list[int]) -> None:
        """Free a sequence's owned chunks; cached ones lose a reference and, unheld, stay cached.
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

    def allocate_host(self, seq_id: int, num_tokens: int) -> list[int]:
        """A new host-resident sequence, staged for its first step: its KV is computed into the
        open slot and written through to its host chunks as it is produced, so it never needs
        an offload copy. Returns its (staging) chunk table."""
        if seq_id in self.sequences:
            raise KVStateError(f"sequence {seq_id} already has KV chunks")
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        count = self.chunks_for(num_tokens)
        self._check_room(count)
        host_chunks = self._take_host(count)
        staging = self._take_ring(count, seq_id)
        self.sequences[seq_id] = SequenceKV(seq_id, num_tokens, Residency.HOST, host_chunks=host_chunks,
                                            staging=staging)
        self.staged_ids.append(seq_id)
        return list(staging)

    def stage(self, seq_id: int) -> list[tuple[int, int]]:
        """A host-resident sequence computed in this step: ring ids of the open slot for its
        chunks; returns the (host_chunk, staging_chunk) pairs to prefetch. None when the slot
        still holds them: the sequence was staged two steps ago at the same ids, and the step
        in between used the other slot (every micro-batch of two takes the same slot each turn)."""
        seq = self._expect(seq_id, Residency.HOST)
        if seq.staged:
            raise KVStateError(f"sequence {seq_id} is staged already")
        count = len(seq.host_chunks)
        ids = list(range(self.ring_cursor, self.ring_cursor + count))
        # Its KV is still there when its last step was two steps ago at these very ids, and
        # nothing was staged there since (a plan never launched stages too: its step's number is
        # used again, and its copies ran).
        still_there = seq.last_staging == (self.step - 2, ids) and all(
            self.ring_writer.get(chunk) == (seq_id, self.step - 2) for chunk in ids)
        seq.staging = self._take_ring(count, seq_id)
        self.staged_ids.append(seq_id)
        if still_there:
            return []
        return list(zip(seq.host_chunks, seq.staging))

    def append(self, seq_id: int, count: int = 1) -> None:
        """Room for `count` more tokens. A staged sequence grows its host copy in step."""
        seq = self.sequence(seq_id)
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        if seq.residency is Residency.HOST:
            table = self._gpu_table(seq)  # (raises unless staged)
            new_chunks = self.chunks_for(seq.num_tokens + count) - len(table)
            self._check_room(new_chunks)
            seq.host_chunks += self._take_host(new_chunks)
            seq.staging += self._take_ring(new_chunks, seq_id)
        else:
            new_chunks = self.chunks_for(seq.num_tokens + count) - len(seq.gpu_chunks)
            seq.gpu_chunks += self._take_gpu(new_chunks, ChunkState.OWNED)
        seq.num_tokens += count

    def offload(self, seq_id: int) -> list[tuple[int, int]]:
        """GPU -> host: host chunks taken, owned chunks freed (a shared prefix chunk gets a
        private copy and loses a reference); returns the (gpu_chunk, host_chunk) pairs to copy
        before those chunks' next writer."""
        seq = self._expect(seq_id, Residency.GPU)
        seq.host_chunks = self._take_host(len(seq.gpu_chunks))
        pairs = list(zip(seq.gpu_chunks, seq.host_chunks))
        self._release_gpu(seq.gpu_chunks)
        seq.gpu_chunks = []
        seq.residency = Residency.HOST
        return pairs

    def fetch(self, seq_id: int) -> list[tuple[int, int]]:
        """Host -> GPU: owned chunks taken, host chunks freed; returns the (host_chunk, gpu_chunk)
        pairs to copy before the sequence's next step (and before the host chunks' next writer)."""
        seq = self._expect(seq_id, Residency.HOST)
        seq.gpu_chunks = self._take_gpu(len(seq.host_chunks), ChunkState.OWNED)
        pairs = list(zip(seq.host_chunks, seq.gpu_chunks))
        self.host.free(seq.host_chunks)
        seq.host_chunks = []
        seq.staging = seq.last_staging = None
        seq.residency = Residency.GPU
        return pairs

    def free(self, seq_id: int) -> None:
        """Drop a finished (or preempted) sequence."""
        seq = self.sequence(seq_id)
        self._release_gpu(seq.gpu_chunks)
        self.host.free(seq.host_chunks)
        del self.sequences[seq_id]

    def _check_room(self, chunks: int) -> None:
        """A staged allocation: room in the open slot and in the host pool, or nothing taken."""
        if chunks > self.ring_room:
            raise PoolExhaustedError("staging", chunks, self.ring_room, self.staging_chunks)
        if chunks > self.host_available:
            raise PoolExhaustedError(self.host.name, chunks, self.host_available, self.host.num_chunks)

    def _expect(self, seq_id: int, *allowed: Residency) -> SequenceKV:
        seq = self.sequence(seq_id)
        if seq.residency not in allowed:
            names = " or ".join(r.value for r in allowed)
            raise KVStateError(f"sequence {seq_id} is {seq.residency.value}; this needs it {names}")
        return seq
