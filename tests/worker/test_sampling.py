"""Sampling on the device: the Gumbel-max draw follows softmax(logits / temperature), top-k and
top-p keep exactly their tokens (and top-k alone sorts nothing), a seeded row draws the same
token whatever shares its batch, and penalties, applied over the batch at once, follow their
definitions row by row."""

import random
from types import SimpleNamespace

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pipemax.core.sampling_params import SamplingParams
from pipemax.worker import sampling
from pipemax.worker.sampling import apply_penalties, row_seed, sample
from tests.helpers import examples


def test_draws_follow_the_softmax_of_the_scaled_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    params = SamplingParams(temperature=0.7)
    draws = torch.tensor([sample(logits, [params], [key])[0][0] for key in range(4000)])
    frequencies = torch.bincount(draws, minlength=4).float() / len(draws)
    expected = (logits[0] / 0.7).softmax(0)
    assert (frequencies - expected).abs().max() < 0.03, (frequencies, expected)


def test_top_k_alone_sorts_nothing_and_keeps_k_tokens(monkeypatch):
    def no_sort(*args, **kwargs):
        raise AssertionError("a full sort of the vocabulary")

    monkeypatch.setattr(sampling, "_top_k_top_p", no_sort)
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0, 3.0], [0.0, 5.0, 1.0, 4.0, 3.0]])
    rows = [SamplingParams(temperature=2.0, top_k=2), SamplingParams(temperature=2.0)]  # the second: no limit
    seen = [set(), set()]
    for key in range(300):
        tokens = sample(logits, rows, [key, key + 1000])[0]
        for row, token in enumerate(tokens):
            seen[row].add(token)
    assert seen[0] == {1, 3} and seen[1] == {0, 1, 2, 3, 4}
    with pytest.raises(AssertionError, match="full sort"):  # top-p does need the sort
        sample(logits, [SamplingParams(temperature=1.0, top_p=0.9)], [0])


def tokens_drawn(logits: torch.Tensor, params: SamplingParams, draws: int = 100) -> set[int]:
    """The tokens `draws` samples of one row pick (one batch, a key per row)."""
    batch = logits.expand(draws, -1)
    return set(sample(batch, [params] * draws, list(range(draws)))[0])


# Top-p keeps the smallest set of most likely tokens whose probability reaches top_p (vLLM and
# transformers: a token goes when the tokens above it already reach top_p). The probabilities are
# exact enough in float32 for each boundary to hold: 0.5 + 0.3 sums to float32(0.8).
@pytest.mark.parametrize("top_p, kept", [
    (0.3, {0}), (0.5, {0}), (0.5000001, {0, 1}), (0.79999995, {0, 1}), (0.8, {0, 1}), (0.8000001, {0, 1, 2}),
    (0.99, {0, 1, 2}),
])
@pytest.mark.parametrize("token_of_rank", [(0, 1, 2), (2, 0, 1)])  # where the most likely token is, and so on
def test_top_p_keeps_the_smallest_set_that_reaches_it_exactly_at_the_boundaries(top_p, kept, token_of_rank):
    probabilities = torch.empty(3, dtype=torch.float64)
    probabilities[list(token_of_rank)] = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    logits = probabilities.log().float()[None]
    drawn = tokens_drawn(logits, SamplingParams(temperature=1.0, top_p=top_p))
    assert drawn == {token_of_rank[rank] for rank in kept}


@settings(max_examples=examples(30), deadline=None)
@given(logits=st.lists(st.floats(-4, 4), min_size=2, max_size=8), top_p=st.floats(0.01, 0.99),
       temperature=st.sampled_from([0.5, 1.0, 2.0]))
def test_top_p_draws_only_from_the_smallest_set_that_reaches_it(logits, top_p, temperature):
    logits = torch.tensor(logits)[None]
    probabilities = (logits[0].double() / temperature).softmax(0)
    order = probabilities.argsort(descending=True, stable=True).tolist()
    reached = probabilities[order].cumsum(0)
    # Far from every boundary (float32 rounding decides those: the test above pins them).
    assume(((reached - top_p).abs() > 1e-4).all() and len(set(probabilities.tolist())) == len(order))
    kept = set(order[:int((reached < top_p).sum()) + 1])
    assert tokens_drawn(logits, SamplingParams(temperature=temperature, top_p=top_p), draws=50) <= kept


@settings(max_examples=examples(30), deadline=None)
@given(seed=st.integers(0, 2**64 - 1), step=st.integers(0, 1000), others=st.integers(0, 5), position=st.data())
def test_a_seeded_row_draws_the_same_token_whatever_its_batch(seed, step, others, position):
    generator = torch.Generator().manual_seed(step)
    mine = torch.randn(1, 300, generator=generator)
    params = SamplingParams(temperature=1.0, seed=seed)
    alone = sample(mine, [params], [row_seed(seed, step)])[0][0]
    index = position.draw(st.integers(0, others))
    batch = torch.randn(others + 1, 300, generator=generator)
    batch[index] = mine[0]
    rows = [SamplingParams(temperature=0.5, top_k=7) for _ in range(others + 1)]
    rows[index] = params
    keys = [step * 31 + row for row in range(others + 1)]
    keys[index] = row_seed(seed, step)
    assert sample(batch, rows, keys)[0][index] == alone


def test_the_last_stage_keys_a_seeded_row_by_its_seed_and_step_so_each_step_draws_afresh(monkeypatch):
    """StageExecutor._sample: at step k (k tokens generated) a seeded row's key is row_seed(seed, k),
    so its draws change from step to step, and a request at the same step draws the same token."""
    from pipemax.core.step_plan import StagePlan
    from pipemax.worker import stage as stage_module

    keys = []

    def recording(logits, params, seeds, *args, **kwargs):
        keys.append(list(seeds))
        return sampling.sample_on_device(logits, params, seeds, *args, **kwargs)

    monkeypatch.setattr(stage_module, "sample_on_device", recording)
    last = object.__new__(stage_module.StageExecutor)  # the sampler's state only: no model, no pool
    last.device, last.eos_token_ids, last.noise_keys = torch.device("cpu"), set(), random.Random(0)
    last.runner = SimpleNamespace(greedy_ids=None)
    seeded = SamplingParams(temperature=1.0, seed=1234)
    last.samplers = {7: stage_module.SamplerState(seeded, [1, 2]),
                     8: stage_module.SamplerState(seeded, [1, 2], output_token_ids=[5, 6, 7], num_sampled=3),  # 3 ahead
                     9: stage_module.SamplerState(SamplingParams(temperature=1.0), [3])}
    plan = StagePlan(micro_batch=0, kv_ops=[], seq_ids=[7, 8, 9], starts=[2, 5, 1], counts=[1, 1, 1], num_decode=3,
                     samples=[True, True, True], token_ids=[0, 0, 0])
    logits = torch.zeros(3, 64)  # every token equally likely: the noise alone chooses
    # Each step is launched before the one before it has returned its tokens (the engine runs
    # ahead): the key counts the draws made, not the tokens that have come back.
    pending = [last._sample(plan, logits) for _ in range(8)]
    tokens = [step.result().tokens for step in pending]
    assert [step_keys[:2] for step_keys in keys] == [[row_seed(1234, k), row_seed(1234, k + 3)] for k in range(8)]
    first_row = [step_tokens[0] for step_tokens in tokens]
    assert len(set(first_row)) > 1  # not the same noise every step
    assert [step_tokens[1] for step_tokens in tokens[:5]] == first_row[3:]  # the same seed and step: the same token


def test_row_seeds_differ_by_step_and_seed():
    keys = {row_seed(seed, step) for seed in range(20) for step in range(20)}
    assert len(keys) == 400 and all(0 <= key < 2**63 for key in keys)


def test_batched_penalties_equal_the_row_by_row_definitions():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 12, generator=generator)
    rows = [SamplingParams(repetition_penalty=1.5, frequency_penalty=0.5), SamplingParams(),
            SamplingParams(presence_penalty=-1.0, min_tokens=3, stop_token_ids=[11]),
            SamplingParams(repetition_penalty=0.8)]
    histories = [([0, 1, 13], [2, 2, 5]), ([1], [1]), ([4], [6, 6]), (torch.tensor([3, 3, 7]), [])]
    out = apply_penalties(logits, rows, histories, blocked_token_ids={10})
    expected = logits.clone()
    for row, p in enumerate(rows):  # the definitions, one row at a time
        prompt, output = histories[row]
        prompt = [int(t) for t in prompt if int(t) < 12]
        for token in set(prompt) | set(output):
            value = expected[row, token]
            expected[row, token] = value / p.repetition_penalty if value > 0 else value * p.repetition_penalty
        for token in set(output):
            expected[row, token] -= p.frequency_penalty * output.count(token) + p.presence_penalty
        if len(output) < p.min_tokens:
            expected[row, [10, *p.stop_token_ids]] = float("-inf")
    assert torch.allclose(out, expected)
    assert torch.equal(out[1], logits[1])  # no penalties: untouched


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_logits_in_the_models_dtype_sample_as_their_float32_copy_does(dtype):
    """The LM head's logits stay in the model's dtype (no float32 copy of the batch): every choice,
    logprob and alternative equals what their exact float32 upcast gives. Coarse values make ties,
    which argmax breaks the same way in both."""
    generator = torch.Generator().manual_seed(3)
    logits = (torch.randn(6, 50, generator=generator) * 4).round().to(dtype)  # many ties
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, logprobs=True, top_logprobs=3),
              SamplingParams(temperature=0.7, seed=1, top_p=0.8), SamplingParams(temperature=1.3, top_k=5, seed=2),
              SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=4, logprobs=True)]
    seeds = [0, 0, 11, 12, 0, 13]
    low = sampling.sample_on_device(logits, params, seeds)
    full = sampling.sample_on_device(logits.float(), params, seeds)
    assert torch.equal(low[0], full[0]) and torch.equal(low[1], full[1])
    assert torch.equal(low[2][0], full[2][0]) and torch.equal(low[2][1], full[2][1])
