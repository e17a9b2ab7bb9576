"""Which full KV chunks hold which token prefixes: the index of the prefix cache (issue 12).

A full chunk of a sequence is keyed by a hash chained over every token up to and including it:
key_i = hash((key_{i-1}, tokens of chunk i)). Equal keys then mean equal prefixes, and the index
also keeps each chunk's tokens and parent key, so a lookup compares them and a hash collision can
never hand a sequence another prefix's KV. A partly filled last chunk is never indexed: only full
chunks are shared.

Each cached chunk has a reference count: the running sequences whose chunk tables hold it. At
zero it stays cached, least recently used first, until the pool needs the chunk back (evict).
Pure Python, no tensors and no chunk allocation: the KV manager owns the chunk ids; this only
says which cached chunk serves which prefix. Deterministic, so every stage, replaying the same
decisions, agrees.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

ROOT = 0  # the parent key of a sequence's first chunk


def chunk_keys(token_ids: list[int], chunk_tokens: int) -> list[int]:
    """The chained key of every full chunk of token_ids (the last partial chunk has none)."""
    keys, parent = [], ROOT
    for start in range(0, len(token_ids) - chunk_tokens + 1, chunk_tokens):
        parent = hash((parent, tuple(token_ids[start:start + chunk_tokens])))
        keys.append(parent)
    return keys


@dataclass
class CachedChunk:
    key: int
    parent: int
    tokens: tuple[int, ...]
    chunk_id: int
    references: int = 0


class PrefixIndexError(RuntimeError):
    pass


class PrefixIndex:
    def __init__(self, chunk_tokens: int):
        self.chunk_tokens = chunk_tokens
        self.by_key: dict[int, CachedChunk] = {}
        self.by_chunk: dict[int, CachedChunk] = {}
        self.unused: OrderedDict[int, None] = OrderedDict()  # chunk ids with no reference, oldest first

    def __len__(self) -> int:
        return len(self.by_key)

    def match(self, token_ids: list[int]) -> list[int]:
        """Chunk ids of the longest cached prefix of token_ids, in order (full chunks only)."""
        chunk_ids, parent = [], ROOT
        for index, key in enumerate(chunk_keys(token_ids, self.chunk_tokens)):
            cached = self.by_key.get(key)
            start = index * self.chunk_tokens
            if (cached is None or cached.parent != parent
                    or cached.tokens != tuple(token_ids[start:start + self.chunk_tokens])):
                break  # not cached (or a hash collision: another prefix)
            chunk_ids.append(cached.chunk_id)
            parent = key
        return chunk_ids

    def acquire(self, chunk_ids: list[int]) -> None:
        """A sequence now holds these cached chunks (from match)."""
        for chunk_id in chunk_ids:
            cached = self._cached(chunk_id)
            cached.references += 1
            self.unused.pop(chunk_id, None)

    def release(self, chunk_ids: list[int]) -> None:
        """A sequence no longer holds these cached chunks; unreferenced ones stay, newest last."""
        for chunk_id in chunk_ids:
            cached = self._cached(chunk_id)
            if cached.references == 0:
                raise PrefixIndexError(f"cached chunk {chunk_id} released more often than acquired")
            cached.references -= 1
            if cached.references == 0:
                self.unused[chunk_id] = None

    def key_of(self, chunk_id: int) -> int:
        return self._cached(chunk_id).key

    def insert(self, token_ids: list[int], index: int, chunk_id: int, parent: int | None = None) -> bool:
        """Index full chunk `index` of token_ids, computed into chunk_id and held by that sequence
        (one reference). False (nothing changes) when that prefix is already cached elsewhere, or
        the chunk's own prefix is not cached (chunks are indexed in order). parent: the key of
        chunk index - 1, when the caller knows it (saves hashing the whole prefix again)."""
        start = index * self.chunk_tokens
        if start + self.chunk_tokens > len(token_ids):
            raise PrefixIndexError(f"chunk {index} of a {len(token_ids)}-token sequence is not full")
        if parent is None:
            parent = chunk_keys(token_ids[:start], self.chunk_tokens)[-1] if index else ROOT
        key = hash((parent, tuple(token_ids[start:start + self.chunk_tokens])))
        if key in self.by_key or (index and parent not in self.by_key):
            return False
        if chunk_id in self.by_chunk:
            raise PrefixIndexError(f"chunk {chunk_id} is cached already")
        cached = CachedChunk(key, parent, tuple(token_ids[start:start + self.chunk_tokens]), chunk_id, 1)
        self.by_key[cached.key] = self.by_chunk[chunk_id] = cached
        return True

    def evict(self) -> int | None:
        """Forget the least recently released unreferenced chunk; its id, to be freed (None: none).
        Its descendants stay indexed but can no longer match (their parent is gone) until evicted."""
        if not self.unused:
            return None
        chunk_id, _ = self.unused.popitem(last=False)
        cached = self.by_chunk.pop(chunk_id)
        del self.by_key[cached.key]
        return chunk_id

    def forget(self, chunk_id: int) -> None:
        """Drop a chunk the KV manager evicted (where the manager keeps the reference counts)."""
        cached = self.by_chunk.pop(chunk_id, None)
        if cached is not None:
            del self.by_key[cached.key]
            self.unused.pop(chunk_id, None)

    def references(self, chunk_id: int) -> int:
        return self._cached(chunk_id).references

    def _cached(self, chunk_id: int) -> CachedChunk:
        try:
            return self.by_chunk[chunk_id]
        except KeyError:
            raise PrefixIndexError(f"chunk {chunk_id} is not cached") from None
