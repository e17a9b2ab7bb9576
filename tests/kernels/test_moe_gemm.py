"""The experts' grouped GEMM against a torch loop over experts, over random routings (tokens
routed to few or many experts, experts with no token, top-k from 1 to 4), shapes that end
mid-tile, dtypes; and the alignment: every pair exactly once, in its expert's blocks."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pipemax.kernels.moe_gemm import align_by_expert, grouped_gemm, max_blocks
from tests.helpers import DTYPES, assert_close


def routing(generator, tokens, experts, top_k, skew):
    """Distinct experts per token; skew: most tokens go to the first few experts."""
    scores = torch.rand(tokens, experts, generator=generator)
    if skew:
        scores[:, : max(1, experts // 4)] += 1.0
    return scores.topk(top_k, dim=1).indices


@given(tokens=st.integers(0, 40), experts=st.integers(1, 9), top_k=st.integers(1, 4),
       block_m=st.sampled_from([16, 32]), skew=st.booleans(), seed=st.integers(0, 2**16))
def test_alignment_places_every_pair_once_in_its_experts_blocks(tokens, experts, top_k, block_m, skew, seed):
    top_k = min(top_k, experts)
    ids = routing(torch.Generator().manual_seed(seed), tokens, experts, top_k, skew)
    sorted_pairs, block_experts = align_by_expert(ids, experts, block_m)
    pairs = tokens * top_k
    assert block_experts.numel() == max_blocks(pairs, experts, block_m)
    blocks = sorted_pairs.view(-1, block_m)
    seen = []
    for block, expert in enumerate(block_experts.tolist()):
        members = [p for p in blocks[block].tolist() if p < pairs]
        if expert < 0:
            assert not members  # past the last expert: nothing
            continue
        assert all(ids.view(-1)[p] == expert for p in members)
        seen += members
    assert sorted(seen) == list(range(pairs))
    assert block_experts[block_experts >= 0].tolist() == sorted(block_experts[block_experts >= 0].tolist())


def grouped_reference(a, weights, ids, top_k, scale):
    out = torch.zeros(ids.numel(), weights.shape[1])
    for pair, expert in enumerate(ids.view(-1).tolist()):
        out[pair] = a[pair // top_k].float() @ weights[expert].float().T
        if scale is not None:
            out[pair] *= scale[pair]
    return out


@given(tokens=st.integers(1, 24), experts=st.integers(1, 6), top_k=st.integers(1, 3), k=st.integers(1, 70),
       n=st.integers(1, 40), dtype=st.sampled_from(DTYPES), scaled=st.booleans(), per_pair_rows=st.booleans(),
       skew=st.booleans(), seed=st.integers(0, 2**16))
def test_grouped_gemm_matches_an_expert_at_a_time(device, tokens, experts, top_k, k, n, dtype, scaled, per_pair_rows,
                                                  skew, seed):
    top_k = min(top_k, experts)
    generator = torch.Generator().manual_seed(seed)
    ids = routing(generator, tokens, experts, top_k, skew)
    rows = tokens * top_k if per_pair_rows else tokens  # the down projection reads a row per pair
    a = (torch.randn(rows, k, generator=generator) / k**0.5).to(dtype)
    weights = torch.randn(experts, n, k, generator=generator).to(dtype)
    scale = torch.rand(tokens * top_k, generator=generator) if scaled else None
    step = 1 if per_pair_rows else top_k
    expected = grouped_reference(a, weights, ids, step, scale)
    sorted_pairs, block_experts = align_by_expert(ids.to(device), experts, 16)
    out = torch.full((tokens * top_k, n), float("nan"), dtype=dtype, device=device)
    grouped_gemm(a.to(device), weights.to(device), sorted_pairs, block_experts, step, out,
                 scale.to(device) if scaled else None, block_m=16)
    assert_close(out, expected.to(dtype), dtype)  # every pair written (no NaN left)


def test_bad_arguments_are_refused():
    a, weights = torch.zeros(4, 8), torch.zeros(2, 16, 8)
    sorted_pairs, block_experts = align_by_expert(torch.zeros(4, 1, dtype=torch.long), 2, 16)
    with pytest.raises(ValueError, match="out must be"):
        grouped_gemm(a, weights, sorted_pairs, block_experts, 1, torch.zeros(3, 16), block_m=16)
    with pytest.raises(TypeError, match="share a float dtype"):
        grouped_gemm(a, weights.half(), sorted_pairs, block_experts, 1, torch.zeros(4, 16), block_m=16)
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        grouped_gemm(a, weights, sorted_pairs, block_experts, 1, torch.zeros(4, 16), block_m=24)
