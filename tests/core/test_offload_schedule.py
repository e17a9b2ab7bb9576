"""The offload schedule without tensors: plan_schedule (a pure function: workload and settings
in, the engine's rounds out) over random workloads, costs and budgets, with steps coming back
in random numbers per round, while a stage replays every step's KV operations. Properties:

- a request computes only when its KV is on the GPU (its prefetch came before the step);
- the chunks of a step in flight are never handed to another sequence until that step is back
  (no staging chunk is overwritten while in use, no chunk is reused under a copy);
- a request moved between micro-batches as its step comes back keeps no staging chunks;
- auto with no budget moves nothing to the host (its budgets themselves are property-tested on
  plan_residency, tests/core/test_residency_plan.py);
- every request finishes with all its tokens, and both pools end empty;
- the same inputs give the same schedule.
"""

from hypothesis import given, settings
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
    longest = chunk_tokens * gpu_chunks  # a request may fill the whole GPU pool
    requests = []
    for prompt, outputs in prompts:
        prompt = max(1, min(prompt, longest - outputs))
        requests.append((prompt, max(1, min(outputs, longest - prompt))))
    # Predicted step times grow with context, so micro-batches differ and balancing moves
    # requests; the budget is bandwidth x those times, in chunks of 1000 bytes.
    config = ScheduleSettings(gpu_chunks, host_chunks if mode != "off" else 0, chunk_tokens, max_num_seqs=4,
                              max_num_batched_tokens=max_tokens_per_step, num_micro_batches=micro_batches,
                              offload=mode, prefill_mode=prefill_mode, step_cost=(1e-4, per_context, 1e-3),
                              bytes_per_second=bandwidth, chunk_bytes=1000)
    schedule = plan_schedule(requests, config, returns)
    assert plan_schedule(requests, config, returns) == schedule  # a pure function
    stage = KVManager(gpu_chunks, config.num_host_chunks, chunk_tokens)
    in_flight = {}  # step index -> the GPU chunks it reads and writes
    steps_by_index = {step.index: step for step in schedule.steps}
    computed = [0] * len(requests)
    for round_ in schedule.rounds:
        for step in round_.launched:
            apply_kv_ops(stage, step.kv_ops)
            running = [seq_id for seq_id, _, _ in step.computes]
            assert len(set(running)) == len(running), "a request scheduled twice in one step"
            for seq_id, start, count in step.computes:  # its KV is on the GPU when the step computes
                assert stage.residency(seq_id) in (Residency.GPU, Residency.STAGED)
                assert start + count <= stage.sequence(seq_id).num_tokens
                computed[seq_id] = max(computed[seq_id], start + count)
            assert set(step.host_resident) == {i for i in running if stage.residency(i) is Residency.STAGED}
            chunks = gpu_chunks_of(stage, running)
            for other, held in in_flight.items():  # steps in flight keep their chunks
                assert not (held & chunks), f"step {step.index} reuses chunks step {other} is using"
            in_flight[step.index] = chunks
        for index in round_.returned:
            del in_flight[index]
        # A request moved to another micro-batch as its step came back keeps no staging chunks
        # (unless a step in flight computes it).
        computing = {seq_id for index in in_flight for seq_id, _, _ in steps_by_index[index].computes}
        assert not (set(round_.moved) & set(round_.staged)) - computing, round_
    apply_kv_ops(stage, schedule.final_kv_ops)
    assert not in_flight
    assert computed == [prompt + outputs - 1 for prompt, outputs in requests]  # every token, to the last
    assert {seq_id for round_ in schedule.rounds for seq_id in round_.finished} == set(range(len(requests)))
    assert stage.gpu.num_free == gpu_chunks and stage.host.num_free == config.num_host_chunks
    assert not stage.sequences
    if mode == "off" or (mode == "auto" and (micro_batches == 1 or not bandwidth)):  # no budget: nothing moves
        assert schedule.host_resident_requests == 0
    if mode == "force":
        assert schedule.host_resident_requests > 0


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
    kv = RecordingKVManager(8, 64, 8)
    scheduler = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64, num_micro_batches=2, offload="force")
    for seq_id in range(5):
        scheduler.add(Sequence(seq_id, list(range(1, 12)), SamplingParams(max_tokens=6)))
    stage = KVManager(8, 64, 8)

    def replay():
        apply_kv_ops(stage, kv.take_log())
        assert stage.gpu.states == kv.gpu.states and stage.host.states == kv.host.states

    run_to_completion(scheduler, 2, after_step=replay)
    try:
        stage.gpu.check_available(8)
    except PoolExhaustedError:
        raise AssertionError("the stage leaked GPU chunks")
