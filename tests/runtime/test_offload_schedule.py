"""The offload schedule without tensors: the scheduler (pure Python) driven through random
workloads, costs and budgets, with micro-batches in flight as the engine keeps them, while a
stage replays every plan's KV log. Properties:

- a sequence computes only when its KV is on the GPU (its prefetch came before the step);
- the chunks of a step in flight are never handed to another sequence until that step is back
  (no staging chunk is overwritten while in use, no chunk is reused under a copy);
- auto keeps each micro-batch's host-resident KV within its prefetch budget, and with no budget
  moves nothing;
- every request finishes, and both pools end empty, on the scheduler and on the stage.
"""

from hypothesis import given, settings
from hypothesis import strategies as st

from pipemax.runtime.kv_manager import KVManager, PoolExhaustedError, Residency
from pipemax.runtime.prefetch_budget import PrefetchBudget
from pipemax.runtime.sampling import SamplingParams
from pipemax.runtime.scheduler import Scheduler
from pipemax.runtime.sequence import Sequence
from pipemax.runtime.step_plan import RecordingKVManager, apply_kv_ops
from tests.runtime.test_offload import run_to_completion


class LinearCost:
    def __init__(self, per_token: float, per_context: float, fixed: float):
        self.per_token, self.per_context, self.fixed = per_token, per_context, fixed

    def predict(self, batch_tokens, context_tokens):
        return self.per_token * batch_tokens + self.per_context * context_tokens + self.fixed


def gpu_chunks_of(kv: KVManager, seq_ids) -> set[int]:
    return {chunk for seq_id in seq_ids for chunk in kv.sequence(seq_id).gpu_chunks}


@settings(max_examples=60, deadline=None)
@given(
    mode=st.sampled_from(["off", "force", "auto"]),
    micro_batches=st.integers(1, 3),
    gpu_chunks=st.integers(6, 14),
    host_chunks=st.sampled_from([6, 12, 256]),  # small host pools fill up
    chunk_tokens=st.sampled_from([8, 16]),
    prompts=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 12)), min_size=1, max_size=10),
    budget_seconds=st.sampled_from([0.0, 1e-4, 1e-2]),
    max_tokens_per_step=st.sampled_from([8, 32, 128]),
    data=st.data(),
)
def test_offload_schedules_keep_their_promises(mode, micro_batches, gpu_chunks, host_chunks, chunk_tokens, prompts,
                                               budget_seconds, max_tokens_per_step, data):
    from pipemax.runtime.cost_model import StepCostModel

    kv = RecordingKVManager(gpu_chunks, host_chunks if mode != "off" else 0, chunk_tokens)
    budget = None
    if mode == "auto":
        budget = PrefetchBudget(LinearCost(0, 0, budget_seconds), bytes_per_second=1e6, chunk_bytes=1000,
                                num_micro_batches=micro_batches)
    cost = StepCostModel(seed=(1e-4, 1e-6, 1e-3))  # balancing moves sequences between micro-batches (auto)
    scheduler = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=max_tokens_per_step,
                          num_micro_batches=micro_batches, offload=mode, budget=budget, cost_model=cost)
    longest = chunk_tokens * gpu_chunks  # a sequence may fill the whole GPU pool
    seqs = []
    for seq_id, (prompt, outputs) in enumerate(prompts):
        prompt = min(prompt, longest - outputs) if longest > outputs else 1
        seq = Sequence(seq_id, list(range(1, prompt + 1)), SamplingParams(max_tokens=min(outputs, longest - prompt)))
        seqs.append(seq)
        scheduler.add(seq)
    stage = KVManager(gpu_chunks, kv.host.num_chunks, chunk_tokens)
    in_flight = {}  # micro-batch -> (plan, the GPU chunks its step reads and writes), in launch order

    def complete(micro_batch):
        plan, _ = in_flight.pop(micro_batch)
        for entry in plan.scheduled:
            if entry.samples:
                entry.seq.token_ids.append(3)
            if entry.seq.num_output_tokens >= entry.seq.params.max_tokens:
                scheduler.finish(entry.seq)
        scheduler.step_done(micro_batch)
        if mode == "auto":
            host = [s for s in scheduler.groups[micro_batch] if kv.residency(s.seq_id) is Residency.HOST]
            on_host = sum(len(kv.sequence(s.seq_id).host_chunks) + 1 for s in host)
            if budget.budget_chunks(micro_batch) == 0:
                assert not host
            else:
                # What auto moved fits the budget (it may only exceed it by what it cannot take back).
                moved = [s for s in host if s.seq_id in scheduler.host_resident_ids]
                assert on_host <= budget.budget_chunks(micro_batch) or len(moved) == len(host)

    for tick in range(2000):
        if not scheduler.has_unfinished():
            break
        launched = False
        for micro_batch in range(micro_batches):
            if micro_batch in in_flight:
                continue
            try:
                plan = scheduler.schedule(micro_batch)
            except RuntimeError:
                raise
            for entry in plan.scheduled:
                entry.seq.num_computed_tokens = entry.end
            apply_kv_ops(stage, kv.take_log())
            if not plan.scheduled:
                continue
            launched = True
            running = [e.seq.seq_id for e in plan.scheduled]
            assert len(set(running)) == len(running), "a sequence scheduled twice in one step"
            for seq_id in running:  # its KV is on the GPU when the step computes
                assert stage.residency(seq_id) in (Residency.GPU, Residency.STAGED)
                assert stage.sequence(seq_id) == kv.sequence(seq_id)
            chunks = gpu_chunks_of(stage, running)
            for other, (_, held) in in_flight.items():  # steps in flight keep their chunks
                assert not (held & chunks), f"micro-batch {micro_batch} reuses chunks micro-batch {other} is using"
            in_flight[micro_batch] = (plan, chunks)
        if in_flight:
            # Steps come back in the order they were launched (every stage runs them in order);
            # how many come back before the host plans again is the workload's choice.
            for _ in range(data.draw(st.integers(1, len(in_flight)), label="completions")):
                complete(next(iter(in_flight)))
        elif not launched and scheduler.has_unfinished():
            continue  # a group waits for another to shed: the next round schedules again
    else:
        raise AssertionError("the requests did not finish")
    while in_flight:
        complete(next(iter(in_flight)))
    apply_kv_ops(stage, kv.take_log())
    assert all(seq.num_output_tokens == seq.params.max_tokens for seq in seqs)
    for manager in (kv, stage):
        assert manager.gpu.num_free == gpu_chunks and manager.host.num_free == kv.host.num_chunks
        assert not manager.sequences
    if mode == "off":
        assert not scheduler.host_resident_ids


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
