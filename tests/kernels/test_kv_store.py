import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pipemax.kernels import store_kv, store_kv_ref
from tests.helpers import DTYPES


@given(
    chunk_tokens=st.sampled_from([8, 16, 64]),
    num_chunks=st.integers(1, 6),
    num_kv_heads=st.sampled_from([1, 2, 8]),
    head_dim=st.sampled_from([64, 80, 96, 128]),
    num_layers=st.integers(1, 3),
    dtype=st.sampled_from(DTYPES),
    data=st.data(),
)
def test_store_kv_matches_reference_exactly(device, chunk_tokens, num_chunks, num_kv_heads, head_dim, num_layers, dtype, data):
    capacity = num_chunks * chunk_tokens
    # Distinct slots (a step never writes one slot twice), some skipped with -1 (padding).
    slots = data.draw(st.lists(st.integers(0, capacity - 1), min_size=1, max_size=min(capacity, 20), unique=True))
    slots = [slot if keep else -1 for slot, keep in zip(slots, data.draw(st.lists(st.booleans(), min_size=len(slots), max_size=len(slots))))]
    layer = data.draw(st.integers(0, num_layers - 1))
    generator = torch.Generator().manual_seed(len(slots))
    pool = torch.randn(num_chunks, num_layers, 2, chunk_tokens, num_kv_heads, head_dim, generator=generator).to(dtype)
    k = torch.randn(len(slots), num_kv_heads, head_dim, generator=generator).to(dtype)
    v = torch.randn(len(slots), num_kv_heads, head_dim, generator=generator).to(dtype)
    slot_mapping = torch.tensor(slots, dtype=torch.int64)

    expected = pool.clone()
    store_kv_ref(k, v, expected, layer, slot_mapping)
    actual = pool.to(device)
    store_kv(k.to(device), v.to(device), actual, layer, slot_mapping.to(device))
    assert torch.equal(actual.cpu(), expected)


def test_store_kv_accepts_a_view_of_a_fused_projection(device):
    """k and v straight out of a fused qkv output: strided per token, contiguous within it."""
    qkv = torch.randn(5, (4 + 2 + 2) * 64).to(device)
    k = qkv[:, 4 * 64:6 * 64].view(5, 2, 64)
    v = qkv[:, 6 * 64:].view(5, 2, 64)
    pool = torch.zeros(2, 1, 2, 8, 2, 64, device=device)
    slots = torch.tensor([0, 1, 2, 9, 15], device=device)
    store_kv(k, v, pool, 0, slots)
    expected = torch.zeros(2, 1, 2, 8, 2, 64)
    store_kv_ref(k.cpu(), v.cpu(), expected, 0, slots.cpu())
    assert torch.equal(pool.cpu(), expected)


def test_store_kv_rejects_dtype_mismatch():
    pool = torch.zeros(2, 1, 2, 8, 1, 64)
    k = torch.zeros(1, 1, 64, dtype=torch.float16)
    with pytest.raises(TypeError, match="must match kv_pool"):
        store_kv(k, k, pool, 0, torch.zeros(1, dtype=torch.int32))
