"""Shared prefix chunks in the KV manager (issue 12): reference counts, eviction of unheld cached
chunks (unwanted first, then least recently used, a prefix's deeper chunks first), the host tier
(demotion of wanted chunks, once; promotion on a hit; host copies giving way to sequences),
refusals that change nothing, and a replay on another manager (what every stage does) that ends
in exactly the same state with every chunk's contents where the tables say (a hypothesis test)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipemax.core.kv_manager import ChunkState, KVManager, KVStateError, PoolExhaustedError, Residency
from pipemax.core.step_plan import RecordingKVManager, apply_kv_ops
from tests.helpers import examples


def snapshot(kv: KVManager):
    cache = kv.prefix_cache
    return (list(kv.gpu.states), list(kv.host.states), {e: vars(c).copy() for e, c in cache.entries.items()},
            list(cache.gpu_unused), list(cache.host_copies),
            {s: (seq.residency, list(seq.gpu_chunks), list(seq.host_chunks), seq.staging, seq.last_staging)
             for s, seq in kv.sequences.items()}, kv.step, kv.ring_cursor)


def check_references(kv: KVManager):
    cache = kv.prefix_cache
    for entry, cached in cache.entries.items():
        assert cached.gpu is not None or cached.host is not None
        if cached.gpu is not None:
            assert kv.gpu.states[cached.gpu] is ChunkState.CACHED and cache.by_gpu_chunk[cached.gpu] == entry
            assert cached.references == sum(seq.gpu_chunks.count(cached.gpu) for seq in kv.sequences.values())
            assert (entry in cache.gpu_unused) == (cached.references == 0)
        else:
            assert cached.references == 0 and entry not in cache.gpu_unused
        assert (entry in cache.host_copies) == (cached.host is not None)
        if cached.host is not None:
            assert kv.host.states[cached.host] is ChunkState.CACHED
    assert sum(state is ChunkState.CACHED for state in kv.gpu.states) == len(cache.by_gpu_chunk)
    assert sum(state is ChunkState.CACHED for state in kv.host.states) == len(cache.host_copies)


def test_shared_chunks_are_counted_kept_and_evicted_deepest_first():
    kv = KVManager(6, 0, 4)
    dropped = []
    kv.prefix_cache.on_drop = dropped.append
    a = kv.allocate(0, 12)
    shared = [kv.cache_chunk(0, 0), kv.cache_chunk(0, 1)]
    b = kv.allocate_with_prefix(1, shared, 10)
    assert b[:2] == a[:2] and len(b) == 3 and [kv.prefix_cache.entries[e].references for e in shared] == [2, 2]
    kv.free(0)
    assert kv.gpu.states[a[2]] is ChunkState.FREE and [kv.prefix_cache.entries[e].references for e in shared] == [1, 1]
    kv.free(1)
    assert list(kv.prefix_cache.gpu_unused) == shared[::-1] and kv.gpu_available == 6  # cached, yet available
    kv.allocate(2, 4 * 5)  # 5 chunks: 4 free, then a cached one: the prefix's second chunk goes first
    assert dropped == [shared[1]] and list(kv.prefix_cache.gpu_unused) == [shared[0]]
    check_references(kv)


def test_unwanted_chunks_are_evicted_before_wanted_ones():
    kv = KVManager(4, 0, 2)
    kv.allocate(0, 8)
    entries = [kv.cache_chunk(0, i) for i in range(4)]
    kv.free(0)
    kv.prefix_cache.wanted = lambda entry: entry in (entries[3], entries[1])
    kv.allocate(1, 4)  # two chunks: the unwanted ones, though the wanted are older
    assert sorted(kv.prefix_cache.entries) == sorted([entries[3], entries[1]])
    kv.allocate(2, 2)  # then the least recently used wanted one (released last-chunk first)
    assert list(kv.prefix_cache.entries) == [entries[1]]


def test_host_tier_demotes_wanted_chunks_once_and_promotes_them_on_a_hit():
    kv = RecordingKVManager(3, 2, 2)
    wanted = {0}
    kv.prefix_cache.wanted = wanted.__contains__
    kv.allocate(0, 4)
    first, second = kv.cache_chunk(0, 0), kv.cache_chunk(0, 1)
    gpu_first = kv.prefix_cache.entries[first].gpu
    kv.free(0)
    kv.take_log()
    kv.allocate(1, 6)  # needs all 3 chunks: `second` (unwanted) is dropped, `first` demoted
    assert kv.prefix_cache.copies == [("demote", gpu_first, 0)] and list(kv.prefix_cache.entries) == [first]
    assert kv.take_log() == [("evict_gpu", second, False), ("evict_gpu", first, True), ("allocate", 1, 6)]
    assert kv.prefix_cache.copies == []  # (the stages run the copies; the scheduler's manager keeps none)
    kv.free(1)
    table = kv.allocate_with_prefix(2, [first], 3)  # a hit on the host tier: promoted into a GPU chunk
    assert kv.prefix_cache.copies == [("promote", 0, table[0])] and kv.prefix_cache.num_promoted == 1
    kv.prefix_cache.copies.clear()
    kv.free(2)
    kv.allocate(3, 6)  # evicted again: its host copy is still there, nothing is copied
    assert kv.prefix_cache.copies == [] and kv.prefix_cache.num_demoted == 1
    assert kv.prefix_cache.entries[first].gpu is None and kv.prefix_cache.entries[first].host == 0
    kv.free(3)
    kv.allocate(4, 2)
    kv.offload(4)  # the free host chunk
    kv.allocate(5, 2)
    kv.offload(5)  # the host pool is full: the cached host copy gives way to the sequence
    assert first not in kv.prefix_cache.entries and kv.host_available == 0
    check_references(kv)


def test_a_sequence_holding_shared_chunks_offloads_a_private_copy():
    kv = KVManager(4, 4, 2)
    kv.allocate(0, 4)
    entry = kv.cache_chunk(0, 0)
    table = kv.allocate_with_prefix(1, [entry], 3)
    pairs = kv.offload(1)
    assert [gpu for gpu, _ in pairs] == table and kv.prefix_cache.entries[entry].references == 1
    assert kv.gpu.states[table[0]] is ChunkState.CACHED and kv.gpu.states[table[1]] is ChunkState.FREE
    check_references(kv)


def test_a_refusal_changes_nothing():
    kv = KVManager(3, 2, 4)
    kv.allocate(0, 8)
    entry = kv.cache_chunk(0, 0)
    before = snapshot(kv)
    with pytest.raises(PoolExhaustedError):
        kv.allocate_with_prefix(1, [entry], 4 * 4)  # 3 more chunks, 1 free
    with pytest.raises(KVStateError, match="no cached chunk 7"):
        kv.allocate_with_prefix(1, [7], 8)
    with pytest.raises(ValueError, match="listed once"):
        kv.allocate_with_prefix(1, [entry, entry], 8)
    with pytest.raises(KVStateError, match="is not full"):
        kv.cache_chunk(0, 2)
    with pytest.raises(KVStateError, match="is cached"):
        kv.cache_chunk(0, 0)
    with pytest.raises(KVStateError, match="no unheld GPU copy"):
        kv.evict_cached("gpu", entry)
    assert snapshot(kv) == before


class ContentCopies:
    """Stands in for a stage's KVTransfers: moves each chunk's label as the copies would move KV."""

    def __init__(self, gpu_content: dict, host_content: dict):
        self.gpu, self.host = gpu_content, host_content

    def claim(self, chunks):
        pass

    def claim_host(self, chunks):
        pass

    def freeing(self, seq_id, chunks, finished=False, cached=(), host_chunks=()):
        pass

    def begin_step(self, step):
        pass

    def offload(self, seq_id, pairs):
        for gpu, host in pairs:
            self.host[host] = self.gpu[gpu]

    def demote(self, pairs):
        self.offload(None, pairs)

    def prefetch(self, seq_id, pairs, host_freed=False):
        for host, gpu in pairs:
            self.gpu[gpu] = self.host[host]

    def promote(self, pairs):
        self.prefetch(None, pairs)


OPS = st.sampled_from(["new", "new", "host", "shared", "shared", "cache", "cache", "cache", "append", "append", "free",
                       "free", "offload", "stage", "stage", "fetch", "step", "step"])


@settings(max_examples=examples(150), deadline=None)
@given(st.lists(st.tuples(OPS, st.integers(0, 7), st.integers(1, 9)), min_size=20, max_size=60), st.integers(0, 3))
def test_replay_on_a_stage_ends_in_the_same_state_with_every_chunk_where_its_table_says(script, wanted_mod):
    # 5 owned chunks and a staging ring of 2 slots x 2, chunks of 2 tokens.
    scheduler, stage = RecordingKVManager(9, 6, 2, 2), KVManager(9, 6, 2, 2)
    scheduler.prefix_cache.wanted = lambda entry: entry % 4 <= wanted_mod - 1  # only rank 0 knows
    gpu_content, host_content = {}, {}
    copies = ContentCopies(gpu_content, host_content)
    expected: dict[int, list] = {}  # seq -> label of each of its chunks
    entry_label = {}
    next_seq = step = 0

    def table(held):
        return held.gpu_chunks if held.residency is Residency.GPU else held.staging

    def compute(seq_id, first_new_chunk):  # the step writes its new chunks (and write-through to the host)
        held = stage.sequence(seq_id)
        labels = expected.setdefault(seq_id, [])
        for index in range(first_new_chunk, len(table(held))):
            labels[index:] = [(seq_id, index)]
            gpu_content[table(held)[index]] = (seq_id, index)
            if held.residency is Residency.HOST:
                host_content[held.host_chunks[index]] = (seq_id, index)

    for op, pick, tokens in script:
        live = sorted(scheduler.sequences)
        target = live[pick % len(live)] if live else None
        held = scheduler.sequence(target) if live else None
        on_gpu = held is not None and (held.residency is Residency.GPU or held.staged)
        before = len(table(held)) if on_gpu else 0
        try:
            if op == "new":
                scheduler.allocate(next_seq, tokens)
            elif op == "host":
                scheduler.allocate_host(next_seq, tokens)
            elif op == "shared" and scheduler.prefix_cache.entries:
                entries = sorted(scheduler.prefix_cache.entries)
                chosen = entries[pick % len(entries):][:1 + tokens % 3]
                scheduler.allocate_with_prefix(next_seq, chosen, 2 * len(chosen) + tokens % 3)
                expected[next_seq] = [entry_label[e] for e in chosen]
            elif op == "cache" and live and held.residency is Residency.GPU:
                full = held.num_tokens // 2
                index = pick % full if full else None
                if index is not None and scheduler.gpu.states[held.gpu_chunks[index]] is not ChunkState.CACHED:
                    entry_label[scheduler.cache_chunk(target, index)] = expected[target][index]
            elif op == "append" and on_gpu:
                scheduler.append(target, tokens)
            elif op == "free" and live:
                scheduler.free(target)
            elif op == "offload" and live and held.residency is Residency.GPU:
                scheduler.offload(target)
            elif op == "stage" and live and held.residency is Residency.HOST and not held.staged:
                scheduler.stage(target)
            elif op == "fetch" and live and held.residency is Residency.HOST:
                scheduler.fetch(target)
            elif op == "step":
                step += 1
                scheduler.begin_step(step)
        except (PoolExhaustedError, KVStateError):
            pass  # refused: nothing changed, nothing logged
        check_references(scheduler)
        apply_kv_ops(stage, scheduler.take_log(), copies)
        assert stage.prefix_cache.copies == [] and snapshot(stage) == snapshot(scheduler)
        if op in ("new", "host", "shared") and next_seq in stage.sequences:
            compute(next_seq, len(expected.get(next_seq, [])))
            next_seq += 1
        elif op == "append" and on_gpu and target in stage.sequences:
            compute(target, before)
        for seq_id, held in stage.sequences.items():  # every chunk holds what its table says
            if held.residency is Residency.HOST:
                assert [host_content[c] for c in held.host_chunks] == expected[seq_id]
            if held.residency is Residency.GPU or held.staged:
                assert [gpu_content[c] for c in table(held)] == expected[seq_id]
    for entry, cached in stage.prefix_cache.entries.items():  # and every cached copy holds its prefix
        if cached.gpu is not None:
            assert gpu_content[cached.gpu] == entry_label[entry]
        if cached.host is not None:
            assert host_content[cached.host] == entry_label[entry]


def test_a_fetch_and_the_demotion_it_causes_get_the_same_chunks_on_every_stage():
    scheduler, stage = RecordingKVManager(6, 4, 2, 1), KVManager(6, 4, 2, 1)  # 4 owned chunks
    scheduler.prefix_cache.wanted = lambda entry: True
    scheduler.allocate(0, 4)
    scheduler.cache_chunk(0, 0), scheduler.cache_chunk(0, 1)
    scheduler.free(0)
    scheduler.allocate(1, 4)  # the two free owned chunks
    scheduler.begin_step(0)
    scheduler.allocate_host(2, 2)  # in the slot: no owned chunk, nothing demoted
    assert scheduler.prefix_cache.num_demoted == 0
    scheduler.fetch(2)  # to the owned region: a cached chunk is demoted to make room
    assert scheduler.prefix_cache.num_demoted == 1
    apply_kv_ops(stage, scheduler.take_log())
    assert snapshot(stage) == snapshot(scheduler)
