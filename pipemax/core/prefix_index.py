"""Which full KV chunks hold which token prefixes: the index of the prefix cache (issue 12).

A full chunk of a sequence is keyed by a hash chained over every token up to and including it:
key_i = hash((key_{i-1}, tokens of chunk i)). Equal keys then mean equal prefixes, and the index
also keeps each chunk's tokens and parent key, so a lookup compares them and a hash collision can
never hand a sequence another prefix's KV. A partly filled last chunk is never indexed: only full
chunks are shared.

Pure Python, no tensors and no chunk allocation: the KV manager's prefix cache
(kv_prefix_cache.py) owns the cached chunks, their reference counts, tiers and eviction; this
only says which cache entry serves which prefix, and forgets an entry the cache drops. Only
the scheduler keeps one; stages replay the cache's decisions.
"""

from __future__ import annotations

from dataclasses import dataclass

ROOT = 0  # the parent key of a sequence's first chunk


def chunk_key(parent: int, tokens: tuple[int, ...]) -> int:
    """The key of a chunk of `tokens` after the chunk keyed `parent` (ROOT: the first chunk)."""
    return hash((parent, tokens))


def chunk_keys(token_ids: list[int], chunk_tokens: int, parent: int = ROOT, start: int = 0,
               end: int | None = None) -> list[int]:
    """The chained key of every full chunk of token_ids[:end] from position `start` (a chunk
    boundary, after the chunk keyed `parent`); the last partial chunk has none."""
    keys = []
    end = len(token_ids) if end is None else min(end, len(token_ids))
    for begin in range(start, end - chunk_tokens + 1, chunk_tokens):
        parent = chunk_key(parent, tuple(token_ids[begin:begin + chunk_tokens]))
        keys.append(parent)
    return keys


@dataclass
class IndexedChunk:
    key: int
    parent: int
    tokens: tuple[int, ...]
    entry: int  # the KV manager's cache entry (kv_prefix_cache.py) that holds its KV


class PrefixIndexError(RuntimeError):
    pass


class PrefixIndex:
    def __init__(self, chunk_tokens: int):
        self.chunk_tokens = chunk_tokens
        self.by_key: dict[int, IndexedChunk] = {}
        self.by_entry: dict[int, IndexedChunk] = {}

    def __len__(self) -> int:
        return len(self.by_key)

    def match(self, token_ids: list[int], keys: list[int] | None = None) -> list[int]:
        """Entries of the longest cached prefix of token_ids, in order (full chunks only). keys:
        chunk_keys(token_ids), when the caller has them already."""
        entries, parent = [], ROOT
        for index, key in enumerate(chunk_keys(token_ids, self.chunk_tokens) if keys is None else keys):
            cached = self.by_key.get(key)
            start = index * self.chunk_tokens
            if (cached is None or cached.parent != parent
                    or cached.tokens != tuple(token_ids[start:start + self.chunk_tokens])):
                break  # not cached (or a hash collision: another prefix)
            entries.append(cached.entry)
            parent = key
        return entries

    def key_of(self, entry: int) -> int:
        try:
            return self.by_entry[entry].key
        except KeyError:
            raise PrefixIndexError(f"cache entry {entry} is not indexed") from None

    def insert(self, key: int, parent: int, tokens: tuple[int, ...], entry: int) -> None:
        """Index a full chunk: key = chunk_key(parent, tokens), parent the key of the chunk before
        (ROOT for a first chunk), which must be indexed (chunks are indexed in order), entry the
        KV manager's cache entry holding its KV."""
        if key in self.by_key:
            raise PrefixIndexError("that prefix is cached already")
        if parent != ROOT and parent not in self.by_key:
            raise PrefixIndexError("the chunk before it is not cached")
        if entry in self.by_entry:
            raise PrefixIndexError(f"cache entry {entry} is indexed already")
        if len(tokens) != self.chunk_tokens or key != chunk_key(parent, tokens):
            raise PrefixIndexError(f"key does not match {len(tokens)} tokens after that parent")
        indexed = IndexedChunk(key, parent, tuple(tokens), entry)
        self.by_key[key] = self.by_entry[entry] = indexed

    def forget(self, entry: int) -> None:
        """Drop an entry the KV manager evicted from both tiers. Its descendants stay indexed but
        can no longer match (their parent is gone) until they are evicted too."""
        indexed = self.by_entry.pop(entry, None)
        if indexed is not None:
            del self.by_key[indexed.key]
