"""The fused layer kernels against their torch references (which are the unfused model code):
residual add + RMSNorm, SiLU x up, and rotary embedding fused with the KV store (with Qwen3's
q/k norm), over random shapes, GQA ratios, slots that skip tokens, and dtypes."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pipemax.kernels import (
    rms_norm,
    rms_norm_ref,
    rope_store_kv,
    rope_store_kv_ref,
    silu_and_mul,
    silu_and_mul_ref,
)
from pipemax.models.rope import RotaryEmbedding
from tests.helpers import DTYPES, assert_close


def randn(generator, *shape, dtype):
    return torch.randn(*shape, generator=generator).to(dtype)


@given(tokens=st.integers(0, 9), hidden=st.sampled_from([16, 48, 64, 200, 1024]), dtype=st.sampled_from(DTYPES),
       with_residual=st.booleans(), in_place=st.booleans(), seed=st.integers(0, 2**16))
def test_rms_norm_matches_reference(device, tokens, hidden, dtype, with_residual, in_place, seed):
    generator = torch.Generator().manual_seed(seed)
    x = randn(generator, tokens, hidden, dtype=dtype) * 3
    weight = randn(generator, hidden, dtype=dtype)
    residual = randn(generator, tokens, hidden, dtype=dtype) if with_residual else None
    expected_residual = residual.clone() if with_residual else None
    expected = rms_norm_ref(x.clone(), weight, 1e-6, expected_residual)
    x_dev = x.to(device)
    residual_dev = residual.to(device) if with_residual else None
    out = rms_norm(x_dev, weight.to(device), 1e-6, residual_dev, out=x_dev if in_place else None)
    assert_close(out, expected, dtype)
    if in_place:
        assert out.data_ptr() == x_dev.data_ptr()
    if with_residual:  # the sum is rounded to the dtype once, on both sides: equal
        assert_close(residual_dev, expected_residual, dtype)
        if dtype == torch.float32:
            assert torch.equal(residual_dev.cpu(), expected_residual)


def test_rms_norm_rejects_bad_input():
    x = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, torch.zeros(4), 1e-6)
    with pytest.raises(ValueError, match="residual must be"):
        rms_norm(x, torch.zeros(8), 1e-6, residual=torch.zeros(2, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="contiguous rows"):
        rms_norm(torch.zeros(8, 2).t(), torch.zeros(8), 1e-6)


@given(tokens=st.integers(0, 7), intermediate=st.sampled_from([8, 96, 1024, 1100]), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_silu_and_mul_matches_reference(device, tokens, intermediate, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    gate_up = randn(generator, tokens, 2 * intermediate, dtype=dtype) * 4
    assert_close(silu_and_mul(gate_up.to(device)), silu_and_mul_ref(gate_up), dtype)


@given(
    tokens=st.integers(1, 12),
    kv_heads=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 2, 4]),  # GQA ratios
    head_dim=st.sampled_from([16, 64, 80, 128]),
    chunk_tokens=st.sampled_from([8, 16]),
    dtype=st.sampled_from(DTYPES),
    qk_norm=st.booleans(),
    data=st.data(),
)
def test_rope_store_kv_matches_reference(device, tokens, kv_heads, group, head_dim, chunk_tokens, dtype, qk_norm, data):
    heads = kv_heads * group
    seed = data.draw(st.integers(0, 2**16), label="seed")
    generator = torch.Generator().manual_seed(seed)
    num_chunks, layers = 3, 2
    capacity = num_chunks * chunk_tokens
    slots = data.draw(st.lists(st.integers(0, capacity - 1), min_size=tokens, max_size=tokens, unique=True)
                      if tokens <= capacity else st.just(list(range(tokens))), label="slots")
    skip = data.draw(st.lists(st.booleans(), min_size=tokens, max_size=tokens), label="skip")
    slot_mapping = torch.tensor([-1 if s else slot for slot, s in zip(slots, skip)], dtype=torch.int64)
    positions = torch.tensor(data.draw(st.lists(st.integers(0, 300), min_size=tokens, max_size=tokens)))
    rotary = RotaryEmbedding(type("C", (), {"rope_theta": 10000.0})(), head_dim, 512)
    cos, sin = rotary.cos[positions], rotary.sin[positions]
    qkv = randn(generator, tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    pool = randn(generator, num_chunks, layers, 2, chunk_tokens, kv_heads, head_dim, dtype=dtype)
    norms = (randn(generator, head_dim, dtype=dtype), randn(generator, head_dim, dtype=dtype)) if qk_norm else (None, None)
    layer = data.draw(st.integers(0, layers - 1), label="layer")

    expected_qkv, expected_pool = qkv.clone(), pool.clone()
    expected_q = rope_store_kv_ref(expected_qkv, cos, sin, expected_pool, layer, slot_mapping, heads, *norms)
    qkv_dev, pool_dev = qkv.to(device, copy=True), pool.to(device, copy=True)  # (copies on the CPU too)
    q = rope_store_kv(qkv_dev, cos.to(device), sin.to(device), pool_dev, layer, slot_mapping.to(device), heads,
                      *(n.to(device) if n is not None else None for n in norms))
    assert q.data_ptr() == qkv_dev.data_ptr() and q.shape == (tokens, heads, head_dim)
    # Rotation subtracts products of similar size (4 ulps of each head's largest value allowed).
    assert_close(q, expected_q, dtype, row_ulps=4)
    assert_close(qkv_dev, expected_qkv, dtype, row_ulps=4)  # k and v untouched, q rotated in place
    assert_close(pool_dev, expected_pool, dtype, row_ulps=4)
    kept = slot_mapping >= 0  # v is copied, not computed: exact
    chunks, rows = slot_mapping[kept] // chunk_tokens, slot_mapping[kept] % chunk_tokens
    assert torch.equal(pool_dev.cpu()[chunks, layer, 1, rows], expected_pool[chunks, layer, 1, rows])
    untouched = torch.ones(num_chunks * chunk_tokens, dtype=torch.bool)
    untouched[slot_mapping[kept]] = False
    # Each slot's rows (chunk * chunk_tokens + row) of every layer: the ones not stored are as they were.
    flat = pool_dev.cpu().permute(0, 3, 1, 2, 4, 5).reshape(capacity, layers, -1)
    before = pool.permute(0, 3, 1, 2, 4, 5).reshape(capacity, layers, -1)
    assert torch.equal(flat[untouched], before[untouched])

    # q into a buffer of its own (a piecewise graph's static q): the same values, the same KV,
    # qkv left as it was; the reference alike.
    q_out = torch.full((tokens, heads, head_dim), 7.0, dtype=dtype, device=device)
    qkv_again, pool_again = qkv.to(device, copy=True), pool.to(device, copy=True)
    written = rope_store_kv(qkv_again, cos.to(device), sin.to(device), pool_again, layer, slot_mapping.to(device),
                            heads, *(n.to(device) if n is not None else None for n in norms), q_out=q_out)
    assert written is q_out and torch.equal(q_out, q) and torch.equal(pool_again, pool_dev)
    assert torch.equal(qkv_again.cpu(), qkv)
    ref_out, ref_qkv = torch.empty(tokens, heads, head_dim, dtype=dtype), qkv.clone()
    rope_store_kv_ref(ref_qkv, cos, sin, pool.clone(), layer, slot_mapping, heads, *norms, q_out=ref_out)
    assert torch.equal(ref_out, expected_q) and torch.equal(ref_qkv, qkv)


def test_rope_reference_is_the_model_code():
    """The reference rotates exactly as models/rope.py does (transformers' convention)."""
    rotary = RotaryEmbedding(type("C", (), {"rope_theta": 500000.0})(), 64, 128)
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(5, (4 + 2 * 2) * 64, generator=generator).to(torch.bfloat16)
    positions = torch.tensor([0, 3, 7, 100, 127])
    q_model, k_model = rotary(positions, qkv[:, :256].view(5, 4, 64), qkv[:, 256:384].view(5, 2, 64))
    pool = torch.zeros(1, 1, 2, 8, 2, 64, dtype=torch.bfloat16)
    q = rope_store_kv_ref(qkv.clone(), rotary.cos[positions], rotary.sin[positions], pool, 0,
                          torch.tensor([0, 1, 2, 3, 4]), 4)
    assert torch.equal(q, q_model)
    assert torch.equal(pool[0, 0, 0, :5], k_model)
