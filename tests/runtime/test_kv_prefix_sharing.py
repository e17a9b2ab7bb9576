"""Shared prefix chunks in the KV manager (issue 12): reference counts, eviction of unreferenced
cached chunks least recently used first, refusals that change nothing, and a replay on another
manager (what every stage does) that ends in exactly the same state."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipemax.runtime.kv_manager import ChunkState, KVManager, KVStateError, PoolExhaustedError
from pipemax.runtime.step_plan import RecordingKVManager, apply_kv_ops


def snapshot(kv: KVManager):
    return (list(kv.gpu.states), dict(kv.cache_refs), list(kv.cache_lru),
            {s: list(seq.gpu_chunks) for s, seq in kv.sequences.items()})


def check_references(kv: KVManager):
    for chunk, refs in kv.cache_refs.items():
        assert kv.gpu.states[chunk] is ChunkState.CACHED
        assert refs == sum(seq.gpu_chunks.count(chunk) for seq in kv.sequences.values())
        assert (chunk in kv.cache_lru) == (refs == 0)
    assert all(state is not ChunkState.CACHED or chunk in kv.cache_refs for chunk, state in enumerate(kv.gpu.states))


def test_shared_chunks_are_counted_kept_and_evicted_oldest_first():
    kv = KVManager(6, 0, 4)
    evicted = []
    kv.on_evict = evicted.append
    a = kv.allocate(0, 12)
    shared = [kv.cache_chunk(0, 0), kv.cache_chunk(0, 1)]
    assert shared == a[:2]
    b = kv.allocate_with_prefix(1, shared, 10)
    assert b[:2] == shared and len(b) == 3 and kv.cache_refs == {a[0]: 2, a[1]: 2}
    kv.free(0)
    assert kv.cache_refs == {a[0]: 1, a[1]: 1} and kv.gpu.states[a[2]] is ChunkState.FREE
    kv.free(1)
    assert list(kv.cache_lru) == shared and kv.gpu_available == 6  # cached, yet available
    kv.allocate(2, 4 * 5)  # 5 chunks: 4 free, then the oldest cached one
    assert evicted == [shared[0]] and list(kv.cache_lru) == [shared[1]]
    check_references(kv)


def test_a_refusal_changes_nothing():
    kv = KVManager(3, 2, 4)
    kv.allocate(0, 8)
    kv.cache_chunk(0, 0)
    before = snapshot(kv)
    with pytest.raises(PoolExhaustedError):
        kv.allocate_with_prefix(1, [0], 4 * 4)  # 3 more chunks, 1 free
    with pytest.raises(KVStateError, match="not a cached prefix chunk"):
        kv.allocate_with_prefix(1, [1], 8)
    with pytest.raises(KVStateError, match="is not full"):
        kv.cache_chunk(0, 2)
    with pytest.raises(KVStateError, match="stays on the GPU"):
        kv.begin_offload(0)
    assert snapshot(kv) == before


@given(st.lists(st.tuples(st.sampled_from(["new", "shared", "cache", "append", "free"]), st.integers(0, 5),
                          st.integers(1, 14)), max_size=40))
def test_replay_on_a_stage_ends_in_the_same_state(script):
    scheduler, stage = RecordingKVManager(10, 0, 4), KVManager(10, 0, 4)
    next_seq = 0
    for op, pick, tokens in script:
        live = sorted(scheduler.sequences)
        try:
            if op == "new":
                scheduler.allocate(next_seq, tokens)
                next_seq += 1
            elif op == "shared" and scheduler.cache_refs:
                cached = sorted(scheduler.cache_refs)[: 1 + pick % len(scheduler.cache_refs)]
                scheduler.allocate_with_prefix(next_seq, cached, 4 * len(cached) + tokens)
                next_seq += 1
            elif op == "cache" and live:
                seq = scheduler.sequences[live[pick % len(live)]]
                full = seq.num_tokens // 4
                if full:
                    scheduler.cache_chunk(seq.seq_id, pick % full)
            elif op == "append" and live:
                scheduler.append(live[pick % len(live)], tokens)
            elif op == "free" and live:
                scheduler.free(live[pick % len(live)])
        except (PoolExhaustedError, KVStateError):
            pass  # refused: nothing changed, nothing logged
        check_references(scheduler)
    apply_kv_ops(stage, scheduler.log)
    assert snapshot(stage) == snapshot(scheduler)
