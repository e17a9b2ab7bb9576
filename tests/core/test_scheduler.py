"""Scheduler and sampler without a model: continuous batching, chunked prefill, preemption."""

import pytest
import torch

from pipemax.core.kv_manager import KVManager
from pipemax.core.sampling_params import SamplingParams, SamplingParamsError
from pipemax.core.scheduler import Scheduler
from pipemax.core.sequence import Sequence, SequenceStatus
from pipemax.worker.cuda_graphs import bucket_sizes
from pipemax.worker.sampling import apply_penalties, sample


def new_seq(seq_id, prompt_len):
    return Sequence(seq_id, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=100))


def complete_step(plan):
    """What the engine does after running a step: mark tokens computed, append a sampled token."""
    for entry in plan.scheduled:
        entry.seq.num_computed_tokens = entry.end
        if entry.samples:
            entry.seq.token_ids.append(7)


def test_long_prompt_is_prefilled_over_several_steps_while_others_decode():
    scheduler = Scheduler(KVManager(64, 0, 8), max_num_seqs=8, max_num_batched_tokens=10)
    short, long = new_seq(0, 4), new_seq(1, 25)
    scheduler.add(short)
    scheduler.add(long)
    plan = scheduler.schedule()
    assert [(e.seq.seq_id, e.num_tokens) for e in plan.prefill] == [(0, 4), (1, 6)]
    complete_step(plan)
    plan = scheduler.schedule()  # mixed: short decodes while long continues its prefill
    assert [(e.seq.seq_id, e.num_tokens) for e in plan.decode] == [(0, 1)]
    assert [(e.seq.seq_id, e.start, e.num_tokens) for e in plan.prefill] == [(1, 6, 9)]
    assert not plan.prefill[0].samples


def test_new_requests_join_as_others_finish():
    scheduler = Scheduler(KVManager(64, 0, 8), max_num_seqs=2, max_num_batched_tokens=64)
    seqs = [new_seq(i, 3) for i in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    complete_step(scheduler.schedule())
    assert [s.status for s in seqs] == [SequenceStatus.RUNNING, SequenceStatus.RUNNING, SequenceStatus.WAITING]
    scheduler.finish(seqs[0])
    plan = scheduler.schedule()
    assert [e.seq.seq_id for e in plan.decode] == [1] and [e.seq.seq_id for e in plan.prefill] == [2]


def test_separate_mode_prefills_first_then_decodes():
    scheduler = Scheduler(KVManager(64, 0, 8), max_num_seqs=8, max_num_batched_tokens=64, prefill_mode="separate")
    first = new_seq(0, 5)
    scheduler.add(first)
    complete_step(scheduler.schedule())
    scheduler.add(new_seq(1, 5))
    plan = scheduler.schedule()
    assert not plan.decode and [e.seq.seq_id for e in plan.prefill] == [1]
    complete_step(plan)
    plan = scheduler.schedule()
    assert [e.seq.seq_id for e in plan.decode] == [0, 1] and not plan.prefill


def test_full_pool_preempts_the_newest_and_requeues_it_first():
    scheduler = Scheduler(KVManager(3, 0, 4), max_num_seqs=8, max_num_batched_tokens=64)
    old, new = new_seq(0, 4), new_seq(1, 8)
    scheduler.add(old)
    scheduler.add(new)
    complete_step(scheduler.schedule())  # 1 + 2 chunks: the pool is full
    plan = scheduler.schedule()  # old needs a second chunk for its next token: new is preempted
    assert [e.seq.seq_id for e in plan.decode] == [0]
    assert new.status is SequenceStatus.WAITING and new.num_computed_tokens == 0
    assert scheduler.waiting[0] is new and new.output_token_ids == [7]
    assert scheduler.num_preemptions == 1


def test_a_pool_too_small_for_any_sequence_raises():
    scheduler = Scheduler(KVManager(1, 0, 4), max_num_seqs=8, max_num_batched_tokens=64)
    seq = new_seq(0, 4)
    scheduler.add(seq)
    complete_step(scheduler.schedule())
    with pytest.raises(RuntimeError, match="no sequence fits the KV pool"):
        scheduler.schedule()


def test_sampling_params_validation():
    for bad, message in [(dict(temperature=-0.5), "temperature"), (dict(top_p=0), "top_p"), (dict(max_tokens=0), "max_tokens"),
                         (dict(top_k=-3), "top_k"), (dict(stop=[""]), "stop")]:
        with pytest.raises(SamplingParamsError, match=message):
            SamplingParams(**bad)
    assert SamplingParams(stop="x").stop == ["x"] and SamplingParams(top_k=-1).top_k == 0


def test_top_k_and_top_p_only_sample_allowed_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]] * 1)
    for params, allowed in [(SamplingParams(temperature=1.0, top_k=2), {0, 1}),
                            (SamplingParams(temperature=1.0, top_p=0.5), {0}),
                            (SamplingParams(temperature=1.0, top_p=0.8), {0, 1})]:
        seen = {sample(logits, [params], [key])[0][0] for key in range(200)}
        assert seen <= allowed and len(seen) == len(allowed), (params, seen)
    greedy, logprobs, top = sample(logits, [SamplingParams(temperature=0, top_logprobs=3)], [0])
    expected = torch.log_softmax(logits[0], 0)
    assert greedy == [0] and logprobs[0] == pytest.approx(expected[0].item())
    assert [t for t, _ in top[0]] == [0, 1, 2] and top[0][2][1] == pytest.approx(expected[2].item())


def test_penalties_follow_their_definitions():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 1.0]])
    history = [([0, 1], [3, 3, 2])]  # prompt, output
    out = apply_penalties(logits, [SamplingParams(repetition_penalty=2.0)], history, set())
    assert out.tolist() == [[1.0, -2.0, 0.25, 1.5, 1.0]]
    out = apply_penalties(logits, [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)], history, set())
    assert out.tolist() == [[2.0, -1.0, 0.5 - 0.75, 3.0 - 1.0, 1.0]]
    blocked = apply_penalties(logits, [SamplingParams(min_tokens=4, stop_token_ids=[4])], history, {3})
    assert blocked[0, 3] == float("-inf") and blocked[0, 4] == float("-inf") and blocked[0, 0] == 2.0
    after = apply_penalties(logits, [SamplingParams(min_tokens=3, stop_token_ids=[4])], history, {3})
    assert torch.equal(after, logits)
    assert apply_penalties(logits, [SamplingParams()], history, {3}) is logits


def test_bucket_sizes_cover_every_batch():
    for max_batch in (1, 3, 64, 200):
        sizes = bucket_sizes(max_batch)
        assert sizes[-1] == max_batch and sizes == sorted(set(sizes))
