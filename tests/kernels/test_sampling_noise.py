"""Gumbel noise from Philox: the kernel equals its torch reference (the same Philox in integer
arithmetic) draw for draw, rows are independent of each other, and the noise is Gumbel."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from pipemax.kernels import gumbel_noise, gumbel_noise_ref
from pipemax.kernels.sampling_noise import philox_uint32


@given(seeds=st.lists(st.integers(0, 2**63 - 1), min_size=0, max_size=4), vocab=st.integers(1, 3000))
def test_kernel_equals_reference(device, seeds, vocab):
    seeds = torch.tensor(seeds, dtype=torch.int64)
    expected = gumbel_noise_ref(seeds, vocab)
    actual = gumbel_noise(seeds.to(device), vocab)
    assert actual.shape == (len(seeds), vocab)
    # The same Philox draws; the two logs may differ in the last bit.
    torch.testing.assert_close(actual.cpu(), expected, rtol=1e-5, atol=1e-5)


def test_a_row_depends_on_its_seed_only_and_is_gumbel():
    noise = gumbel_noise_ref(torch.tensor([7, 8, 7]), 20000)
    assert torch.equal(noise[0], noise[2]) and not torch.equal(noise[0], noise[1])
    assert abs(noise[1].mean().item() - 0.5772) < 0.03 and abs(noise[1].std().item() - 1.2825) < 0.03


def test_philox_matches_the_published_known_answer():
    # Random123's known-answer test for philox4x32-10, counter (0, 0, 0, 0), key (0, 0): 0x6627e8d5.
    assert philox_uint32(0, torch.zeros(1, dtype=torch.int64)).item() == 0x6627E8D5
