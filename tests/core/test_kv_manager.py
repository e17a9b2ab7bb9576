import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from pipemax.core.kv_manager import (
    ChunkState,
    KVManager,
    KVStateError,
    PoolExhaustedError,
    Residency,
    RowCopy,
)
from tests.helpers import examples


class KVManagerMachine(RuleBasedStateMachine):
    """Random sequences of allocate / append / offload / prefetch / release / free."""

    @initialize(
        num_gpu=st.integers(0, 12), num_host=st.integers(0, 16), chunk_tokens=st.sampled_from([1, 4, 8])
    )
    def setup(self, num_gpu, num_host, chunk_tokens):
        self.manager = KVManager(num_gpu, num_host, chunk_tokens)
        self.tokens = {}  # our model: seq_id -> token count
        self.next_id = 0

    def seqs_in(self, *residencies):
        return sorted(s for s in self.tokens if self.manager.residency(s) in residencies)

    @rule(num_tokens=st.integers(0, 40))
    def allocate(self, num_tokens):
        seq_id, self.next_id = self.next_id, self.next_id + 1
        needed = self.manager.chunks_for(num_tokens)
        free_before = self.manager.gpu.num_free
        if needed > free_before:
            with pytest.raises(PoolExhaustedError):
                self.manager.allocate(seq_id, num_tokens)
            assert self.manager.gpu.num_free == free_before and seq_id not in self.manager.sequences
        else:
            table = self.manager.allocate(seq_id, num_tokens)
            assert len(table) == needed
            self.tokens[seq_id] = num_tokens

    @rule(data=st.data(), count=st.integers(0, 10))
    def append(self, data, count):
        candidates = self.seqs_in(Residency.GPU, Residency.STAGED)
        if not candidates:
            return
        seq_id = data.draw(st.sampled_from(candidates))
        before = (self.manager.gpu.num_free, self.manager.host.num_free)
        try:
            self.manager.append(seq_id, count)
            self.tokens[seq_id] += count
        except PoolExhaustedError:
            assert (self.manager.gpu.num_free, self.manager.host.num_free) == before

    @rule(data=st.data())
    def offload(self, data):
        candidates = self.seqs_in(Residency.GPU)
        if not candidates:
            return
        seq_id = data.draw(st.sampled_from(candidates))
        table = self.manager.chunk_table(seq_id)
        try:
            pairs = self.manager.begin_offload(seq_id)
        except PoolExhaustedError:
            assert self.manager.residency(seq_id) is Residency.GPU
            return
        assert [gpu for gpu, _ in pairs] == table
        if data.draw(st.booleans()):
            self.manager.finish_offload(seq_id)

    @rule(data=st.data())
    def finish_transfers(self, data):
        for seq_id in self.seqs_in(Residency.OFFLOADING):
            self.manager.finish_offload(seq_id)
        for seq_id in self.seqs_in(Residency.PREFETCHING):
            self.manager.finish_prefetch(seq_id)

    @rule(data=st.data())
    def prefetch(self, data):
        candidates = self.seqs_in(Residency.HOST)
        if not candidates:
            return
        seq_id = data.draw(st.sampled_from(candidates))
        try:
            pairs = self.manager.begin_prefetch(seq_id)
        except PoolExhaustedError:
            assert self.manager.residency(seq_id) is Residency.HOST
            return
        assert [host for host, _ in pairs] == self.manager.sequence(seq_id).host_chunks

    @rule(data=st.data(), promote=st.booleans())
    def release_or_promote(self, data, promote):
        candidates = self.seqs_in(Residency.STAGED)
        if not candidates:
            return
        seq_id = data.draw(st.sampled_from(candidates))
        if promote:
            self.manager.make_gpu_resident(seq_id)
            assert self.manager.residency(seq_id) is Residency.GPU
        else:
            self.manager.release_staging(seq_id)
            assert self.manager.residency(seq_id) is Residency.HOST

    @rule(data=st.data())
    def free(self, data):
        if not self.tokens:
            return
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        if self.manager.residency(seq_id) in (Residency.OFFLOADING, Residency.PREFETCHING):
            with pytest.raises(KVStateError, match="this needs it"):
                self.manager.free(seq_id)
            return
        self.manager.free(seq_id)
        del self.tokens[seq_id]

    @rule()
    def illegal_transitions_raise_and_change_nothing(self):
        for seq_id in self.seqs_in(Residency.GPU):
            with pytest.raises(KVStateError):
                self.manager.begin_prefetch(seq_id)
        for seq_id in self.seqs_in(Residency.HOST):
            with pytest.raises(KVStateError):
                self.manager.append(seq_id, 1)
            with pytest.raises(KVStateError):
                self.manager.chunk_table(seq_id)

    @invariant()
    def every_chunk_in_exactly_one_state(self):
        for pool, key in ((self.manager.gpu, "gpu_chunks"), (self.manager.host, "host_chunks")):
            holders = {}
            for seq in self.manager.sequences.values():
                for chunk_id in getattr(seq, key):
                    assert chunk_id not in holders, f"{pool.name} chunk {chunk_id} held twice"
                    holders[chunk_id] = seq
            for chunk_id, state in enumerate(pool.states):
                if chunk_id not in holders:
                    assert state is ChunkState.FREE
                    continue
                seq = holders[chunk_id]
                staging = key == "gpu_chunks" and seq.residency in (Residency.PREFETCHING, Residency.STAGED)
                assert state is (ChunkState.STAGING if staging else ChunkState.OWNED)

    @invariant()
    def free_plus_used_is_total(self):
        for pool in (self.manager.gpu, self.manager.host):
            used = sum(state is not ChunkState.FREE for state in pool.states)
            assert pool.num_free + used == pool.num_chunks
            # The free list holds exactly the FREE ids, each once.
            assert sorted(pool._free_heap) == [i for i, s in enumerate(pool.states) if s is ChunkState.FREE]

    @invariant()
    def tokens_covered_by_chunks(self):
        assert set(self.manager.sequences) == set(self.tokens)
        for seq_id, tokens in self.tokens.items():
            seq = self.manager.sequence(seq_id)
            needed = self.manager.chunks_for(tokens)
            assert seq.num_tokens == tokens
            if seq.residency is not Residency.HOST:
                assert len(seq.gpu_chunks) == needed
            if seq.residency is not Residency.GPU:
                assert len(seq.host_chunks) == needed


TestKVManagerStateful = KVManagerMachine.TestCase
TestKVManagerStateful.settings = settings(max_examples=examples(150), stateful_step_count=40, deadline=None)


def test_slots_and_write_back_rows_follow_the_chunk_table():
    manager = KVManager(num_gpu_chunks=8, num_host_chunks=8, chunk_tokens=4)
    manager.allocate(7, 6)
    manager.allocate(8, 1)  # takes a chunk between 7's, so 7's next chunk is not adjacent
    manager.begin_offload(7)
    manager.finish_offload(7)
    manager.begin_prefetch(7)
    manager.finish_prefetch(7)
    manager.append(7, 3)  # grows to 9 tokens: a third chunk on GPU and on host
    table = manager.chunk_table(7)
    host = manager.sequence(7).host_chunks
    assert len(table) == len(host) == 3
    assert manager.slots(7, 6, 9) == [table[1] * 4 + 2, table[1] * 4 + 3, table[2] * 4 + 0]
    assert manager.write_back_rows(7, 6, 9) == [
        RowCopy(table[1], host[1], 2), RowCopy(table[1], host[1], 3), RowCopy(table[2], host[2], 0)
    ]


def test_exhausted_pool_names_pool_and_counts():
    manager = KVManager(num_gpu_chunks=2, num_host_chunks=0, chunk_tokens=8)
    with pytest.raises(PoolExhaustedError, match=r"GPU KV pool exhausted: 3 chunk\(s\) requested, 2 free of 2"):
        manager.allocate(0, 17)
    manager.allocate(0, 16)
    with pytest.raises(PoolExhaustedError, match="host KV pool exhausted"):
        manager.begin_offload(0)
    assert manager.residency(0) is Residency.GPU


def test_allocation_is_deterministic_lowest_id_first():
    first, second = KVManager(6, 0, 8), KVManager(6, 0, 8)
    for manager in (first, second):
        manager.allocate(0, 16)
        manager.allocate(1, 8)
        manager.free(0)
        manager.allocate(2, 20)
    assert first.chunk_table(2) == second.chunk_table(2) == [0, 1, 3]


def test_free_validates_every_id_before_changing_any():
    allocator = KVManager(4, 0, 8).gpu
    ids = allocator.allocate(2, ChunkState.OWNED)
    for bad in ([ids[0], -1], [ids[0], 4], [ids[0], ids[0]], [ids[0], 3]):
        with pytest.raises(KVStateError):
            allocator.free(bad)
        assert allocator.num_free == 2 and all(allocator.states[i] is ChunkState.OWNED for i in ids)


def test_unknown_and_duplicate_sequences():
    manager = KVManager(4, 4, 8)
    with pytest.raises(KVStateError, match="unknown sequence 3"):
        manager.free(3)
    manager.allocate(3, 1)
    with pytest.raises(KVStateError, match="already has KV chunks"):
        manager.allocate(3, 1)
