"""The prefix cache's chunks (issue 12): full KV chunks of computed prefixes, shared by every
sequence that starts with the same tokens, kept in two tiers.

Each cached chunk is an entry, a stable id that the scheduler's prefix index keys by, with a copy
on the GPU, on the host, or on both:

  - GPU copy: what attention reads. Sequences hold it (a reference count). Unreferenced, it stays
    on the GPU until an allocation needs the chunk back.
  - host copy: an evicted GPU copy that a waiting request will use is demoted (one GPU -> host
    copy, once: an entry that already has a host copy just leaves the GPU) instead of being lost.
    A hit on it promotes it back (host -> GPU) before the step that reads it. Host copies give way
    to host chunks that sequences need (offload).

Eviction order, in both tiers: entries that no waiting request wants first, then the rest, each
least recently used first. Only the scheduler knows what is wanted (`wanted`), so every eviction
is its own decision, reported through `on_evict` for the recording manager to log; the stages
replay those decisions and never evict on their own.

Tensor-free like the rest of the KV manager: the copies that decisions imply are queued in
`copies`, as ("demote", gpu_chunk, host_chunk) and ("promote", host_chunk, gpu_chunk), for the
stage to run in that order (kv_transfers.py). Deterministic: the same calls on every stage give the
same entries and chunk ids.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .kv_chunks import ChunkAllocator, ChunkState, KVStateError, PoolExhaustedError


@dataclass
class CachedChunk:
    gpu: int | None = None  # its GPU chunk, if on the GPU
    host: int | None = None  # its host chunk, if on the host
    references: int = 0  # sequences whose chunk tables hold the GPU copy


class PrefixChunkCache:
    def __init__(self, gpu: ChunkAllocator, host: ChunkAllocator):
        self.gpu, self.host = gpu, host
        self.entries: dict[int, CachedChunk] = {}
        self.by_gpu_chunk: dict[int, int] = {}  # GPU chunk -> entry
        self.gpu_unused: OrderedDict[int, None] = OrderedDict()  # entries with an unheld GPU copy, oldest first
        self.host_copies: OrderedDict[int, None] = OrderedDict()  # entries with a host copy, least recent first
        self.next_entry = 0
        self.copies: list[tuple[str, int, int]] = []  # for the stage to run, in order; it empties the list
        self.wanted = None  # entry -> bool: a waiting request will use it (the scheduler's manager only)
        self.on_drop = None  # entry -> None: gone from both tiers (the prefix index forgets it)
        self.on_evict = None  # (tier, entry, demoted) -> None: each eviction, for the recording manager's log
        self.num_demoted = 0
        self.num_promoted = 0

    # ---- queries -------------------------------------------------------------------------
    def entry_of(self, gpu_chunk: int) -> int | None:
        return self.by_gpu_chunk.get(gpu_chunk)

    def on_gpu(self, entry: int) -> bool:
        return self.entries[entry].gpu is not None

    def gpu_available(self, keep=frozenset()) -> int:
        """GPU chunks an allocation can get: free ones and unheld cached ones (none in keep)."""
        available = self.gpu.num_free + len(self.gpu_unused)
        return available - sum(1 for e in keep if e in self.gpu_unused) if keep else available

    def host_available(self, keep=frozenset()) -> int:
        available = self.host.num_free + len(self.host_copies)
        return available - sum(1 for e in keep if e in self.host_copies) if keep else available

    # ---- taking chunks, evicting cached ones when the free ones do not suffice -----------------
    def take_gpu(self, count: int, state: ChunkState, keep=frozenset(), host_reserve: int = 0) -> list[int]:
        """count GPU chunks; cached entries in keep stay; demotions leave host_reserve host chunks
        available (the caller takes them next). Raises before changing anything."""
        available = self.gpu_available(keep)
        if count > available:
            raise PoolExhaustedError(self.gpu.name, count, available, self.gpu.num_chunks)
        for entry in self._victims(self.gpu_unused, count - self.gpu.num_free, keep):
            self.evict_gpu(entry, keep=keep, host_reserve=host_reserve)
        return self.gpu.allocate(count, state)

    def take_host(self, count: int, state: ChunkState, keep=frozenset()) -> list[int]:
        available = self.host_available(keep)
        if count > available:
            raise PoolExhaustedError(self.host.name, count, available, self.host.num_chunks)
        for entry in self._victims(self.host_copies, count - self.host.num_free, keep):
            self.evict_host(entry)
        return self.host.allocate(count, state)

    def _victims(self, order: OrderedDict, count: int, keep) -> list[int]:
        """The first `count` entries of order (none in keep), unwanted ones before wanted ones."""
        if count <= 0:
            return []
        unwanted, wanted = [], []
        for entry in order:
            if entry in keep:
                continue
            (wanted if self.wanted is not None and self.wanted(entry) else unwanted).append(entry)
            if len(unwanted) == count:
                break
        return (unwanted + wanted)[:count]

    def evict_gpu(self, entry: int, demote: bool | None = None, keep=frozenset(), host_reserve: int = 0) -> None:
        """The entry's unheld GPU copy leaves the GPU: demoted to the host when a waiting request
        wants it and there is room (demote=None: decide so; a stage replays the decision given)."""
        cached = self._entry(entry)
        if cached.gpu is None or entry not in self.gpu_unused:
            raise KVStateError(f"cached chunk {entry} has no unheld GPU copy to evict")
        if demote is None:
            demote = (cached.host is None and self.wanted is not None and self.wanted(entry)
                      and self.host_available(keep) > host_reserve)
        if demote:
            if cached.host is not None:
                raise KVStateError(f"cached chunk {entry} is on the host already")
            cached.host = self.take_host(1, ChunkState.CACHED, keep)[0]
            self.host_copies[entry] = None
            self.copies.append(("demote", cached.gpu, cached.host))
            self.num_demoted += 1
        del self.gpu_unused[entry], self.by_gpu_chunk[cached.gpu]
        self.gpu.free([cached.gpu])
        cached.gpu = None
        if self.on_evict is not None:
            self.on_evict("gpu", entry, demote)
        if cached.host is None:
            self._drop(entry)

    def evict_host(self, entry: int) -> None:
        cached = self._entry(entry)
        if cached.host is None:
            raise KVStateError(f"cached chunk {entry} has no host copy to evict")
        del self.host_copies[entry]
        self.host.free([cached.host])
        cached.host = None
        if self.on_evict is not None:
            self.on_evict("host", entry, False)
        if cached.gpu is None:
            self._drop(entry)

    def _drop(self, entry: int) -> None:
        del self.entries[entry]
        if self.on_drop is not None:
            self.on_drop(entry)

    # ---- sequences holding cached chunks -----------------------------------------------------
    def add(self, gpu_chunk: int) -> int:
        """A sequence's full GPU chunk becomes a cached entry that it holds; the entry."""
        self.gpu.set_state([gpu_chunk], ChunkState.CACHED)
        entry = self.next_entry
        self.next_entry += 1
        self.entries[entry] = CachedChunk(gpu=gpu_chunk, references=1)
        self.by_gpu_chunk[gpu_chunk] = entry
        return entry

    def acquire(self, entries: list[int], private: int) -> list[int]:
        """A new sequence's chunk table: the GPU copies of entries (host-only ones promoted into
        newly taken chunks), one more reference each, then `private` chunks of its own. Raises
        before changing anything."""
        for entry in entries:
            self._entry(entry)
        keep = frozenset(entries)
        if len(keep) != len(entries) or private < 0:
            raise ValueError(f"{len(entries)} cached chunks (listed once each) and {private} private ones")
        promote = [entry for entry in entries if self.entries[entry].gpu is None]
        chunks = self.take_gpu(len(promote) + private, ChunkState.OWNED, keep)
        for entry, chunk in zip(promote, chunks):
            cached = self.entries[entry]
            cached.gpu = chunk
            self.gpu.set_state([chunk], ChunkState.CACHED)
            self.by_gpu_chunk[chunk] = entry
            self.host_copies.move_to_end(entry)
            self.copies.append(("promote", cached.host, chunk))
            self.num_promoted += 1
        for entry in entries:
            self.entries[entry].references += 1
            self.gpu_unused.pop(entry, None)
            if entry in self.host_copies:
                self.host_copies.move_to_end(entry)
        return [self.entries[entry].gpu for entry in entries] + chunks[len(promote):]

    def release(self, gpu_chunk: int) -> None:
        """A sequence no longer holds this cached GPU chunk; unheld, it stays cached (newest last)."""
        entry = self.by_gpu_chunk[gpu_chunk]
        cached = self.entries[entry]
        cached.references -= 1
        if cached.references == 0:
            self.gpu_unused[entry] = None

    def _entry(self, entry: int) -> CachedChunk:
        try:
            return self.entries[entry]
        except KeyError:
            raise KVStateError(f"no cached chunk {entry}") from None
