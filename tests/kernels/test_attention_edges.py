"""Attention launcher edge cases: default tiles, stale bounds, padding rows, pools past 2^31
elements, narrow chunk tables."""

import pytest
import torch

from pipemax.kernels import (
    copy_chunks,
    copy_rows,
    decode_attention,
    decode_attention_ref,
    prefill_attention,
    prefill_attention_ref,
    store_kv,
)
from tests.helpers import assert_close, random_chunk_tables


def decode_inputs(device, seq_lens, chunk_tokens=16, head_dim=64, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    num_chunks, tables = random_chunk_tables(generator, seq_lens, chunk_tokens)
    pool = torch.randn(num_chunks, 1, 2, chunk_tokens, 2, head_dim, generator=generator).to(dtype)
    q = torch.randn(len(seq_lens), 8, head_dim, generator=generator).to(dtype)
    return q, pool, tables, torch.tensor(seq_lens, dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_tiles_match_reference(device, dtype):
    q, pool, tables, lens = decode_inputs(device, [1, 70, 200], dtype=dtype, head_dim=128)
    expected = decode_attention_ref(q, pool, 0, tables, lens, 0.1)
    actual = decode_attention(q.to(device), pool.to(device), 0, tables.to(device), lens.to(device), 0.1, num_splits=3)
    assert_close(actual, expected)
    cu = torch.tensor([0, 1, 71, 271], dtype=torch.int32)
    qp = torch.randn(271, 8, 128).to(dtype)
    expected = prefill_attention_ref(qp, pool, 0, tables, cu, lens, 0.1)
    actual = prefill_attention(qp.to(device), pool.to(device), 0, tables.to(device), cu.to(device), lens.to(device), 0.1)
    assert_close(actual, expected)


def test_stale_max_seq_len_costs_speed_not_keys(device):
    q, pool, tables, lens = decode_inputs(device, [90, 40])
    expected = decode_attention_ref(q, pool, 0, tables, lens, 0.1)
    actual = decode_attention(q.to(device), pool.to(device), 0, tables.to(device), lens.to(device), 0.1,
                              num_splits=3, max_seq_len=20, block_n=16)
    assert_close(actual, expected)


def test_padding_row_of_length_zero_gives_zeros_not_nan(device):
    q, pool, tables, _ = decode_inputs(device, [30, 10])
    lens = torch.tensor([30, 0], dtype=torch.int32)
    out = decode_attention(q.to(device), pool.to(device), 0, tables.to(device), lens.to(device), 0.1,
                           num_splits=2, max_seq_len=30, block_n=16).cpu()
    assert not out.isnan().any() and torch.equal(out[1], torch.zeros_like(out[1]))


def test_chunk_table_narrower_than_max_seq_len_is_rejected():
    q, pool, tables, lens = decode_inputs("cpu", [30])
    with pytest.raises(ValueError, match="fewer than max_seq_len 64"):
        decode_attention(q, pool, 0, tables, lens, 0.1, max_seq_len=64)


def test_pool_larger_than_int32_indexing(device):
    """70,000 chunks of 32,768 fp16 elements: offsets past 2^31 must be computed in int64. Only
    the touched chunks are ever written, so the pool costs virtual memory only (on CPU)."""
    if device.type == "cuda" and torch.cuda.get_device_properties(0).total_memory < 8 * 2**30:
        pytest.skip("needs 5 GiB of GPU memory")
    num_chunks = 70_000
    pool = torch.empty(num_chunks, 1, 2, 16, 8, 128, dtype=torch.float16, device=device)
    assert pool.numel() > 2**31
    ids = [num_chunks - 1, num_chunks - 3, 5]
    generator = torch.Generator().manual_seed(0)
    for chunk in ids:
        pool[chunk] = torch.randn(1, 2, 16, 8, 128, generator=generator).half().to(device)
    table = torch.tensor([ids], dtype=torch.int32, device=device)
    lens = torch.tensor([40], dtype=torch.int32, device=device)
    q = torch.randn(1, 32, 128, generator=generator).half().to(device)
    expected = decode_attention_ref(q.cpu(), pool[ids].cpu(), 0, torch.tensor([[0, 1, 2]], dtype=torch.int32), lens.cpu(), 0.08)
    assert_close(decode_attention(q, pool, 0, table, lens, 0.08, block_n=16), expected)

    k = torch.randn(2, 8, 128, generator=generator).half().to(device)
    slots = torch.tensor([(num_chunks - 2) * 16 + 3, (num_chunks - 2) * 16 + 15], device=device)
    store_kv(k, k, pool, 0, slots)
    assert torch.equal(pool[num_chunks - 2, 0, 1, 3], k[0]) and torch.equal(pool[num_chunks - 2, 0, 0, 15], k[1])
    last = torch.tensor([num_chunks - 1], dtype=torch.int32, device=device)
    target = torch.tensor([num_chunks - 4], dtype=torch.int32, device=device)
    copy_chunks(pool, pool, last, target)
    assert torch.equal(pool[num_chunks - 4], pool[num_chunks - 1])
    pool[num_chunks - 5, :, :, 3] = torch.randn(1, 2, 8, 128, generator=generator).half().to(device)
    copy_rows(pool, pool, target - 1, target + 2, torch.tensor([3], dtype=torch.int32, device=device), 0, 1)
    assert torch.equal(pool[num_chunks - 2, :, :, 3], pool[num_chunks - 5, :, :, 3])
