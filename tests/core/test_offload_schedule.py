"""The offload schedule without tensors: plan_schedule (a pure function: workload and settings
in, the engine's rounds out) over random workloads, costs and budgets, with steps coming back
in random numbers per round, while a stage replays every step's KV operations. Properties:

- a request computes only when its KV is on the GPU: owned, or staged in its step's slot;
- each step's staging lies in its own slot (step n mod 2) and within S chunks, so on a stage the
  ring holds only the step computing and the next one's;
- the owned chunks of a step in flight are never handed to another sequence until that step is
  back (no chunk is reused under a copy);
- auto with no budget moves nothing to the host (its budgets themselves are property-tested on
  plan_residency, tests/core/test_residency_plan.py);
- every request finishes with all its tokens, and both pools end empty;
- the same inputs give the same schedule.
"""

from hypothesis import example, given, settings
from hypothesis import strategies as st

from pipemax.core.kv_manager import KVManager, PoolExhaustedError, Residency
from pipemax.core.offload_schedule import ScheduleSettings, plan_schedule
from pipemax.core.sampling_params import SamplingParams
from pipemax.core.scheduler import Scheduler
from pipemax.core.sequence import Sequence
from pipemax.core.step_plan import RecordingKVManager, apply_kv_ops
from tests.engine.test_offload import run_to_completion
from tests.helpers import examples


def gpu_chunks_of(kv: KVManager, seq_ids) -> set[int]:
    return {chunk for seq_id in seq_ids for chunk in kv.sequence(seq_id).gpu_chunks}


@settings(max_examples=examples(100), deadline=None)
# A host pool that one request fills, shared by three micro-batches: the request that could not
# grow recomputed itself forever instead of having the newest host-resident one shed.
@example(mode="force", micro_batches=3, gpu_chunks=13, host_chunks=6, chunk_tokens=4, prefill_mode="mixed",
         prompts=[(6, 6), (1, 5), (37, 8), (34, 1)], bandwidth=0.0, per_context=1e-6, max_tokens_per_step=8,
         returns=[1])
@given(
    mode=st.sampled_from(["off", "force", "auto"]),
    micro_batches=st.integers(1, 3),
    gpu_chunks=st.integers(6, 14),
    host_chunks=st.sampled_from([6, 12, 256]),  # small host pools fill up
    chunk_tokens=st.sampled_from([4, 8, 16]),
    prefill_mode=st.sampled_from(["mixed", "separate"]),
    prompts=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 12)), min_size=1, max_size=10),
    bandwidth=st.sampled_from([0.0, 1e6, 1e7]),  # bytes/s a prefetch moves (0: no budget)
    per_context=st.sampled_from([1e-6, 1e-5, 1e-4]),  # the step time's cost per context token
    max_tokens_per_step=st.sampled_from([8, 32, 128]),
    returns=st.lists(st.integers(1, 3), max_size=400),
)
def test_offload_schedules_keep_their_promises(mode, micro_batches, gpu_chunks, host_chunks, chunk_tokens, prefill_mode,
                                               prompts,
                                               bandwidth, per_context, max_tokens_per_step, returns):
    staging = {"off": 0, "force": gpu_chunks // 2, "auto": gpu_chunks // 4}[mode]
    # A request may fill the owned region, or a slot and its host copy.
    longest = chunk_tokens * max(gpu_chunks - 2 * staging, min(staging, host_chunks))
    requests = []
    for prompt, outputs in prompts:
        prompt = max(1, min(prompt, longest - outputs))
        requests.append((prompt, max(1, min(outputs, longest - prompt))))
    # Predicted step times grow with context, so micro-batches differ and balancing moves
    # requests; the budget is bandwidth x those times, in chunks of 1000 bytes.
    config = ScheduleSettings(gpu_chunks, host_chunks if mode != "off" else 0, chunk_tokens, max_num_seqs=4,
                              max_num_batched_tokens=max_tokens_per_step, num_micro_batches=micro_batches,
                              offload=mode, prefill_mode=prefill_mode, step_cost=(1e-4, per_context, 1e-3),
                              bytes_per_second=bandwidth, chunk_bytes=1000, staging_chunks=staging)
    schedule = plan_schedule(requests, config, returns)
    assert plan_schedule(requests, config, returns) == schedule  # a pure function
    stage = KVManager(gpu_chunks, config.num_host_chunks, chunk_tokens, staging)
    in_flight = {}  # step index -> the GPU chunks it reads and writes
    computed = [0] * len(requests)
    for round_ in schedule.rounds:
        for step in round_.launched:
            apply_kv_ops(stage, step.kv_ops)
            running = [seq_id for seq_id, _, _ in step.computes]
            assert len(set(running)) == len(running), "a request scheduled twice in one step"
            for seq_id, start, count in step.computes:  # its KV is on the GPU when the step computes
                held = stage.sequence(seq_id)
                assert held.residency is Residency.GPU or held.staged
                assert start + count <= held.num_tokens
                computed[seq_id] = max(computed[seq_id], start + count)
            assert set(step.host_resident) == {i for i in running if stage.sequence(i).staged}
            slot = [c for i in step.host_resident for c in stage.sequence(i).staging]
            low = stage.ring_base + stage.step % 2 * staging
            assert len(set(slot)) == len(slot) <= staging and all(low <= c < low + staging for c in slot)
            assert mode == "off" or stage.step == step.index  # the slot follows the launch count
            chunks = gpu_chunks_of(stage, running)
            for other, held in in_flight.items():  # steps in flight keep their chunks
                assert not (held & chunks), f"step {step.index} reuses chunks step {other} is using"
            in_flight[step.index] = chunks
        for index in round_.returned:
            del in_flight[index]
    apply_kv_ops(stage, schedule.final_kv_ops)
    assert not in_flight
    assert computed == [prompt + outputs - 1 for prompt, outputs in requests]  # every token, to the last
    assert {seq_id for round_ in schedule.rounds for seq_id in round_.finished} == set(range(len(requests)))
    assert stage.gpu.num_free == stage.gpu.num_chunks == gpu_chunks - 2 * staging
    assert stage.host.num_free == config.num_host_chunks
    assert not stage.sequences
    if mode == "off" or (mode == "auto" and (micro_batches == 1 or not bandwidth)):  # no budget: nothing moves
        assert schedule.host_resident_requests == 0
    if mode == "force" and any(-(-p // chunk_tokens) + 1 <= staging for p, _ in requests):
        assert schedule.host_resident_requests > 0  # (one whose prompt fits a slot is admitted there)


def test_separate_prefill_never_starves_the_decodes_behind_a_self_preempting_prompt():
    # 9 chunks of 4 tokens: the prompt being prefilled keeps outgrowing the pool and preempting
    # itself; re-admitted in the same step it would never let the decoding requests run.
    requests = [(27, 5), (12, 1), (22, 4), (15, 10), (25, 11), (33, 3)]
    config = ScheduleSettings(9, 0, 4, max_num_seqs=4, max_num_batched_tokens=8, num_micro_batches=2,
                              prefill_mode="separate")
    schedule = plan_schedule(requests, config, max_rounds=2000)
    assert {seq_id for round_ in schedule.rounds for seq_id in round_.finished} == set(range(len(requests)))


def test_the_stage_never_frees_a_chunk_the_scheduler_still_counts():
    """Replaying a force schedule step by step keeps the stage's pools equal to the scheduler's."""
    kv = RecordingKVManager(8, 64, 8, 2)
    scheduler = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64, num_micro_batches=2, offload="force")
    for seq_id in range(5):
        scheduler.add(Sequence(seq_id, list(range(1, 12)), SamplingParams(max_tokens=6)))
    stage = KVManager(8, 64, 8, 2)

    def replay():
        apply_kv_ops(stage, kv.take_log())
        assert stage.gpu.states == kv.gpu.states and stage.host.states == kv.host.states
        assert {i: s.staging for i, s in stage.sequences.items()} == {i: s.staging for i, s in kv.sequences.items()}

    run_to_completion(scheduler, 2, after_step=replay)
    try:
        stage.gpu.check_available(stage.gpu.num_chunks)
    except PoolExhaustedError:
        raise AssertionError("the stage leaked GPU chunks")
