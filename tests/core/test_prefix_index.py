"""The prefix index: chained keys over full chunks, chunks indexed in order only, entries that
are forgotten leave nothing behind, and matches that always hold the query's own tokens (a
stateful hypothesis test over sequences sharing prefixes), plus hand cases."""

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pipemax.core.prefix_index import ROOT, PrefixIndex, PrefixIndexError, chunk_key, chunk_keys
from tests.helpers import examples

CHUNK = 4
# Prompts built from a few shared prefixes, so sequences share chunks, end mid-chunk or on a boundary.
PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9], [7, 7, 7, 7]]
prompts = st.builds(lambda prefix, tail: PREFIXES[prefix] + tail, st.integers(0, len(PREFIXES) - 1),
                    st.lists(st.integers(0, 3), max_size=9))


class PrefixIndexMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.index = PrefixIndex(CHUNK)
        self.live: dict[int, tuple[list[int], list[int]]] = {}  # sequence -> (tokens, its indexed or matched entries)
        self.next_entry = 100
        self.next_seq = 0

    @rule(tokens=prompts)
    def start(self, tokens):
        self.live[self.next_seq] = (tokens, self.index.match(tokens))
        self.next_seq += 1

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def compute_next_chunk(self, data):
        tokens, held = self.live[data.draw(st.sampled_from(sorted(self.live)))]
        index = len(held)
        if (index + 1) * CHUNK > len(tokens):
            return  # its next chunk is not full: never indexed
        keys = chunk_keys(tokens, CHUNK)
        parent = keys[index - 1] if index else ROOT
        chunk = tuple(tokens[index * CHUNK:(index + 1) * CHUNK])
        self.next_entry += 1
        if keys[index] not in self.index.by_key and (parent == ROOT or parent in self.index.by_key):
            self.index.insert(keys[index], parent, chunk, self.next_entry)
            held.append(self.next_entry)
        else:  # cached already, or the chunk before it is not: refused, nothing changes
            before = dict(self.index.by_key)
            with pytest.raises(PrefixIndexError):
                self.index.insert(keys[index], parent, chunk, self.next_entry)
            assert self.index.by_key == before

    @precondition(lambda self: self.index.by_entry)
    @rule(data=st.data())
    def forget(self, data):
        entry = data.draw(st.sampled_from(sorted(self.index.by_entry)))
        self.index.forget(entry)
        assert entry not in self.index.by_entry

    @invariant()
    def both_maps_agree(self):
        assert len(self.index.by_key) == len(self.index.by_entry)
        for key, indexed in self.index.by_key.items():
            assert indexed.key == key and self.index.by_entry[indexed.entry] is indexed

    @invariant()
    def matches_hold_the_querys_own_tokens(self):
        for tokens, _ in self.live.values():
            parent = 0
            for position, entry in enumerate(self.index.match(tokens)):
                indexed = self.index.by_entry[entry]
                assert list(indexed.tokens) == tokens[position * CHUNK:(position + 1) * CHUNK]
                assert indexed.parent == parent
                parent = indexed.key


TestPrefixIndexMachine = PrefixIndexMachine.TestCase
TestPrefixIndexMachine.settings = settings(max_examples=examples(150), stateful_step_count=40, deadline=None)


def test_keys_chain_over_full_chunks_only():
    assert len(chunk_keys([1] * 11, 4)) == 2 and chunk_keys([1] * 3, 4) == []
    assert chunk_keys([1, 2, 3, 4, 5, 6, 7, 8], 4)[0] == chunk_keys([1, 2, 3, 4, 0, 0, 0, 0], 4)[0]
    assert chunk_keys([1, 2, 3, 4, 5, 6, 7, 8], 4)[1] != chunk_keys([0, 2, 3, 4, 5, 6, 7, 8], 4)[1]  # chained


def test_a_hash_collision_never_matches_another_prefix(monkeypatch):
    index = PrefixIndex(2)
    index.insert(chunk_key(ROOT, (1, 2)), ROOT, (1, 2), entry=5)
    key = chunk_keys([1, 2], 2)[0]
    monkeypatch.setattr("pipemax.core.prefix_index.chunk_keys", lambda tokens, size: [key])  # every prefix collides
    assert index.match([3, 4]) == [] and index.match([1, 2]) == [5]


def test_out_of_order_duplicate_and_wrong_chunks_are_refused():
    index = PrefixIndex(2)
    first = chunk_key(ROOT, (1, 2))
    index.insert(first, ROOT, (1, 2), entry=1)
    with pytest.raises(PrefixIndexError, match="cached already"):
        index.insert(first, ROOT, (1, 2), entry=2)
    with pytest.raises(PrefixIndexError, match="chunk before it is not cached"):
        index.insert(chunk_key(7, (3, 4)), 7, (3, 4), entry=2)
    with pytest.raises(PrefixIndexError, match="indexed already"):
        index.insert(chunk_key(first, (3, 4)), first, (3, 4), entry=1)
    with pytest.raises(PrefixIndexError, match="does not match"):
        index.insert(chunk_key(first, (3, 4)), first, (3, 5), entry=2)
    with pytest.raises(PrefixIndexError, match="not indexed"):
        index.key_of(9)
    assert index.match([1, 2, 3, 4, 5]) == [1] and index.key_of(1) == first
    assert chunk_keys([1, 2, 3, 4, 5, 6], 2, parent=first, start=2) == chunk_keys([1, 2, 3, 4, 5, 6], 2)[1:]
    index.forget(1)
    index.forget(1)  # (an entry dropped twice: nothing left to do)
    assert len(index) == 0 and index.match([1, 2, 3, 4]) == []
