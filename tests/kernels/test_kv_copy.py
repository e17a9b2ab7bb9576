"""Chunk and row copies, checked bit for bit in every direction."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pipemax.kernels import copy_chunks, copy_chunks_ref, copy_rows, copy_rows_ref
from tests.helpers import DTYPES

DIRECTIONS = ["host_to_gpu", "gpu_to_host", "gpu_to_gpu"]


def make_pools(direction, device, shape_src, shape_dst, dtype, generator):
    """Source and destination pools as the engine has them: host pools pinned when on CUDA."""
    pin = device.type == "cuda"

    def pool(shape, on_host):
        tensor = torch.randn(*shape, generator=generator).to(dtype)
        if on_host:
            return tensor.pin_memory() if pin else tensor
        return tensor.to(device)

    src_on_host = direction == "host_to_gpu"
    dst_on_host = direction == "gpu_to_host"
    return pool(shape_src, src_on_host), pool(shape_dst, dst_on_host)


@pytest.mark.parametrize("direction", DIRECTIONS)
@given(
    chunk_tokens=st.sampled_from([8, 16, 128]),
    num_layers=st.integers(1, 3),
    num_kv_heads=st.sampled_from([1, 2]),
    head_dim=st.sampled_from([64, 80, 96, 128]),
    dtype=st.sampled_from(DTYPES),
    data=st.data(),
)
def test_copy_chunks_exact(device, direction, chunk_tokens, num_layers, num_kv_heads, head_dim, dtype, data):
    src_chunks, dst_chunks = data.draw(st.integers(1, 8)), data.draw(st.integers(1, 8))
    count = data.draw(st.integers(0, min(src_chunks, dst_chunks)))
    src_ids = data.draw(st.lists(st.integers(0, src_chunks - 1), min_size=count, max_size=count))
    dst_ids = data.draw(st.lists(st.integers(0, dst_chunks - 1), min_size=count, max_size=count, unique=True))
    generator = torch.Generator().manual_seed(count)
    chunk = (num_layers, 2, chunk_tokens, num_kv_heads, head_dim)
    src, dst = make_pools(direction, device, (src_chunks, *chunk), (dst_chunks, *chunk), dtype, generator)
    expected = dst.cpu().clone()
    copy_chunks_ref(src.cpu(), expected, torch.tensor(src_ids, dtype=torch.int64), torch.tensor(dst_ids, dtype=torch.int64))
    ids = lambda values: torch.tensor(values, dtype=torch.int32, device=device)  # noqa: E731
    copy_chunks(src, dst, ids(src_ids), ids(dst_ids))
    if device.type == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(dst.cpu(), expected)


@pytest.mark.parametrize("direction", DIRECTIONS)
@given(
    chunk_tokens=st.sampled_from([8, 32]),
    num_layers=st.integers(1, 4),
    num_kv_heads=st.sampled_from([1, 2, 8]),
    head_dim=st.sampled_from([64, 80, 128]),
    dtype=st.sampled_from(DTYPES),
    data=st.data(),
)
def test_copy_rows_exact(device, direction, chunk_tokens, num_layers, num_kv_heads, head_dim, dtype, data):
    num_chunks = data.draw(st.integers(1, 5))
    count = data.draw(st.integers(0, 12))
    # Distinct (chunk, row) destinations: a write-back never writes one row twice.
    targets = data.draw(st.lists(st.tuples(st.integers(0, num_chunks - 1), st.integers(0, chunk_tokens - 1)),
                                 min_size=count, max_size=count, unique=True))
    src_ids = data.draw(st.lists(st.integers(0, num_chunks - 1), min_size=len(targets), max_size=len(targets)))
    layer_start = data.draw(st.integers(0, num_layers - 1))
    layer_count = data.draw(st.integers(0, num_layers - layer_start))
    generator = torch.Generator().manual_seed(len(targets))
    shape = (num_chunks, num_layers, 2, chunk_tokens, num_kv_heads, head_dim)
    src, dst = make_pools(direction, device, shape, shape, dtype, generator)
    dst_ids = [chunk for chunk, _ in targets]
    rows = [row for _, row in targets]
    expected = dst.cpu().clone()
    as_long = lambda values: torch.tensor(values, dtype=torch.int64)  # noqa: E731
    copy_rows_ref(src.cpu(), expected, as_long(src_ids), as_long(dst_ids), as_long(rows), layer_start, layer_count)
    ids = lambda values: torch.tensor(values, dtype=torch.int32, device=device)  # noqa: E731
    copy_rows(src, dst, ids(src_ids), ids(dst_ids), ids(rows), layer_start, layer_count)
    if device.type == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(dst.cpu(), expected)


def test_copy_preserves_every_bit_pattern(device):
    """NaN payloads, infinities and negative zero survive: copies move bits, not values."""
    bits = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16)[: 4 * 2 * 8 * 1 * 64 * 16]
    src = bits.view(torch.bfloat16).reshape(16, 4, 2, 8, 1, 64).to(device)
    dst = torch.zeros_like(src)
    ids = torch.arange(16, dtype=torch.int32, device=device)
    copy_chunks(src, dst, ids, ids.flip(0))
    assert torch.equal(dst.view(torch.int16).cpu(), src.view(torch.int16).flip(0).cpu())


def test_copy_rejects_mismatched_chunk_shapes():
    src = torch.zeros(2, 1, 2, 8, 1, 64)
    dst = torch.zeros(2, 1, 2, 16, 1, 64)
    ids = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="differ in chunk shape"):
        copy_chunks(src, dst, ids, ids)


def test_copy_rows_rejects_layers_outside_pool():
    pool = torch.zeros(2, 2, 2, 8, 1, 64)
    ids = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(IndexError, match="outside the pool"):
        copy_rows(pool, pool.clone(), ids, ids, ids, 1, 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_gpu_kernel_refuses_pageable_host_memory():
    gpu = torch.zeros(2, 1, 2, 8, 1, 64, device="cuda")
    pageable = torch.zeros(2, 1, 2, 8, 1, 64)
    ids = torch.zeros(1, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="pinned"):
        copy_chunks(pageable, gpu, ids, ids)
