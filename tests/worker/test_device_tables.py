"""Device-resident chunk tables: after any sequence of KV operations, the step tensors built from
incremental updates equal the ones built from scratch on the host, and only changed chunks are
sent."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipemax.core.kv_manager import KVManager
from pipemax.core.step_plan import StagePlan
from pipemax.worker.device_tables import DeviceChunkTables, build_step_tensors
from tests.helpers import examples


def reference_step(kv: KVManager, plan: StagePlan):
    """What a from-scratch host build gives: positions, slots, per-sequence tables and lengths."""
    positions, slots = [], []
    for seq_id, start, count in zip(plan.seq_ids, plan.starts, plan.counts):
        positions += range(start, start + count)
        slots += kv.slots(seq_id, start, start + count)
    tables = [kv.chunk_table(seq_id) for seq_id in plan.seq_ids]
    ends = [start + count for start, count in zip(plan.starts, plan.counts)]
    return positions, slots, tables, ends


def check_step(tables: DeviceChunkTables, kv: KVManager, plan: StagePlan, chunk_tokens: int):
    input_ids, positions, meta, sample_rows = build_step_tensors(tables, kv, plan, chunk_tokens, lambda t: t,
                                                                 True, True)
    ref_positions, ref_slots, ref_tables, ends = reference_step(kv, plan)
    d = plan.num_decode
    assert positions.dtype == torch.int64 and positions.tolist() == ref_positions
    assert meta.slot_mapping.dtype == torch.int64 and meta.slot_mapping.tolist() == ref_slots
    assert input_ids.tolist() == plan.token_ids and sample_rows.tolist() == plan.sample_rows()
    assert meta.decode_seq_lens.tolist() == ends[:d] and meta.prefill_seq_lens.tolist() == ends[d:]
    assert meta.decode_max_seq_len == max(ends[:d], default=0)
    prefill_counts = plan.counts[d:]
    assert meta.prefill_cu_seqlens_q.tolist() == [sum(prefill_counts[:i]) for i in range(len(prefill_counts) + 1)]
    assert meta.prefill_max_q_len == max(prefill_counts, default=0)
    got = meta.decode_chunk_tables.tolist() + meta.prefill_chunk_tables.tolist()
    for row, table in zip(got, ref_tables):
        assert row[: len(table)] == table
    for t in (meta.decode_chunk_tables, meta.prefill_chunk_tables, meta.decode_seq_lens, meta.prefill_cu_seqlens_q):
        assert t.dtype == torch.int32


def plan_for(kv: KVManager, seq_ids: list[int], new_tokens: dict[int, int], num_decode: int) -> StagePlan:
    starts = [kv.sequence(s).num_tokens - new_tokens[s] for s in seq_ids]
    counts = [new_tokens[s] for s in seq_ids]
    return StagePlan(0, [], seq_ids, starts, counts, num_decode, [True] * len(seq_ids),
                     list(range(sum(counts))))


@settings(max_examples=examples(60), deadline=None)
@given(chunk_tokens=st.sampled_from([1, 2, 4, 16]), data=st.data())
def test_incremental_tables_match_a_host_rebuild(chunk_tokens, data):
    kv = KVManager(4096, 0, chunk_tokens)
    tables = DeviceChunkTables(torch.device("cpu"), rows=2, width=1)  # tiny: rows and width must grow
    live: dict[int, int] = {}
    next_id = 0
    for _ in range(data.draw(st.integers(1, 8), label="steps")):
        new_tokens: dict[int, int] = {}
        # Free some sequences (the stage forgets their rows), admit some, re-admit a freed id.
        for seq_id in data.draw(st.lists(st.sampled_from(sorted(live)), unique=True), label="free") if live else []:
            kv.free(seq_id)
            del live[seq_id]
            if data.draw(st.booleans(), label="readmit at once"):
                # Preempted and readmitted in one step: the stage keeps the row, whose table changes.
                count = data.draw(st.integers(1, 40), label="prompt")
                kv.allocate(seq_id, count)
                live[seq_id] = count
                new_tokens[seq_id] = count
            else:
                tables.forget(seq_id)
        for seq_id in [s for s in live if s not in new_tokens]:  # decodes, or a piece of prefill, append to the live ones
            count = data.draw(st.integers(1, 3), label="append")
            kv.append(seq_id, count)
            new_tokens[seq_id] = count
        for _ in range(data.draw(st.integers(0, 3), label="admit")):
            seq_id = data.draw(st.sampled_from([next_id, next_id + 100]), label="id")
            next_id += 1
            if seq_id in live or seq_id in kv.sequences:
                continue
            count = data.draw(st.integers(1, 40), label="prompt")
            kv.allocate(seq_id, count)
            live[seq_id] = count
            new_tokens[seq_id] = count
        if not new_tokens:
            continue
        decodes = [s for s in new_tokens if new_tokens[s] == 1]
        prefills = [s for s in new_tokens if new_tokens[s] != 1]
        check_step(tables, kv, plan_for(kv, decodes + prefills, new_tokens, len(decodes)), chunk_tokens)


def test_only_new_chunks_are_sent():
    kv = KVManager(64, 0, 4)
    tables = DeviceChunkTables(torch.device("cpu"))
    kv.allocate(7, 9)  # 3 chunks
    _, upd_rows, upd_cols, upd_ids = tables.sync(kv, [7])
    assert (upd_cols, upd_ids) == ([0, 1, 2], kv.chunk_table(7))
    kv.append(7, 1)  # 10 tokens: still 3 chunks
    assert tables.sync(kv, [7])[1:] == ([], [], [])
    kv.append(7, 3)  # 13 tokens: a fourth chunk, one update
    rows, upd_rows, upd_cols, upd_ids = tables.sync(kv, [7])
    assert (upd_rows, upd_cols, upd_ids) == (rows, [3], kv.chunk_table(7)[3:])


def test_a_freed_row_is_reused_and_fully_rewritten():
    kv = KVManager(64, 0, 4)
    tables = DeviceChunkTables(torch.device("cpu"), rows=1)
    kv.allocate(1, 8)
    (row,), *_ = tables.sync(kv, [1])
    kv.free(1)
    tables.forget(1)
    kv.allocate(2, 4)
    rows, upd_rows, upd_cols, upd_ids = tables.sync(kv, [2])
    assert rows == [row] and upd_cols == [0] and upd_ids == kv.chunk_table(2)
