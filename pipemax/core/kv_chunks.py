"""Chunk ids of one KV pool: their states and the free list (lowest id first, so allocation is
deterministic and every pipeline stage, replaying the same decisions, picks the same ids)."""

from __future__ import annotations

import enum
import heapq


class ChunkState(enum.Enum):
    FREE = "free"
    OWNED = "owned"
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
