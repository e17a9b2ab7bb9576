"""Replaying a step plan's KV operations (apply_kv_ops): the prefix cache's copies run in the order
they were queued. A demotion and a promotion can use the same GPU chunk in one plan (the chunk a
demoted entry leaves is the one a promoted entry fills): run the other way round, the host copy of
the demoted entry would get the promoted entry's KV, and the promoted one would be overwritten."""

from pipemax.core.kv_manager import KVManager
from pipemax.core.step_plan import RecordingKVManager, apply_kv_ops
from tests.core.test_kv_prefix_sharing import ContentCopies


class LabelCopies(ContentCopies):
    """Stands in for a stage's KVTransfers: moves chunk labels as the copies would move KV, and logs
    each cache copy in the order it ran."""

    def __init__(self):
        super().__init__({}, {})  # chunk id -> the label of the KV it holds
        self.log = []  # ("demote" | "promote", pairs), in the order the copies ran

    def demote(self, pairs):
        self.log.append(("demote", pairs))
        super().demote(pairs)

    def promote(self, pairs):
        self.log.append(("promote", pairs))
        super().promote(pairs)


def cache_two_unheld_prefixes(kv, copies):
    """Both GPU chunks become cached prefixes that no sequence holds: "prefix A" in entry 0 (GPU
    chunk 0), "prefix B" in entry 1 (GPU chunk 1)."""
    for seq_id, label in enumerate(["prefix A", "prefix B"]):
        apply_kv_ops(kv, [("allocate", seq_id, 2)], copies)
        copies.gpu[kv.chunk_table(seq_id)[0]] = label  # its step computes the chunk
        apply_kv_ops(kv, [("cache_chunk", seq_id, 0)], copies)
    apply_kv_ops(kv, [("free", 0, 0), ("free", 1, 0)], copies)


def test_a_demotion_and_a_promotion_into_the_chunk_it_frees_run_in_queued_order():
    # A manager that decides its own evictions (the hook the scheduler's has): the allocation that
    # promotes entry 0 (host-only) needs a GPU chunk, takes entry 1's and demotes entry 1 first.
    # Both copies are queued by that one operation, demotion first.
    kv, copies = KVManager(2, 2, 2), LabelCopies()
    kv.prefix_cache.wanted = lambda entry: True
    cache_two_unheld_prefixes(kv, copies)
    apply_kv_ops(kv, [("allocate", 2, 2)], copies)  # evicts entry 0 (the older), demoted to host chunk 0
    assert copies.log == [("demote", [(0, 0)])] and copies.host[0] == "prefix A"
    copies.log.clear()

    apply_kv_ops(kv, [("allocate_with_prefix", 3, ((0,), 2))], copies)

    assert copies.log == [("demote", [(1, 1)]), ("promote", [(0, 1)])]
    assert kv.chunk_table(3) == [1] and copies.gpu[1] == "prefix A"  # the promoted entry, where its table says
    assert copies.host[1] == "prefix B"  # the demoted entry's host copy holds its own KV
    assert kv.prefix_cache.copies == []


def test_a_plan_that_demotes_a_chunk_and_promotes_into_it_moves_each_prefix_where_it_belongs():
    # The scheduler decides and logs; a stage replays the plan's operations with their copies.
    scheduler, stage, copies = RecordingKVManager(2, 2, 2), KVManager(2, 2, 2), LabelCopies()
    scheduler.prefix_cache.wanted = lambda entry: True
    for seq_id in (0, 1):
        scheduler.allocate(seq_id, 2)
        apply_kv_ops(stage, scheduler.take_log(), copies)
        copies.gpu[stage.chunk_table(seq_id)[0]] = f"prefix {'AB'[seq_id]}"
        scheduler.cache_chunk(seq_id, 0)
    scheduler.free(0), scheduler.free(1)
    scheduler.allocate(2, 2)  # evicts entry 0: demoted
    apply_kv_ops(stage, scheduler.take_log(), copies)
    copies.log.clear()

    scheduler.allocate_with_prefix(3, [0], 2)  # promotes entry 0 into entry 1's chunk, demoted first
    plan = scheduler.take_log()
    assert [op for op, _, _ in plan] == ["evict_gpu", "allocate_with_prefix"]
    apply_kv_ops(stage, plan, copies)

    assert copies.log == [("demote", [(1, 1)]), ("promote", [(0, 1)])]
    assert stage.chunk_table(3) == [1] and copies.gpu[1] == "prefix A" and copies.host[1] == "prefix B"

