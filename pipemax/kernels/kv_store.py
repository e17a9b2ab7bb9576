"""KV store: write the K and V of new tokens into their slots of the chunked pool at one layer.

Interface
    store_kv(k, v, kv_pool, layer, slot_mapping)
    k, v          [num_tokens, num_kv_heads, head_dim], the pool's dtype; contiguous per token
    kv_pool       [num_chunks, layers, 2, chunk_tokens, num_kv_heads, head_dim]   (written in place)
    layer         which layer of the pool
    slot_mapping  [num_tokens] int32/int64: chunk_id * chunk_tokens + row within the chunk;
                  a negative slot skips the token (padding of a captured batch shape)

One token's K (or V) at one layer is num_kv_heads * head_dim contiguous elements of the pool, so
each program copies a contiguous row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import bit_view, check_index_tensor, copy_warps, device_guard, check_kv_pool, check_layer, next_power_of_2


@triton.jit(do_not_specialize=["layer"])
def _store_kv_kernel(
    k_ptr,  # [num_tokens, num_kv_heads, head_dim]
    v_ptr,  # [num_tokens, num_kv_heads, head_dim]
    kv_pool_ptr,  # [num_chunks, layers, 2, chunk_tokens, num_kv_heads, head_dim]
    slot_mapping_ptr,  # [num_tokens]
    layer,
    stride_k_token,
    stride_v_token,
    stride_pool_chunk,
    stride_pool_layer,
    stride_pool_kv,
    stride_pool_token,
    ROW_ELEMENTS: tl.constexpr,  # num_kv_heads * head_dim
    CHUNK_TOKENS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0)
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    mask = (offsets < ROW_ELEMENTS) & (slot >= 0)
    chunk = slot // CHUNK_TOKENS
    row = slot % CHUNK_TOKENS
    destination = chunk * stride_pool_chunk + layer * stride_pool_layer + row * stride_pool_token + offsets
    k = tl.load(k_ptr + token.to(tl.int64) * stride_k_token + offsets, mask=mask)
    v = tl.load(v_ptr + token.to(tl.int64) * stride_v_token + offsets, mask=mask)
    tl.store(kv_pool_ptr + destination, k, mask=mask)
    tl.store(kv_pool_ptr + destination + stride_pool_kv, v, mask=mask)


def _check_new_kv(tensor: torch.Tensor, name: str, kv_pool: torch.Tensor) -> None:
    expected = tuple(kv_pool.shape[4:])
    if tensor.dim() != 3 or tuple(tensor.shape[1:]) != expected:
        raise ValueError(f"{name} must be [num_tokens, {expected[0]}, {expected[1]}], got {tuple(tensor.shape)}")
    if tensor.dtype != kv_pool.dtype or tensor.device != kv_pool.device:
        raise TypeError(f"{name} ({tensor.dtype}, {tensor.device}) must match kv_pool ({kv_pool.dtype}, {kv_pool.device})")
    if tensor.stride(2) != 1 or tensor.stride(1) != tensor.shape[2]:
        raise ValueError(f"{name} must be contiguous within each token (heads x head_dim)")


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_pool: torch.Tensor, layer: int, slot_mapping: torch.Tensor) -> None:
    check_kv_pool(kv_pool)
    check_layer(layer, kv_pool)
    _check_new_kv(k, "k", kv_pool)
    _check_new_kv(v, "v", kv_pool)
    check_index_tensor(slot_mapping, "slot_mapping", 1, kv_pool.device)
    num_tokens = k.shape[0]
    if v.shape[0] != num_tokens or slot_mapping.shape[0] != num_tokens:
        raise ValueError("k, v and slot_mapping must have the same number of tokens")
    if num_tokens == 0:
        return
    row_elements = kv_pool.shape[4] * kv_pool.shape[5]
    block = min(1024, next_power_of_2(row_elements))
    # Stores move bits: integer views keep the copy exact for every dtype, bf16 on the interpreter too.
    with device_guard(kv_pool):
        _store_kv_kernel[(num_tokens, triton.cdiv(row_elements, block))](
            bit_view(k), bit_view(v), bit_view(kv_pool), slot_mapping, layer,
            k.stride(0), v.stride(0),
            kv_pool.stride(0), kv_pool.stride(1), kv_pool.stride(2), kv_pool.stride(3),
            ROW_ELEMENTS=row_elements, CHUNK_TOKENS=kv_pool.shape[3], BLOCK=block, num_warps=copy_warps(block),
        )


def store_kv_ref(k, v, kv_pool, layer, slot_mapping) -> None:
    chunk_tokens = kv_pool.shape[3]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    chunks, rows = slots // chunk_tokens, slots % chunk_tokens
    kv_pool[chunks, layer, 0, rows] = k[keep]
    kv_pool[chunks, layer, 1, rows] = v[keep]
