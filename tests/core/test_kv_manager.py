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
    """Random sequences of allocate / allocate_host / begin_step / stage / append / offload /
    fetch / free, against a model of token counts and the staging ring's slots."""

    @initialize(num_gpu=st.integers(0, 12), num_host=st.integers(0, 16), chunk_tokens=st.sampled_from([1, 4, 8]),
                 data=st.data())
    def setup(self, num_gpu, num_host, chunk_tokens, data):
        staging = data.draw(st.integers(0, num_gpu // 2))
        self.manager = KVManager(num_gpu, num_host, chunk_tokens, staging)
        self.tokens = {}  # our model: seq_id -> token count
        self.next_id = 0
        self.step = 0

    def seqs(self, residency, staged=None):
        return sorted(s for s in self.tokens if self.manager.residency(s) is residency
                      and (staged is None or self.manager.sequence(s).staged == staged))

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
            assert len(table) == needed and all(c < self.manager.ring_base for c in table)
            self.tokens[seq_id] = num_tokens

    @rule(num_tokens=st.integers(0, 40))
    def allocate_host(self, num_tokens):
        seq_id, self.next_id = self.next_id, self.next_id + 1
        needed = self.manager.chunks_for(num_tokens)
        before = (self.manager.ring_room, self.manager.host.num_free)
        if needed > before[0] or needed > before[1]:
            with pytest.raises(PoolExhaustedError):
                self.manager.allocate_host(seq_id, num_tokens)
            assert (self.manager.ring_room, self.manager.host.num_free) == before
            assert seq_id not in self.manager.sequences
        else:
            table = self.manager.allocate_host(seq_id, num_tokens)
            assert len(table) == needed and self.manager.sequence(seq_id).staged
            self.tokens[seq_id] = num_tokens

    @rule()
    def begin_step(self):
        self.step += 1
        self.manager.begin_step(self.step)
        assert not self.seqs(Residency.HOST, staged=True)  # the previous step's staging ended
        assert self.manager.ring_room == self.manager.staging_chunks

    @rule(data=st.data())
    def stage(self, data):
        candidates = self.seqs(Residency.HOST, staged=False)
        if not candidates:
            return
        seq_id = data.draw(st.sampled_from(candidates))
        held = self.manager.sequence(seq_id)
        if len(held.host_chunks) > self.manager.ring_room:
            with pytest.raises(PoolExhaustedError, match="staging"):
                self.manager.stage(seq_id)
            assert not held.staged
            return
        last = held.last_staging
        pairs = self.manager.stage(seq_id)
        if last == (self.step - 2, held.staging):  # the slot still holds it: no copy
            assert pairs == []
        else:
            assert pairs == list(zip(held.host_chunks, held.staging))

    @rule(data=st.data(), count=st.integers(0, 10))
    def append(self, data, count):
        candidates = self.seqs(Residency.GPU) + self.seqs(Residency.HOST, staged=True)
        if not candidates:
            return
        seq_id = data.draw(st.sampled_from(candidates))
        before = (self.manager.gpu.num_free, self.manager.host.num_free, self.manager.ring_room)
        try:
            self.manager.append(seq_id, count)
            self.tokens[seq_id] += count
        except PoolExhaustedError:
            assert (self.manager.gpu.num_free, self.manager.host.num_free, self.manager.ring_room) == before

    @rule(data=st.data())
    def offload(self, data):
        candidates = self.seqs(Residency.GPU)
        if not candidates:
            return
        seq_id = data.draw(st.sampled_from(candidates))
        table = self.manager.chunk_table(seq_id)
        try:
            pairs = self.manager.offload(seq_id)
        except PoolExhaustedError:
            assert self.manager.residency(seq_id) is Residency.GPU
            return
        assert [gpu for gpu, _ in pairs] == table
        assert [host for _, host in pairs] == self.manager.sequence(seq_id).host_chunks

    @rule(data=st.data())
    def fetch(self, data):
        candidates = self.seqs(Residency.HOST)
        if not candidates:
            return
        seq_id = data.draw(st.sampled_from(candidates))
        host = list(self.manager.sequence(seq_id).host_chunks)
        try:
            pairs = self.manager.fetch(seq_id)
        except PoolExhaustedError:
            assert self.manager.residency(seq_id) is Residency.HOST
            return
        assert [h for h, _ in pairs] == host and [g for _, g in pairs] == self.manager.chunk_table(seq_id)

    @rule(data=st.data())
    def free(self, data):
        if not self.tokens:
            return
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        self.manager.free(seq_id)
        del self.tokens[seq_id]

    @rule()
    def illegal_transitions_raise_and_change_nothing(self):
        for seq_id in self.seqs(Residency.GPU):
            with pytest.raises(KVStateError):
                self.manager.stage(seq_id)
        for seq_id in self.seqs(Residency.HOST, staged=False):
            with pytest.raises(KVStateError):
                self.manager.append(seq_id, 1)
            with pytest.raises(KVStateError):
                self.manager.chunk_table(seq_id)
            with pytest.raises(KVStateError):
                self.manager.offload(seq_id)

    @invariant()
    def every_owned_and_host_chunk_in_exactly_one_state(self):
        for pool, key in ((self.manager.gpu, "gpu_chunks"), (self.manager.host, "host_chunks")):
            holders = {}
            for seq in self.manager.sequences.values():
                for chunk_id in getattr(seq, key):
                    assert chunk_id not in holders, f"{pool.name} chunk {chunk_id} held twice"
                    holders[chunk_id] = seq
            for chunk_id, state in enumerate(pool.states):
                assert state is (ChunkState.OWNED if chunk_id in holders else ChunkState.FREE)

    @invariant()
    def staging_lies_in_the_open_slot_once(self):
        manager = self.manager
        low = manager.ring_base + (self.step % 2) * manager.staging_chunks
        staged = [c for seq in manager.sequences.values() if seq.staged for c in seq.staging]
        assert len(staged) == len(set(staged)) <= manager.staging_chunks
        assert all(low <= c < low + manager.staging_chunks for c in staged)
        assert manager.gpu.num_chunks + 2 * manager.staging_chunks == manager.num_gpu_chunks

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
            if seq.residency is Residency.GPU:
                assert len(seq.gpu_chunks) == needed and not seq.host_chunks and not seq.staged
            else:
                assert len(seq.host_chunks) == needed and not seq.gpu_chunks
                assert not seq.staged or len(seq.staging) == needed


TestKVManagerStateful = KVManagerMachine.TestCase
TestKVManagerStateful.settings = settings(max_examples=examples(150), stateful_step_count=40, deadline=None)


def test_slots_and_write_back_rows_follow_the_chunk_table():
    manager = KVManager(num_gpu_chunks=12, num_host_chunks=8, chunk_tokens=4, staging_chunks=4)
    manager.allocate(7, 6)
    manager.allocate(8, 1)
    manager.offload(7)
    manager.begin_step(1)
    manager.allocate_host(9, 2)  # takes the slot's first chunk: 7's staging starts after it
    assert manager.stage(7) == list(zip(manager.sequence(7).host_chunks, [9, 10]))  # slot 1: [8, 12)
    manager.append(7, 3)  # grows to 9 tokens: a third chunk in the slot and on the host
    table = manager.chunk_table(7)
    host = manager.sequence(7).host_chunks
    assert table == [9, 10, 11] and len(host) == 3
    assert manager.slots(7, 6, 9) == [table[1] * 4 + 2, table[1] * 4 + 3, table[2] * 4 + 0]
    assert manager.write_back_rows(7, 6, 9) == [
        RowCopy(table[1], host[1], 2), RowCopy(table[1], host[1], 3), RowCopy(table[2], host[2], 0)
    ]


def test_a_slot_hands_out_the_same_ids_on_every_stage_and_nothing_is_released():
    def replay(manager):
        copies = []
        manager.begin_step(0)  # slot 0: ids [2, 6); slot 1: [6, 10)
        manager.allocate_host(0, 3)
        manager.allocate_host(1, 8)
        for step in (1, 2, 3):
            manager.begin_step(step)
            copies.append((manager.stage(1) if step != 2 else []) + manager.stage(0))  # 1 skips step 2
            manager.append(0, 4 if step == 1 else 0)
        return copies, manager.chunk_table(0), manager.chunk_table(1)

    first, second = KVManager(10, 8, 4, 4), KVManager(10, 8, 4, 4)
    copies, table0, table1 = replay(first)
    assert replay(second) == (copies, table0, table1)  # what every stage computes, told nothing
    assert (table0, table1) == ([8, 9], [6, 7])
    host0, host1 = first.sequence(0).host_chunks, first.sequence(1).host_chunks
    assert copies[0] == list(zip(host1, [6, 7])) + list(zip(host0[:1], [8]))  # step 1, slot 1
    assert copies[1] == list(zip(host0, [2, 3]))  # step 2: slot 0
    # Step 3, slot 1: it still holds sequence 1 as step 1 left it (step 2 used slot 0): no copy.
    # Sequence 0 ran in step 2 since: its rows there are newer than slot 1's.
    assert copies[2] == list(zip(host0, [8, 9]))
    assert first.gpu.num_free == 2 and first.ring_room == 0  # the owned region untouched


def test_a_slot_that_another_step_used_since_is_copied_again():
    manager = KVManager(4, 8, 4, 2)  # no owned chunks; slot 0: [0, 2), slot 1: [2, 4)
    manager.begin_step(0)
    manager.allocate_host(0, 4)  # id 0
    manager.allocate_host(1, 4)  # id 1
    manager.begin_step(1)
    manager.begin_step(2)
    assert manager.stage(1) == [(manager.sequence(1).host_chunks[0], 0)]  # id 0: sequence 0's rows there
    manager.begin_step(3)
    manager.begin_step(4)
    # Sequence 0 gets id 0 again, as at step 0, but step 2 wrote sequence 1's KV there.
    assert manager.stage(0) == [(manager.sequence(0).host_chunks[0], 0)]


def test_exhausted_pool_names_pool_and_counts():
    manager = KVManager(num_gpu_chunks=2, num_host_chunks=0, chunk_tokens=8)
    with pytest.raises(PoolExhaustedError, match=r"GPU KV pool exhausted: 3 chunk\(s\) requested, 2 free of 2"):
        manager.allocate(0, 17)
    manager.allocate(0, 16)
    with pytest.raises(PoolExhaustedError, match="host KV pool exhausted"):
        manager.offload(0)
    assert manager.residency(0) is Residency.GPU
    ring = KVManager(num_gpu_chunks=4, num_host_chunks=8, chunk_tokens=8, staging_chunks=1)
    with pytest.raises(PoolExhaustedError, match=r"staging KV pool exhausted: 2 chunk\(s\) requested, 1 free of 1"):
        ring.allocate_host(0, 9)
    assert ring.host.num_free == 8 and 0 not in ring.sequences


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
