"""KV offload: host-resident sequences are prefetched into their step's staging slot before the
step and their new rows written through to the host; greedy ids equal offload off (and transformers) for
one and several stages; the scheduler's residency decisions replay exactly on every stage; the
copies are exact."""

from pathlib import Path

import pytest
import torch

from pipemax.core.kv_manager import KVManager, Residency
from pipemax.core.sampling_params import SamplingParams
from pipemax.core.scheduler import Scheduler
from pipemax.core.sequence import Sequence
from pipemax.core.step_plan import RecordingKVManager, apply_kv_ops
from pipemax.engine.config import ConfigError, EngineConfig
from pipemax.worker.kv_pool import KVPool, KVPoolSpec
from pipemax.worker.kv_transfers import KVTransfers
from tests.engine.test_engine import MAX_TOKENS, hf_greedy
from tests.helpers import assert_all_free_or_cached, settled_kv_managers
from tests.parallel.test_pipeline import run, tiny  # noqa: F401 (fixture)

CHUNK_BYTES = 8 * 3 * 2 * 2 * 32 * 4  # one chunk of the tiny qwen3: 8 tokens, 3 layers, K and V, 2 x 32, fp32


def gib(chunks: int) -> float:
    return chunks * CHUNK_BYTES / 2**30


@pytest.mark.parametrize("options", [
    dict(micro_batches=2),  # P = 1: one micro-batch computes while the other's KV is on the host
    dict(pipeline_parallel=2),
    dict(pipeline_parallel=2, micro_batches=3, stage_layers="1,2", max_num_batched_tokens=9),  # chunked prefill
    pytest.param(dict(pipeline_parallel=2, pipeline_transport="distributed"), marks=pytest.mark.subprocess),  # gloo
], ids=["p1-m2", "p2", "p2-m3-chunked", "p2-processes"])
def test_forced_offload_gives_the_ids_of_no_offload(tiny, options):  # noqa: F811
    folder, hf, prompts = tiny
    reference, _ = run(folder, prompts)
    assert reference == [hf_greedy(hf, prompt, MAX_TOKENS) for prompt in prompts]
    # A GPU pool of 12 chunks (the longest sequence needs 6), all of it the staging ring (no
    # prefix caching: nothing is owned), a host pool for everything.
    ids, llm = run(folder, prompts, offload="force", kv_cache_gib=gib(12), host_memory_gib=gib(200),
                   prefix_caching=False, **options)
    with llm:
        assert ids == reference
        stats = llm.last_run_stats
        assert stats["offload"]["host_resident_requests"] == len(prompts)
        assert stats["offload"]["host_pool_full_requests"] == 0
        moved = stats["transfers"]
        assert moved["bytes_prefetched"] > 0
        # Admitted host-resident: each prompt's KV reached the host by write-through as it was
        # produced (every stage's layers together make a token's row), never by an offload copy.
        assert moved["bytes_offloaded"] == 0
        assert moved["bytes_written_back"] >= sum(map(len, prompts)) * CHUNK_BYTES // 8
        if options.get("pipeline_transport") != "distributed":
            assert_all_free_or_cached(settled_kv_managers(llm))  # no chunk leaked on either side


def test_force_says_how_many_requests_a_full_host_pool_left_on_the_gpu(tiny, caplog):  # noqa: F811
    """A host pool too small for every request: the ones it cannot take run on the GPU (same ids),
    and the run says so in one warning and in its stats, rather than offloading fewer in silence."""
    folder, hf, prompts = tiny
    reference, _ = run(folder, prompts)
    with caplog.at_level("WARNING", logger="pipemax"):
        # 3 host chunks: the requests longer than 24 tokens can never be host-resident.
        ids, llm = run(folder, prompts, offload="force", kv_cache_gib=gib(24), host_memory_gib=gib(3),
                       micro_batches=2)
    with llm:
        assert ids == reference
        offload = llm.last_run_stats["offload"]
        assert 0 < offload["host_resident_requests"] < len(prompts)
        assert offload["host_pool_full_requests"] == len(prompts) - offload["host_resident_requests"]
    warnings = [record.getMessage() for record in caplog.records if "stayed on the GPU" in record.getMessage()]
    assert len(warnings) == 1 and "--host-memory-gib" in warnings[0]
    assert f"{offload['host_pool_full_requests']} request(s)" in warnings[0]


def make_seq(seq_id: int, prompt_len: int, max_tokens: int = 4) -> Sequence:
    return Sequence(seq_id, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens))


def many_prompts(hf, count=32, seed=5, shortest=20, longest=30):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(shortest, longest + 1, (count,), generator=generator).tolist()
    # (no token 0: transformers takes it for padding)
    return [torch.randint(1, hf.config.vocab_size, (n,), generator=generator).tolist() for n in lengths]


@pytest.mark.parametrize("options", [
    dict(),
    dict(pipeline_parallel=2),
    pytest.param(dict(pipeline_parallel=2, pipeline_transport="distributed"), marks=pytest.mark.subprocess),
], ids=["p1", "p2", "p2-processes"])
def test_force_serves_more_sequences_at_once_than_the_gpu_pool_holds(tiny, options):  # noqa: F811
    """Issue 20's engine target: the same tiny GPU pool (24 chunks; a request needs 3 to 5),
    four micro-batches, offload force against off under the engine's own loop. Each step computes
    its host-resident sequences in its staging slot, so the steps in flight together hold far
    more KV than the pool, with the same greedy and seeded outputs (and transformers' greedy
    ones)."""
    folder, hf, _ = tiny
    prompts = many_prompts(hf)
    common = dict(micro_batches=4, kv_cache_gib=gib(24), max_num_seqs=8, **options)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    off, plain = run(folder, prompts, greedy, **common)
    with plain:
        off_stats = plain.last_run_stats
    assert off[:6] == [hf_greedy(hf, prompt, 6) for prompt in prompts[:6]]
    # The ring: all of the pool (S = 12 a slot), two thirds of it with prefix caching (S = 8).
    for prefix_caching, gain in ((False, 1.6), (True, 1.3)):
        forced, llm = run(folder, prompts, greedy, offload="force", host_memory_gib=gib(400),
                          prefix_caching=prefix_caching, **common)
        with llm:
            assert forced == off
            stats = llm.last_run_stats
            assert stats["mean_in_flight_seqs"] >= gain * off_stats["mean_in_flight_seqs"], (prefix_caching, stats)
            # (with prefix caching a request admitted to the owned region when the slot is full
            # may finish there)
            assert stats["offload"]["host_resident_requests"] >= (len(prompts) * 3 // 4 if prefix_caching
                                                                  else len(prompts))
            assert stats["preemptions"] < off_stats["preemptions"]
    seeded = [SamplingParams(temperature=0.9, top_p=0.9, max_tokens=6, seed=100 + i, ignore_eos=True)
              for i in range(len(prompts))]
    reference, llm = run(folder, prompts, seeded, **common)
    llm.close()
    sampled, llm = run(folder, prompts, seeded, offload="force", host_memory_gib=gib(400), **common)
    llm.close()
    assert sampled == reference


def test_under_the_engine_loop_a_cycle_computes_more_kv_than_the_gpu_pool_holds():
    """The engine's own loop (plan_schedule: every micro-batch in flight, one step back per
    round), not a harness that waits for each step: the sequences of M consecutive steps hold
    more chunks than the whole GPU pool, while each step's host-resident KV stays in its slot."""
    from pipemax.core.offload_schedule import ScheduleSettings, plan_schedule

    requests = [(20, 24)] * 24  # 6 chunks of 8 tokens each at their end
    def schedule(offload, staging):
        return plan_schedule(requests, ScheduleSettings(24, 512 if offload != "off" else 0, 8, max_num_seqs=8,
                                                        max_num_batched_tokens=64, num_micro_batches=4,
                                                        offload=offload, staging_chunks=staging))
    def most_chunks_in_flight(result):
        """The most chunks the steps in flight together computed with, over every launch."""
        flying, most = {}, 0
        for round_ in result.rounds:
            for step in round_.launched:
                flying[step.index] = sum(-(-(start + count) // 8) for _, start, count in step.computes)
                most = max(most, sum(flying.values()))
            for index in round_.returned:
                del flying[index]
        return most

    plain, forced = schedule("off", 0), schedule("force", 12)
    assert most_chunks_in_flight(plain) <= 24
    assert most_chunks_in_flight(forced) > 24 * 1.6
    assert len(forced.steps) < len(plain.steps)
    for step in forced.steps:  # every request is host-resident, within one slot per step
        assert sum(-(-(start + count) // 8) for _, start, count in step.computes) <= 12
        assert set(step.host_resident) == {seq_id for seq_id, _, _ in step.computes}


def test_force_stages_each_micro_batch_in_its_step_slot_and_replays_exactly():
    kv = RecordingKVManager(num_gpu_chunks=8, num_host_chunks=32, chunk_tokens=8, staging_chunks=4)
    scheduler = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64, num_micro_batches=2, offload="force")
    for seq_id, length in enumerate([10, 12, 9, 14]):
        scheduler.add(make_seq(seq_id, length))
    stage = KVManager(8, 32, 8, 4)
    for step in range(4):
        micro_batch = step % 2
        plan = scheduler.schedule(micro_batch)
        assert plan.scheduled and kv.step == step
        low = kv.ring_base + (step % 2) * 4
        for entry in plan.scheduled:  # admitted host-resident: computed in the step's slot
            held = kv.sequence(entry.seq.seq_id)
            assert held.residency is Residency.HOST and all(low <= c < low + 4 for c in held.staging)
            entry.seq.num_computed_tokens = entry.end
            entry.seq.token_ids.append(7)
        ops = kv.take_log()
        names = [op for op, _, _ in ops]
        assert "offload" not in names and "free" not in names  # nothing released: the slot is reused
        if step >= 2:  # M = 2: a micro-batch comes back to the slot that still holds its KV: no copy
            assert [copied for op, _, copied in ops if op == "stage"] == [0] * len(plan.scheduled)
        apply_kv_ops(stage, ops)  # a stage replaying the log ends in the same state, chunk for chunk
        assert stage.sequences == kv.sequences and stage.gpu.states == kv.gpu.states
        scheduler.step_done(micro_batch)
    assert kv.gpu.num_free == kv.gpu.num_chunks  # the owned region is untouched


def run_to_completion(scheduler: Scheduler, micro_batches: int, steps: int = 200, after_step=None) -> int:
    """Steps the scheduler's micro-batches in turn, each back before the next (calling after_step
    after each); the most sequences running at once."""
    most = 0
    for step in range(steps):
        micro_batch = step % micro_batches
        plan = scheduler.schedule(micro_batch)
        most = max(most, len(scheduler.running))
        for entry in plan.scheduled:
            entry.seq.num_computed_tokens = entry.end
            if entry.samples:
                entry.seq.token_ids.append(5)
        for seq in list(scheduler.groups[micro_batch]):
            if seq.num_output_tokens >= seq.params.max_tokens:
                scheduler.finish(seq)
        scheduler.step_done(micro_batch)
        if after_step is not None:
            after_step()
        if not scheduler.has_unfinished():
            return most
    raise AssertionError("the requests did not finish")


def test_sequences_that_cannot_all_be_staged_take_turns():
    kv = RecordingKVManager(num_gpu_chunks=5, num_host_chunks=32, chunk_tokens=8, staging_chunks=2)
    scheduler = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64, num_micro_batches=1, offload="force")
    seqs = [make_seq(i, 9, max_tokens=6) for i in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    # A slot of 2 chunks holds one of them (2 chunks each) per step.
    run_to_completion(scheduler, 1)
    assert all(seq.num_output_tokens == 6 for seq in seqs)  # none starved
    assert kv.gpu.num_free == kv.gpu.num_chunks and kv.host.num_free == 32


def test_a_full_host_pool_recomputes_the_newest_rather_than_stalling():
    # Two requests whose KV the host pool holds only together at their start: the newer is
    # recomputed when the older grows, and both finish.
    kv = RecordingKVManager(num_gpu_chunks=8, num_host_chunks=6, chunk_tokens=4, staging_chunks=4)
    scheduler = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=8, num_micro_batches=1, offload="force")
    seqs = [make_seq(0, 2, max_tokens=12), make_seq(1, 1, max_tokens=12)]
    for seq in seqs:
        scheduler.add(seq)
    run_to_completion(scheduler, 1)
    assert [seq.num_output_tokens for seq in seqs] == [12, 12] and scheduler.num_preemptions >= 1


def test_copies_are_exact():
    spec = KVPoolSpec(num_layers=2, num_kv_heads=2, head_dim=16, chunk_tokens=8, dtype=torch.float16)
    pool = KVPool(spec, 6, 6, "cpu", backend="torch")
    pool.gpu.copy_(torch.randn(pool.gpu.shape).to(torch.float16))
    pool.host.copy_(torch.randn(pool.host.shape).to(torch.float16))
    transfers = KVTransfers(pool)
    gpu_before, host_before = pool.gpu.clone(), pool.host.clone()
    transfers.offload(0, [(0, 5), (3, 1)])
    assert torch.equal(pool.host[5], gpu_before[0]) and torch.equal(pool.host[1], gpu_before[3])
    transfers.prefetch(1, [(2, 4)])
    assert torch.equal(pool.gpu[4], host_before[2])
    from pipemax.core.kv_manager import RowCopy
    pool.gpu[1, :, :, 3] = 7.0
    transfers.write_back({2: [RowCopy(gpu_chunk=1, host_chunk=0, row=3)]})
    assert torch.equal(pool.host[0, :, :, 3], pool.gpu[1, :, :, 3])
    assert torch.equal(pool.host[0, :, :, 2], host_before[0, :, :, 2])  # only that row
    counters = transfers.counters()
    assert counters["bytes_offloaded"] == 2 * spec.chunk_bytes and counters["bytes_prefetched"] == spec.chunk_bytes
    assert counters["bytes_written_back"] == spec.chunk_bytes // 8


def test_offload_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="offload must be one of off, auto, force"):
        EngineConfig(model="m", offload="sometimes")
    with pytest.raises(ConfigError, match="host_memory_gib sizes the host KV pool of offload and of the prefix "
                                          "cache's host tier: set offload or prefix_caching too"):
        EngineConfig(model="m", host_memory_gib=1, prefix_caching=False)
    with pytest.raises(ConfigError, match="of host memory available now"):
        EngineConfig(model="m", offload="force", host_memory_gib=10**6)


def test_auto_offloads_within_the_budget_and_keeps_the_ids(tiny):  # noqa: F811
    folder, hf, _ = tiny
    prompts = many_prompts(hf)
    options = dict(micro_batches=4, kv_cache_gib=gib(12), max_num_seqs=8)
    reference, _ = run(folder, prompts, **options)
    # The first run fits the step costs (a ring needs a prediction: until then auto moves nothing)...
    ids, first = run(folder, prompts, offload="auto", host_memory_gib=gib(400), prefetch_gbs=1.0, **options)
    with first:
        assert ids == reference and first.engine.staging_chunks == 0
        assert first.last_run_stats["transfers"]["bytes_prefetched"] == 0
    # ... the next, seeded from it, sizes a ring from what one step's prefetch brings back.
    ids, llm = run(folder, prompts, offload="auto", host_memory_gib=gib(400), prefetch_gbs=1.0, **options)
    with llm:
        assert ids == reference
        assert llm.engine.staging_chunks == 12 // 4  # (the budget covers more: a quarter of the pool)
        assert llm.last_run_stats["offload"]["host_resident_requests"] > 0  # the small pool blocked admissions
    # Fewer than three micro-batches: the ring takes more than it gives, auto moves nothing.
    ids, llm = run(folder, prompts, offload="auto", host_memory_gib=gib(400), prefetch_gbs=1.0,
                   **{**options, "micro_batches": 2})
    with llm:
        assert ids == reference and llm.engine.staging_chunks == 0
        assert llm.last_run_stats["transfers"]["bytes_prefetched"] == 0


class FixedCost:
    def __init__(self, seconds):
        self.seconds = seconds

    def predict(self, batch_tokens, context_tokens):
        return self.seconds


class LinearCost:
    def predict(self, batch_tokens, context_tokens):
        return 1e-3 * batch_tokens


def test_the_budget_is_bandwidth_times_the_step_before():
    from pipemax.core.prefetch_budget import PrefetchBudget

    budget = PrefetchBudget(LinearCost(), bytes_per_second=50e9, chunk_bytes=2**20, num_micro_batches=3)
    assert budget.budget_chunks(0) == 0  # nothing known yet
    budget.record(1, 8, 10_000)
    # Micro-batch 2 runs before 0: it has not run yet, so it is taken to carry what 1 does.
    assert budget.budget_chunks(0) == int(50e9 * 0.008 // 2**20)
    budget.record(2, 4, 10_000)
    assert budget.budget_chunks(0) == int(50e9 * 0.004 // 2**20)  # one step: micro-batch 2's, not 1's too
    assert budget.budget_chunks(2) == int(50e9 * 0.008 // 2**20)  # micro-batch 1's
    assert budget.budget_chunks(1) == int(50e9 * 0.008 // 2**20)  # micro-batch 0 taken as typical (1's load)
    assert PrefetchBudget(FixedCost(None), 50e9, 2**20, 3).budget_chunks(0) == 0  # no model yet: no budget
    single = PrefetchBudget(FixedCost(1.0), 50e9, 2**20, 1)
    single.record(0, 8, 100)
    assert single.budget_chunks(0) == 0  # one micro-batch: nothing computes while it would copy


def auto_scheduler(seconds, gpu_chunks, max_num_seqs, max_tokens_per_step, requests, prompt_len, staging):
    """offload=auto over three micro-batches, each step predicted to take `seconds` (a budget of
    seconds x 10 chunks of 100 bytes at 1000 B/s)."""
    from pipemax.core.prefetch_budget import PrefetchBudget

    kv = RecordingKVManager(num_gpu_chunks=gpu_chunks, num_host_chunks=64, chunk_tokens=8, staging_chunks=staging)
    budget = PrefetchBudget(FixedCost(seconds), bytes_per_second=1000.0, chunk_bytes=100, num_micro_batches=3)
    scheduler = Scheduler(kv, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_tokens_per_step,
                          num_micro_batches=3, offload="auto", budget=budget)
    for seq_id in range(requests):
        scheduler.add(make_seq(seq_id, prompt_len, max_tokens=5))
    return scheduler


def test_auto_moves_nothing_without_a_budget_and_stays_inside_it():
    def scheduler(seconds):
        return auto_scheduler(seconds, gpu_chunks=8, max_num_seqs=4, max_tokens_per_step=64, requests=9,
                              prompt_len=9, staging=2)

    none = scheduler(0.0)
    run_to_completion(none, 3)
    assert not none.host_resident_ids  # a zero budget: exactly offload off
    roomy = scheduler(1.0)  # 10 chunks of budget per step, a slot of 2
    original = roomy._apply_residency_plan

    def checked(micro_batch):
        original(micro_batch)
        # What its next step stages stays within the slot and the budget.
        assert roomy._host_load(micro_batch) <= min(2, roomy.budget.budget_chunks(micro_batch))

    roomy._apply_residency_plan = checked
    most = run_to_completion(roomy, 3)
    assert roomy.host_resident_ids and most > 4  # more than the 4-chunk owned region holds at once


def test_the_trace_shows_every_stream_and_the_hidden_share_is_measured(tiny, tmp_path):  # noqa: F811
    import json

    folder, _, prompts = tiny
    trace = tmp_path / "trace.json"
    _, llm = run(folder, prompts, offload="force", pipeline_parallel=2, kv_cache_gib=gib(12),
                 host_memory_gib=gib(200), prefix_caching=False, trace=str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    tracks = {e["args"]["name"] for e in events if e["ph"] == "M"}
    assert {"host", "stage 0 compute", "stage 1 compute", "stage 0 prefetch", "stage 1 prefetch",
            "stage 0 write-back", "stage 1 write-back"} <= tracks
    spans = [e for e in events if e["ph"] == "X"]
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in spans)
    steps = llm.last_run_stats["steps"]
    assert sum(e["name"] == "step" for e in spans) == 2 * steps  # each stage's compute of each step
    # Prompts are written through layer by layer, inside their steps' compute spans.
    write_rows = [e for e in spans if e["name"].startswith("write rows L")]
    assert write_rows
    # On the CPU copies run on the computing thread, never beside compute.
    assert llm.last_run_stats["copy_time_hidden_fraction"] == 0.0


def test_hidden_fraction_counts_copy_time_under_compute():
    from pipemax.worker.timeline import hidden_fraction

    intervals = [("stage 0 compute", "step", 0.0, 1.0), ("stage 0 compute", "step", 2.0, 3.0),
                 ("stage 0 prefetch", "prefetch", 0.5, 1.5), ("stage 0 write-back", "write rows", 2.5, 2.75),
                 ("host", "plan", 0.0, 3.0)]
    assert hidden_fraction(intervals) == pytest.approx((0.5 + 0.25) / (1.0 + 0.25))
    assert hidden_fraction(intervals[:2]) is None
    assert hidden_fraction(intervals, concurrent=False) == 0.0  # one thread: nothing ran beside


def test_under_auto_a_heavy_micro_batch_hands_a_sequence_to_the_lightest():
    from pipemax.core.cost_model import StepCostModel
    from pipemax.core.prefetch_budget import PrefetchBudget

    kv = RecordingKVManager(num_gpu_chunks=64, num_host_chunks=16, chunk_tokens=8)
    model = StepCostModel(seed=(0.0, 1e-3, 0.0))  # step time = 1 ms per context token
    budget = PrefetchBudget(FixedCost(0.0), bytes_per_second=1.0, chunk_bytes=1, num_micro_batches=2)
    scheduler = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=256, num_micro_batches=2, offload="auto",
                          budget=budget, cost_model=model)
    seqs = [make_seq(i, length, max_tokens=50) for i, length in enumerate([60, 50, 40, 8])]
    for seq in seqs:
        scheduler.add(seq)
    scheduler.groups[0] = []
    plan = scheduler.schedule(0)  # micro-batch 0 admits everything it may (fair share: 2) ...
    plan1 = scheduler.schedule(1)  # ... and 1 the rest
    for entry in plan.scheduled + plan1.scheduled:
        entry.seq.num_computed_tokens = entry.end
        entry.seq.token_ids.append(1)
    heavy = max((0, 1), key=scheduler.predicted_step)
    light = 1 - heavy
    assert scheduler.predicted_step(heavy) > 1.1 * scheduler.predicted_step(light)
    before = abs(scheduler.predicted_step(0) - scheduler.predicted_step(1))
    scheduler.step_done(heavy)
    assert scheduler.num_moves == 1
    assert abs(scheduler.predicted_step(0) - scheduler.predicted_step(1)) < before
    assert all(seq.micro_batch == m for m, group in enumerate(scheduler.groups) for seq in group)
    for group in scheduler.groups:
        assert [s.admission for s in group] == sorted(s.admission for s in group)
    gap = abs(scheduler.predicted_step(0) - scheduler.predicted_step(1))
    scheduler.step_done(light)  # a move only ever narrows the gap
    assert abs(scheduler.predicted_step(0) - scheduler.predicted_step(1)) <= gap


def test_a_shed_sequence_does_not_take_its_chunks_back_from_the_older_one():
    # Two sequences that do not fit the pool together, in two micro-batches: the newer one, in
    # chunked prefill, is shed for the older one to grow; re-admitting it at once took the chunks
    # back every time, and the older one never finished.
    kv = RecordingKVManager(num_gpu_chunks=7, num_host_chunks=0, chunk_tokens=8)
    scheduler = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=32, num_micro_batches=2)
    seqs = [make_seq(0, 19, max_tokens=7), make_seq(1, 33, max_tokens=1)]
    for seq in seqs:
        scheduler.add(seq)
    run_to_completion(scheduler, 2, steps=100)
    assert [seq.num_output_tokens for seq in seqs] == [7, 1]


def test_only_nccl_gets_process_group_options():
    from pipemax.parallel.distributed import process_group_options

    assert process_group_options("gloo") is None


def test_prefill_rows_are_written_through_layer_by_layer_exactly():
    from pipemax.core.kv_manager import RowCopy

    spec = KVPoolSpec(num_layers=3, num_kv_heads=2, head_dim=16, chunk_tokens=8, dtype=torch.bfloat16)
    pool = KVPool(spec, 4, 4, "cpu", backend="torch")
    pool.gpu.copy_(torch.randn(pool.gpu.shape).to(spec.dtype))
    host_before = pool.host.clone()
    transfers = KVTransfers(pool)
    rows = {5: [RowCopy(2, 1, row) for row in range(8)] + [RowCopy(0, 3, 0), RowCopy(0, 3, 1)]}
    after_store = transfers.write_back_by_layer(rows)
    after_store(0)  # layer 0's K/V were stored: only layer 0 goes to the host
    assert torch.equal(pool.host[1, 0], pool.gpu[2, 0]) and torch.equal(pool.host[3, 0, :, :2], pool.gpu[0, 0, :, :2])
    assert torch.equal(pool.host[1, 1:], host_before[1, 1:]) and torch.equal(pool.host[3, 0, :, 2:], host_before[3, 0, :, 2:])
    after_store(1)
    after_store(2)
    assert torch.equal(pool.host[1], pool.gpu[2]) and torch.equal(pool.host[3, :, :, :2], pool.gpu[0, :, :, :2])
    assert torch.equal(pool.host[3, :, :, 2:], host_before[3, :, :, 2:])  # nothing past the rows
    assert transfers.counters()["bytes_written_back"] == 10 * spec.chunk_bytes // 8  # 10 rows, all layers
    assert transfers.write_back_by_layer({}) is None


def test_a_host_resident_request_is_admitted_in_the_slot_so_its_prefill_never_needs_an_offload():
    from pipemax.core.kv_manager import PoolExhaustedError

    kv = KVManager(num_gpu_chunks=8, num_host_chunks=4, chunk_tokens=8, staging_chunks=2)
    chunks = kv.allocate_host(0, 12)
    held = kv.sequence(0)
    assert held.residency is Residency.HOST and chunks == held.staging == [4, 5] and len(held.host_chunks) == 2
    assert [r.host_chunk for r in kv.write_back_rows(0, 0, 12)] == [held.host_chunks[0]] * 8 + [held.host_chunks[1]] * 4
    assert kv.gpu.num_free == 4  # the owned region is untouched
    with pytest.raises(PoolExhaustedError) as error:
        kv.allocate_host(1, 8)  # the slot is full: nothing is taken
    assert error.value.pool == "staging" and kv.host.num_free == 2 and 1 not in kv.sequences
    kv.begin_step(1)  # the next step: the other slot, and the sequence is no longer staged
    assert not held.staged and kv.allocate_host(1, 8) == [6]
    kv.begin_step(2)
    with pytest.raises(PoolExhaustedError) as error:
        kv.allocate_host(2, 16)  # 2 host chunks, 1 free
    assert error.value.pool == "host" and 2 not in kv.sequences


def test_auto_admits_requests_to_the_host_only_within_the_budget_while_others_wait():
    def admitted_staged(seconds):
        # Prompts of 4 chunks prefilled 2 chunks a step: an owned region of 6 chunks holds one
        # request, a slot of 5 another.
        scheduler = auto_scheduler(seconds, gpu_chunks=16, max_num_seqs=8, max_tokens_per_step=16, requests=8,
                                   prompt_len=30, staging=5)
        kv = scheduler.kv
        staged = set()
        original = kv.allocate_host

        def recording(seq_id, tokens):
            staged.add(seq_id)
            assert kv.gpu_available < kv.chunks_for(30) + 1  # only a request that would wait for owned chunks
            return original(seq_id, tokens)

        kv.allocate_host = recording
        run_to_completion(scheduler, 3)
        return staged

    assert not admitted_staged(0.0)  # no budget: no request starts on the host
    assert admitted_staged(1.0)  # 10 chunks of budget per step: some do


def test_the_cost_model_is_saved_after_a_run_and_seeds_the_next_engine(tiny, tmp_path, monkeypatch):  # noqa: F811
    import json

    folder, _, prompts = tiny
    monkeypatch.setenv("PIPEMAX_PROFILES", str(tmp_path / "profiles"))
    options = dict(micro_batches=2, offload="auto", kv_cache_gib=gib(12), host_memory_gib=gib(200))
    _, first = run(folder, prompts, **options)
    with first:
        assert first.last_run_stats["cost_model"]["seeded_from"] is None
        fitted = first.engine.cost_model.coefficients
    [saved] = (tmp_path / "profiles").glob("step-costs-*.json")
    record = json.loads(saved.read_text())
    assert record["coefficients"] == list(fitted) and record["key"]["stage_layers"] == [3]
    _, second = run(folder, prompts, **options)
    with second:
        assert second.last_run_stats["cost_model"]["seeded_from"] == str(saved)
    # Another stage split is another setup: its own profile, not this one's.
    _, split = run(folder, prompts, pipeline_parallel=2, **options)
    with split:
        assert split.last_run_stats["cost_model"]["seeded_from"] is None
    assert len(list((tmp_path / "profiles").glob("step-costs-*.json"))) == 2


def test_a_damaged_or_foreign_step_cost_profile_is_ignored(tmp_path, monkeypatch, caplog):
    import json

    from pipemax.core.cost_model import StepCostModel
    from pipemax.engine.step_costs import load_step_costs, save_step_costs, step_costs_path

    monkeypatch.setenv("PIPEMAX_PROFILES", str(tmp_path))
    key = {"device": "cpu", "num_layers": 3}
    assert load_step_costs(key) == (None, step_costs_path(key))
    model = StepCostModel(seed=(1e-4, 1e-6, 1e-3))
    assert save_step_costs(model, key) is None  # a seed alone has learned nothing: not saved
    for tokens in (10, 20, 40, 80):
        model.observe(tokens, 100 * tokens, 1e-4 * tokens + 1e-3)
    model.fit()
    path = save_step_costs(model, key)
    assert load_step_costs(key)[0] == pytest.approx(model.coefficients)
    record = json.loads(path.read_text())
    for damaged in ("{not json", json.dumps({**record, "key": {"device": "H100"}}),
                    json.dumps({**record, "coefficients": [1.0, -2.0, 0.0]})):
        path.write_text(damaged)
        assert load_step_costs(key)[0] is None
    assert "ignoring the step-cost profile" in caplog.text


def test_a_step_cost_profile_is_keyed_by_the_code_a_step_runs(tmp_path):
    import shutil

    from pipemax.engine.step_costs import code_digest, step_code_digest

    package = Path(__file__).resolve().parents[2] / "pipemax"
    copy = tmp_path / "pipemax"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert code_digest(copy) == step_code_digest()
    (copy / "tuning" / "server_plan.py").write_text("# planning does not change a step's time\n")
    assert code_digest(copy) == step_code_digest()
    with (copy / "kernels" / "norm.py").open("a") as source:
        source.write("# a kernel edit does\n")
    assert code_digest(copy) != step_code_digest()
