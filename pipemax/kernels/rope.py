"""Rotary embedding fused with the KV store: one launch per layer rotates q in place, rotates k
and writes it with v into their slots of the chunked pool; Qwen3's per-head q/k RMSNorm runs in
the same pass.

Interface
    rope_store_kv(qkv, cos, sin, kv_pool, layer, slot_mapping, num_heads,
                  q_norm_weight=None, k_norm_weight=None, eps=1e-6, q_out=None,
                  kv_scales=None, fixed_scales=None) -> q
    qkv           [tokens, (num_heads + 2 * num_kv_heads) * head_dim], rows contiguous: the layer's
                  fused q|k|v projection. Its q part is overwritten with the rotated q.
    cos, sin      [tokens, head_dim] float32: each token's rotary row (attention scaling folded
                  in), gathered once per step for every layer
    kv_pool       [num_chunks, layers, 2, chunk_tokens, num_kv_heads, head_dim]   (written)
    slot_mapping  [tokens] int32/int64, chunk_id * chunk_tokens + row; negative: not stored
    q/k_norm_weight  [head_dim] or None: RMSNorm over each head before the rotation (Qwen3)
    q_out         [tokens, num_heads, head_dim] or None: the rotated q goes here instead (a buffer
                  attention reads, such as a piecewise graph's static q: no copy after), qkv's q
                  part is left as it was
    kv_scales, fixed_scales   an fp8 pool's scales [chunks, layers, 2, chunk_tokens, kv_heads] and a
                  checkpoint's [layers, 2] (kv_store.py): k and v are quantised as they are stored
    returns       q: q_out, or a [tokens, num_heads, head_dim] view of qkv

Rotate-half convention (Llama, Qwen): out = x * cos + rotate_half(x) * sin, with cos and sin cast
to the dtype first and each product rounded to the dtype, as transformers computes it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_index_tensor, check_kv_pool, check_layer, device_guard, next_power_of_2
from .fp8 import check_fixed_scales, check_kv_scales, fp8_constants, is_fp8, quantize, row_scales
from .kv_store import store_kv_ref


@triton.jit
def _rotate_half(x1, x2, c1, c2, s1, s2, dtype: tl.constexpr):
    """(x1, x2) float32 halves [heads, half] -> rotated halves in dtype, each product rounded to
    dtype as transformers computes it (c*, s*: the token's rows [1, half], already in dtype)."""
    out1 = ((x1 * c1).to(dtype).to(tl.float32) + (-x2 * s1).to(dtype).to(tl.float32)).to(dtype)
    out2 = ((x2 * c2).to(dtype).to(tl.float32) + (x1 * s2).to(dtype).to(tl.float32)).to(dtype)
    return out1, out2


@triton.jit
def _head_rms_norm(x1, x2, weight_ptr, half_offsets, mask, eps, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
                   dtype: tl.constexpr):
    """RMSNorm over each head (row) of [heads, half] halves, float32 in and out."""
    mean_square = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / HEAD_DIM
    rstd = tl.math.rsqrt(mean_square + eps)[:, None]
    w1 = tl.load(weight_ptr + half_offsets, mask=mask, other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(weight_ptr + HALF + half_offsets, mask=mask, other=0.0).to(tl.float32)[None, :]
    x1 = (w1 * (x1 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    x2 = (w2 * (x2 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    return x1, x2


@triton.jit(do_not_specialize=["layer"])
def _rope_store_kv_kernel(
    qkv_ptr,
    q_out_ptr,  # the rotated q's destination: qkv_ptr itself (in place), or a [tokens, heads, dim] buffer
    cos_ptr,
    sin_ptr,
    kv_pool_ptr,
    slot_mapping_ptr,
    q_norm_ptr,
    k_norm_ptr,
    kv_scales_ptr,  # [num_chunks, layers, 2, chunk_tokens, num_kv_heads] float32 when KV_FP8
    fixed_scales_ptr,  # [layers, 2] float32 when FIXED_SCALES
    layer,
    eps,
    stride_qkv,
    stride_q_out,
    stride_cos,
    stride_pool_chunk,
    stride_pool_layer,
    stride_pool_kv,
    stride_pool_token,
    stride_pool_head,
    stride_scales_chunk,
    stride_scales_layer,
    stride_scales_kv,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_Q_HEADS: tl.constexpr,
    BLOCK_KV_HEADS: tl.constexpr,
    CHUNK_TOKENS: tl.constexpr,
    HAS_QK_NORM: tl.constexpr,
    KV_FP8: tl.constexpr,  # an fp8 pool: rows quantised, scales stored (fp8.py)
    FIXED_SCALES: tl.constexpr,  # a checkpoint's per-layer scales
    MANTISSA: tl.constexpr,
    MIN_NORMAL_EXP: tl.constexpr,
    FP8_MAX: tl.constexpr,
):
    """One program per token, every head of it at once: the token's cos/sin rows are read once,
    and a step launches `tokens` programs of several warps rather than tokens x heads one-warp
    programs (the per-head grid left prefill's element-wise work latency-bound)."""
    token = tl.program_id(0).to(tl.int64)
    dtype = qkv_ptr.dtype.element_ty
    half_offsets = tl.arange(0, BLOCK_HALF)
    half_mask = half_offsets < HALF
    row = qkv_ptr + token * stride_qkv
    row_cos, row_sin = cos_ptr + token * stride_cos, sin_ptr + token * stride_cos
    c1 = tl.load(row_cos + half_offsets, mask=half_mask, other=0.0).to(dtype).to(tl.float32)[None, :]
    c2 = tl.load(row_cos + HALF + half_offsets, mask=half_mask, other=0.0).to(dtype).to(tl.float32)[None, :]
    s1 = tl.load(row_sin + half_offsets, mask=half_mask, other=0.0).to(dtype).to(tl.float32)[None, :]
    s2 = tl.load(row_sin + HALF + half_offsets, mask=half_mask, other=0.0).to(dtype).to(tl.float32)[None, :]

    q_heads = tl.arange(0, BLOCK_Q_HEADS)
    q_mask = (q_heads < NUM_HEADS)[:, None] & half_mask[None, :]
    q_first = row + q_heads[:, None] * HEAD_DIM + half_offsets[None, :]
    x1 = tl.load(q_first, mask=q_mask, other=0.0).to(tl.float32)
    x2 = tl.load(q_first + HALF, mask=q_mask, other=0.0).to(tl.float32)
    if HAS_QK_NORM:
        x1, x2 = _head_rms_norm(x1, x2, q_norm_ptr, half_offsets, half_mask, eps, HEAD_DIM, HALF, dtype)
    out1, out2 = _rotate_half(x1, x2, c1, c2, s1, s2, dtype)
    q_destination = q_out_ptr + token * stride_q_out + q_heads[:, None] * HEAD_DIM + half_offsets[None, :]
    tl.store(q_destination, out1, mask=q_mask)
    tl.store(q_destination + HALF, out2, mask=q_mask)

    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:
        kv_heads = tl.arange(0, BLOCK_KV_HEADS)
        kv_mask = (kv_heads < NUM_KV_HEADS)[:, None] & half_mask[None, :]
        k_first = row + (NUM_HEADS + kv_heads[:, None]) * HEAD_DIM + half_offsets[None, :]
        k1 = tl.load(k_first, mask=kv_mask, other=0.0).to(tl.float32)  # (new names: a tile of another shape)
        k2 = tl.load(k_first + HALF, mask=kv_mask, other=0.0).to(tl.float32)
        if HAS_QK_NORM:
            k1, k2 = _head_rms_norm(k1, k2, k_norm_ptr, half_offsets, half_mask, eps, HEAD_DIM, HALF, dtype)
        k_out1, k_out2 = _rotate_half(k1, k2, c1, c2, s1, s2, dtype)
        destination = (kv_pool_ptr + (slot // CHUNK_TOKENS) * stride_pool_chunk + layer * stride_pool_layer
                       + (slot % CHUNK_TOKENS) * stride_pool_token + kv_heads[:, None] * stride_pool_head
                       + half_offsets[None, :])
        v_first = k_first + NUM_KV_HEADS * HEAD_DIM
        v1 = tl.load(v_first, mask=kv_mask, other=0.0)
        v2 = tl.load(v_first + HALF, mask=kv_mask, other=0.0)
        if KV_FP8:  # each row quantised with its own scale per head (fp8.py), stored beside it
            scale_row = (kv_scales_ptr + (slot // CHUNK_TOKENS) * stride_scales_chunk + layer * stride_scales_layer
                         + (slot % CHUNK_TOKENS) * NUM_KV_HEADS + kv_heads)
            head_mask = kv_heads < NUM_KV_HEADS
            fixed_k = 0.0
            fixed_v = 0.0
            if FIXED_SCALES:
                fixed_k = tl.load(fixed_scales_ptr + layer * 2)
                fixed_v = tl.load(fixed_scales_ptr + layer * 2 + 1)
            _store_fp8_halves(k_out1.to(tl.float32), k_out2.to(tl.float32), destination, scale_row, kv_mask,
                              head_mask, fixed_k, HALF, MANTISSA, MIN_NORMAL_EXP, FP8_MAX)
            _store_fp8_halves(v1.to(tl.float32), v2.to(tl.float32), destination + stride_pool_kv,
                              scale_row + stride_scales_kv, kv_mask, head_mask, fixed_v, HALF, MANTISSA,
                              MIN_NORMAL_EXP, FP8_MAX)
        else:
            tl.store(destination, k_out1, mask=kv_mask)
            tl.store(destination + HALF, k_out2, mask=kv_mask)
            tl.store(destination + stride_pool_kv, v1, mask=kv_mask)
            tl.store(destination + stride_pool_kv + HALF, v2, mask=kv_mask)


@triton.jit
def _store_fp8_halves(x1, x2, destination, scale_row, mask, head_mask, fixed_scale, HALF: tl.constexpr,
                      MANTISSA: tl.constexpr, MIN_NORMAL_EXP: tl.constexpr, FP8_MAX: tl.constexpr):
    """One token's K or V [heads, half] x 2 (float32) quantised with a scale per head, and the scales."""
    largest = tl.maximum(tl.max(tl.abs(x1), axis=1), tl.max(tl.abs(x2), axis=1))
    scales = row_scales(largest, fixed_scale, FP8_MAX)
    fp8 = destination.dtype.element_ty
    tl.store(destination, quantize(x1, scales[:, None], MANTISSA, MIN_NORMAL_EXP, FP8_MAX).to(fp8), mask=mask)
    tl.store(destination + HALF, quantize(x2, scales[:, None], MANTISSA, MIN_NORMAL_EXP, FP8_MAX).to(fp8), mask=mask)
    tl.store(scale_row, scales, mask=head_mask)


def _check_q_out(q_out, qkv, num_heads: int, head_dim: int) -> None:
    tokens = qkv.shape[0]
    if q_out is not None and (q_out.shape != (tokens, num_heads, head_dim) or q_out.dtype != qkv.dtype
                              or q_out.device != qkv.device or q_out.stride(2) != 1
                              or q_out.stride(1) != head_dim):
        raise ValueError(f"q_out must be [{tokens}, {num_heads}, {head_dim}] {qkv.dtype} on {qkv.device} with "
                         f"contiguous heads, got {tuple(q_out.shape)} {q_out.dtype}")


def _check(qkv, cos, sin, kv_pool, layer, slot_mapping, num_heads, q_norm_weight, k_norm_weight) -> tuple[int, int]:
    check_kv_pool(kv_pool)
    check_layer(layer, kv_pool)
    num_kv_heads, head_dim = kv_pool.shape[4], kv_pool.shape[5]
    width = (num_heads + 2 * num_kv_heads) * head_dim
    if qkv.dim() != 2 or qkv.shape[1] != width or qkv.stride(1) != 1:
        raise ValueError(f"qkv must be [tokens, {width}] with contiguous rows, got {tuple(qkv.shape)}")
    if qkv.device != kv_pool.device or (qkv.dtype != kv_pool.dtype and not is_fp8(kv_pool.dtype)):
        raise TypeError(f"qkv ({qkv.dtype}, {qkv.device}) must match kv_pool ({kv_pool.dtype}, {kv_pool.device})")
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
    tokens = qkv.shape[0]
    for name, table in (("cos", cos), ("sin", sin)):
        if table.shape != (tokens, head_dim) or table.dtype != torch.float32 or table.device != qkv.device:
            raise ValueError(f"{name} must be [{tokens}, {head_dim}] float32 on {qkv.device}, got "
                             f"{tuple(table.shape)} {table.dtype}")
    if cos.stride() != sin.stride() or cos.stride(1) != 1:
        raise ValueError("cos and sin must share a layout with contiguous rows")
    check_index_tensor(slot_mapping, "slot_mapping", 1, qkv.device)
    if slot_mapping.shape[0] != tokens:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries for {tokens} tokens")
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("q_norm_weight and k_norm_weight go together")
    for name, weight in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if weight is not None and (weight.shape != (head_dim,) or weight.dtype != qkv.dtype
                                   or weight.device != qkv.device):
            raise ValueError(f"{name} must be [{head_dim}] {qkv.dtype} on {qkv.device}")
    return num_kv_heads, head_dim


def rope_store_kv(qkv, cos, sin, kv_pool, layer, slot_mapping, num_heads, q_norm_weight=None, k_norm_weight=None,
                  eps: float = 1e-6, q_out: torch.Tensor | None = None, kv_scales: torch.Tensor | None = None,
                  fixed_scales: torch.Tensor | None = None) -> torch.Tensor:
    num_kv_heads, head_dim = _check(qkv, cos, sin, kv_pool, layer, slot_mapping, num_heads, q_norm_weight,
                                    k_norm_weight)
    _check_q_out(q_out, qkv, num_heads, head_dim)
    fp8 = check_kv_scales(kv_pool, kv_scales)
    check_fixed_scales(kv_pool, fixed_scales)
    tokens = qkv.shape[0]
    q = qkv[:, :num_heads * head_dim].view(tokens, num_heads, head_dim) if q_out is None else q_out
    if tokens == 0:
        return q
    half = head_dim // 2
    has_norm = q_norm_weight is not None
    with device_guard(qkv):
        block_half, block_q = next_power_of_2(half), next_power_of_2(num_heads)
        _rope_store_kv_kernel[(tokens,)](
            qkv, qkv if q_out is None else q_out, cos, sin, kv_pool, slot_mapping, q_norm_weight if has_norm else qkv,
            k_norm_weight if has_norm else qkv, kv_scales if fp8 else qkv,
            fixed_scales if fixed_scales is not None else qkv, layer, eps, qkv.stride(0),
            qkv.stride(0) if q_out is None else q_out.stride(0), cos.stride(0),
            kv_pool.stride(0), kv_pool.stride(1), kv_pool.stride(2), kv_pool.stride(3), kv_pool.stride(4),
            *(kv_scales.stride()[:3] if fp8 else (0, 0, 0)),
            NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HALF=half,
            BLOCK_HALF=block_half, BLOCK_Q_HEADS=block_q, BLOCK_KV_HEADS=next_power_of_2(num_kv_heads),
            CHUNK_TOKENS=kv_pool.shape[3], HAS_QK_NORM=has_norm, KV_FP8=fp8, FIXED_SCALES=fixed_scales is not None,
            **(fp8_constants(kv_pool.dtype) if fp8 else {"MANTISSA": 0, "MIN_NORMAL_EXP": 0, "FP8_MAX": 0.0}),
            # a warp per 256 elements of the q tile: 4 warps for 32 heads of 128, 1 for tiny shapes
            num_warps=max(1, min(8, block_q * block_half // 256)),
        )
    return q


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _head_norm(x, weight, eps):
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)


def rope_store_kv_ref(qkv, cos, sin, kv_pool, layer, slot_mapping, num_heads, q_norm_weight=None, k_norm_weight=None,
                      eps: float = 1e-6, q_out: torch.Tensor | None = None, kv_scales: torch.Tensor | None = None,
                      fixed_scales: torch.Tensor | None = None) -> torch.Tensor:
    num_kv_heads, head_dim = _check(qkv, cos, sin, kv_pool, layer, slot_mapping, num_heads, q_norm_weight,
                                    k_norm_weight)
    _check_q_out(q_out, qkv, num_heads, head_dim)
    tokens = qkv.shape[0]
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :q_size].view(tokens, num_heads, head_dim)
    k = qkv[:, q_size:q_size + kv_size].view(tokens, num_kv_heads, head_dim)
    v = qkv[:, q_size + kv_size:].view(tokens, num_kv_heads, head_dim)
    if q_norm_weight is not None:
        q, k = _head_norm(q, q_norm_weight, eps), _head_norm(k, k_norm_weight, eps)
    cos, sin = cos.to(qkv.dtype)[:, None, :], sin.to(qkv.dtype)[:, None, :]
    rotated_q = _rotate(q, cos, sin)
    store_kv_ref(_rotate(k, cos, sin).contiguous(), v.contiguous(), kv_pool, layer, slot_mapping, kv_scales,
                 fixed_scales)
    if q_out is not None:
        q_out.copy_(rotated_q)
        return q_out
    qkv[:, :q_size] = rotated_q.reshape(tokens, q_size)
    return qkv[:, :q_size].view(tokens, num_heads, head_dim)
