"""Sampling on the device: the Gumbel-max draw follows softmax(logits / temperature), top-k and
top-p keep exactly their tokens (and top-k alone sorts nothing), a seeded row draws the same
token whatever shares its batch, and penalties, applied over the batch at once, follow their
definitions row by row."""

import pytest
import torch
from hypothesis import given, settings
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
