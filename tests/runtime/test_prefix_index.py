"""The prefix index: chained keys over full chunks, reference counts that never leak, LRU
eviction of unreferenced chunks only, and matches that always hold the query's own tokens (a
stateful hypothesis test over sequences sharing prefixes), plus hand cases."""

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pipemax.runtime.prefix_index import PrefixIndex, PrefixIndexError, chunk_keys

CHUNK = 4
# Prompts built from a few shared prefixes, so sequences share chunks, end mid-chunk or on a boundary.
PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9], [7, 7, 7, 7]]
prompts = st.builds(lambda prefix, tail: PREFIXES[prefix] + tail, st.integers(0, len(PREFIXES) - 1),
                    st.lists(st.integers(0, 3), max_size=9))


class PrefixIndexMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.index = PrefixIndex(CHUNK)
        self.live: dict[int, tuple[list[int], list[int]]] = {}  # sequence -> (tokens, cached chunks held)
        self.next_chunk = 100
        self.next_seq = 0

    @rule(tokens=prompts)
    def start(self, tokens):
        held = self.index.match(tokens)
        self.index.acquire(held)
        self.live[self.next_seq] = (tokens, list(held))
        self.next_seq += 1

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def compute_next_chunk(self, data):
        seq = data.draw(st.sampled_from(sorted(self.live)))
        tokens, held = self.live[seq]
        index = len(held)
        if (index + 1) * CHUNK > len(tokens):
            return  # its next chunk is not full: never indexed
        self.next_chunk += 1
        if self.index.insert(tokens, index, self.next_chunk):
            held.append(self.next_chunk)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def finish(self, data):
        seq = data.draw(st.sampled_from(sorted(self.live)))
        self.index.release(self.live.pop(seq)[1])

    @rule()
    def evict(self):
        chunk_id = self.index.evict()
        if chunk_id is not None:
            assert all(chunk_id not in held for _, held in self.live.values())

    @invariant()
    def references_count_the_holders(self):
        for chunk_id, cached in self.index.by_chunk.items():
            holders = sum(held.count(chunk_id) for _, held in self.live.values())
            assert cached.references == holders
            assert (chunk_id in self.index.unused) == (holders == 0)
        assert set(self.index.unused) <= set(self.index.by_chunk)

    @invariant()
    def matches_hold_the_querys_own_tokens(self):
        for tokens, _ in self.live.values():
            for position, chunk_id in enumerate(self.index.match(tokens)):
                cached = self.index.by_chunk[chunk_id]
                assert list(cached.tokens) == tokens[position * CHUNK:(position + 1) * CHUNK]


TestPrefixIndexMachine = PrefixIndexMachine.TestCase
TestPrefixIndexMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_keys_chain_over_full_chunks_only():
    assert len(chunk_keys([1] * 11, 4)) == 2 and chunk_keys([1] * 3, 4) == []
    assert chunk_keys([1, 2, 3, 4, 5, 6, 7, 8], 4)[0] == chunk_keys([1, 2, 3, 4, 0, 0, 0, 0], 4)[0]
    assert chunk_keys([1, 2, 3, 4, 5, 6, 7, 8], 4)[1] != chunk_keys([0, 2, 3, 4, 5, 6, 7, 8], 4)[1]  # chained


def test_a_hash_collision_never_matches_another_prefix(monkeypatch):
    index = PrefixIndex(2)
    assert index.insert([1, 2], 0, chunk_id=5)
    key = chunk_keys([1, 2], 2)[0]
    monkeypatch.setattr("pipemax.runtime.prefix_index.chunk_keys", lambda tokens, size: [key])  # every prefix collides
    assert index.match([3, 4]) == [] and index.match([1, 2]) == [5]


def test_release_beyond_acquire_and_unknown_chunks_are_errors():
    index = PrefixIndex(2)
    index.insert([1, 2, 3, 4], 0, chunk_id=1)
    index.release([1])
    with pytest.raises(PrefixIndexError, match="released more often"):
        index.release([1])
    with pytest.raises(PrefixIndexError, match="not cached"):
        index.acquire([9])
    assert not index.insert([5, 6, 7, 8], 1, chunk_id=2)  # its first chunk is not cached: not indexed
    assert index.evict() == 1 and index.evict() is None and len(index) == 0
