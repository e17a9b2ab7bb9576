"""KV store: write the K and V of new tokens into their slots of the chunked pool at one layer.

Interface
    store_kv(k, v, kv_pool, layer, slot_mapping, kv_scales=None, fixed_scales=None)
    k, v          [num_tokens, num_kv_heads, head_dim], the pool's dtype (fp8 pool: the model's
                  dtype); contiguous per token
    kv_pool       [num_chunks, layers, 2, chunk_tokens, num_kv_heads, head_dim]   (written in place)
    layer         which layer of the pool
    slot_mapping  [num_tokens] int32/int64: chunk_id * chunk_tokens + row within the chunk;
                  a negative slot skips the token (padding of a captured batch shape)
    kv_scales     fp8 pools only: [num_chunks, layers, 2, chunk_tokens, num_kv_heads] float32
                  (fp8.py): each stored row's scale per KV head is written here
    fixed_scales  fp8 only, optional: [layers, 2] float32, a checkpoint's k_scale / v_scale per
                  layer; where > 0 it is the scale of every row at that layer

One token's K (or V) at one layer is num_kv_heads * head_dim contiguous elements of the pool, so
each program writes a contiguous row: a copy of it, or (fp8) its quantised values with the row's
scale per head (largest magnitude / FP8_MAX).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    SUPPORTED_DTYPES,
    bit_view,
    check_index_tensor,
    check_kv_pool,
    check_layer,
    copy_warps,
    device_guard,
    next_power_of_2,
)
from .fp8 import (check_fixed_scales, check_kv_scales, fp8_constants, is_fp8, quantize, quantize_ref, row_scales,
                  row_scales_ref)


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


@triton.jit(do_not_specialize=["layer"])
def _store_kv_fp8_kernel(
    k_ptr,  # [num_tokens, num_kv_heads, head_dim], the model's dtype
    v_ptr,  # [num_tokens, num_kv_heads, head_dim]
    kv_pool_ptr,  # [num_chunks, layers, 2, chunk_tokens, num_kv_heads, head_dim] fp8
    kv_scales_ptr,  # [num_chunks, layers, 2, chunk_tokens, num_kv_heads] float32
    fixed_scales_ptr,  # [layers, 2] float32 when FIXED
    slot_mapping_ptr,  # [num_tokens]
    layer,
    stride_k_token,
    stride_v_token,
    stride_pool_chunk,
    stride_pool_layer,
    stride_pool_kv,
    stride_pool_token,
    stride_scales_chunk,
    stride_scales_layer,
    stride_scales_kv,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CHUNK_TOKENS: tl.constexpr,
    FIXED: tl.constexpr,
    MANTISSA: tl.constexpr,
    MIN_NORMAL_EXP: tl.constexpr,
    FP8_MAX: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    head_mask = (heads < NUM_KV_HEADS) & (slot >= 0)
    mask = head_mask[:, None] & (tl.arange(0, BLOCK_D) < HEAD_DIM)[None, :]
    offsets = heads[:, None] * HEAD_DIM + tl.arange(0, BLOCK_D)[None, :]
    chunk, row = slot // CHUNK_TOKENS, slot % CHUNK_TOKENS
    pool_row = kv_pool_ptr + chunk * stride_pool_chunk + layer * stride_pool_layer + row * stride_pool_token
    # the scales' row: [..., chunk_tokens, num_kv_heads] (heads innermost)
    scale_row = kv_scales_ptr + chunk * stride_scales_chunk + layer * stride_scales_layer + row * NUM_KV_HEADS
    fixed_k = 0.0
    fixed_v = 0.0
    if FIXED:
        fixed_k = tl.load(fixed_scales_ptr + layer * 2)
        fixed_v = tl.load(fixed_scales_ptr + layer * 2 + 1)
    k = tl.load(k_ptr + token * stride_k_token + offsets, mask=mask, other=0.0).to(tl.float32)
    k_scales = row_scales(tl.max(tl.abs(k), axis=1), fixed_k, FP8_MAX)
    tl.store(pool_row + offsets, quantize(k, k_scales[:, None], MANTISSA, MIN_NORMAL_EXP, FP8_MAX).to(
        kv_pool_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_row + heads, k_scales, mask=head_mask)
    v = tl.load(v_ptr + token * stride_v_token + offsets, mask=mask, other=0.0).to(tl.float32)
    v_scales = row_scales(tl.max(tl.abs(v), axis=1), fixed_v, FP8_MAX)
    tl.store(pool_row + stride_pool_kv + offsets, quantize(v, v_scales[:, None], MANTISSA, MIN_NORMAL_EXP,
                                                           FP8_MAX).to(kv_pool_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_row + stride_scales_kv + heads, v_scales, mask=head_mask)


def _check_new_kv(tensor: torch.Tensor, name: str, kv_pool: torch.Tensor) -> None:
    expected = tuple(kv_pool.shape[4:])
    if tensor.dim() != 3 or tuple(tensor.shape[1:]) != expected:
        raise ValueError(f"{name} must be [num_tokens, {expected[0]}, {expected[1]}], got {tuple(tensor.shape)}")
    if tensor.device != kv_pool.device or (tensor.dtype != kv_pool.dtype and not is_fp8(kv_pool.dtype)):
        raise TypeError(f"{name} ({tensor.dtype}, {tensor.device}) must match kv_pool ({kv_pool.dtype}, {kv_pool.device})")
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be one of {SUPPORTED_DTYPES}, got {tensor.dtype}")
    if tensor.stride(2) != 1 or tensor.stride(1) != tensor.shape[2]:
        raise ValueError(f"{name} must be contiguous within each token (heads x head_dim)")


def check_store_args(k, v, kv_pool, layer, slot_mapping, kv_scales, fixed_scales) -> bool:
    """Checks shared by store_kv and its reference; returns whether the pool is fp8."""
    check_kv_pool(kv_pool)
    check_layer(layer, kv_pool)
    _check_new_kv(k, "k", kv_pool)
    _check_new_kv(v, "v", kv_pool)
    check_index_tensor(slot_mapping, "slot_mapping", 1, kv_pool.device)
    if v.shape[0] != k.shape[0] or slot_mapping.shape[0] != k.shape[0]:
        raise ValueError("k, v and slot_mapping must have the same number of tokens")
    fp8 = check_kv_scales(kv_pool, kv_scales)
    check_fixed_scales(kv_pool, fixed_scales)
    return fp8


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_pool: torch.Tensor, layer: int, slot_mapping: torch.Tensor,
             kv_scales: torch.Tensor | None = None, fixed_scales: torch.Tensor | None = None) -> None:
    fp8 = check_store_args(k, v, kv_pool, layer, slot_mapping, kv_scales, fixed_scales)
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    if fp8:
        num_kv_heads, head_dim = kv_pool.shape[4], kv_pool.shape[5]
        with device_guard(kv_pool):
            _store_kv_fp8_kernel[(num_tokens,)](
                k, v, kv_pool, kv_scales, kv_scales if fixed_scales is None else fixed_scales, slot_mapping, layer,
                k.stride(0), v.stride(0),
                kv_pool.stride(0), kv_pool.stride(1), kv_pool.stride(2), kv_pool.stride(3),
                kv_scales.stride(0), kv_scales.stride(1), kv_scales.stride(2),
                NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_H=next_power_of_2(num_kv_heads),
                BLOCK_D=next_power_of_2(head_dim), CHUNK_TOKENS=kv_pool.shape[3], FIXED=fixed_scales is not None,
                **fp8_constants(kv_pool.dtype),
                num_warps=max(1, min(8, next_power_of_2(num_kv_heads) * next_power_of_2(head_dim) // 256)),
            )
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


def store_kv_ref(k, v, kv_pool, layer, slot_mapping, kv_scales=None, fixed_scales=None) -> None:
    fp8 = check_store_args(k, v, kv_pool, layer, slot_mapping, kv_scales, fixed_scales)
    chunk_tokens = kv_pool.shape[3]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    chunks, rows = slots // chunk_tokens, slots % chunk_tokens
    for kv, new_rows in ((0, k[keep]), (1, v[keep])):
        if not fp8:
            kv_pool[chunks, layer, kv, rows] = new_rows
            continue
        fixed = float(fixed_scales[layer, kv]) if fixed_scales is not None else 0.0
        scales = row_scales_ref(new_rows.float().abs().amax(dim=2), fixed, kv_pool.dtype)  # [tokens, heads]
        kv_pool[chunks, layer, kv, rows] = quantize_ref(new_rows, scales[:, :, None], kv_pool.dtype)
        kv_scales[chunks, layer, kv, rows] = scales
