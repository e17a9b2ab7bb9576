"""Prefill attention: causal attention for a packed batch of new tokens over chunked KV.

Interface
    prefill_attention(q, kv_pool, layer, chunk_tables, cu_seqlens_q, seq_lens, scale) -> out
    q            [total_new_tokens, num_heads, head_dim]    new tokens of all sequences, packed
    kv_pool      [num_chunks, layers, 2, chunk_tokens, num_kv_heads, head_dim], q's dtype or fp8
                                                            (then kv_scales, as decode_attention's)
    layer        which layer of the pool
    chunk_tables [batch, max_chunks] int32                  chunk ids in position order
    cu_seqlens_q [batch + 1] int32                          sequence b's new tokens are
                                                            q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]
    seq_lens     [batch] int32                              all tokens of sequence b after this step:
                                                            prefix already cached + new tokens
    out          [total_new_tokens, num_heads, head_dim]

The K/V of the new tokens must be stored in the pool first (kv_store). All keys, cached prefix and
new tokens alike, are then read through the chunk table, so one kernel serves a first prefill
(prefix 0), a prompt continued over several scheduling steps (chunked prefill) and a sequence
whose prefix was prefetched from host memory. New token i of sequence b sits at position
seq_lens[b] - q_len_b + i and attends to positions <= its own.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    check_attention_inputs,
    check_block,
    check_index_tensor,
    device_capability,
    device_guard,
    dot_precision,
    needs_upcast,
    next_power_of_2,
    prefill_tiles,
)
from .attention_core import load_kv_tile, online_softmax_step, tile_chunk_ids
from .decode_attention import LOG2_E, gather_sequence_kv
from .fp8 import check_kv_scales, is_fp8, v_weight


@triton.jit(do_not_specialize=["layer", "stride_table_batch"])
def _prefill_attention_kernel(
    q_ptr,  # [total_new_tokens, num_heads, head_dim]
    kv_pool_ptr,  # [num_chunks, layers, 2, chunk_tokens, num_kv_heads, head_dim]
    kv_scales_ptr,  # [num_chunks, layers, 2, chunk_tokens, num_kv_heads] float32 when KV_SCALED (fp8 pool)
    chunk_tables_ptr,  # [batch, max_chunks] int32
    cu_seqlens_q_ptr,  # [batch + 1] int32
    seq_lens_ptr,  # [batch] int32
    out_ptr,  # [total_new_tokens, num_heads, head_dim]
    layer,
    scale_log2,  # softmax scale * log2(e)
    stride_q_token,
    stride_q_head,
    stride_out_token,
    stride_out_head,
    stride_pool_chunk,
    stride_pool_layer,
    stride_pool_kv,
    stride_pool_token,
    stride_pool_head,
    stride_scales_chunk,
    stride_scales_layer,
    stride_scales_kv,
    stride_table_batch,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CHUNK_TOKENS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,  # query heads per KV head
    NUM_KV_HEADS: tl.constexpr,
    KV_SCALED: tl.constexpr,  # an fp8 pool: tiles widen to q's dtype, scales per position (attention_core)
    V_WEIGHT: tl.constexpr,  # fp8: the probabilities' weight in fp16 range (attention_core.online_softmax_step)
    BLOCK_M: tl.constexpr,  # new tokens per program
    BLOCK_N: tl.constexpr,  # key positions per iteration
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # compute in float32: the CPU interpreter cannot do bf16 arithmetic
):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16)
    query_block = tl.program_id(0)
    sequence = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // GROUP_SIZE

    q_start = tl.load(cu_seqlens_q_ptr + sequence)
    q_len = tl.load(cu_seqlens_q_ptr + sequence + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + sequence)
    prefix_len = seq_len - q_len

    rows = query_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < q_len
    query_positions = prefix_len + rows
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    io_mask = row_mask[:, None] & dim_mask[None, :]

    q_offsets = (q_start + rows).to(tl.int64)[:, None] * stride_q_token + head * stride_q_head + dims[None, :]
    q = tl.load(q_ptr + q_offsets, mask=io_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table_row = chunk_tables_ptr + sequence.to(tl.int64) * stride_table_batch

    # Keys past this block's last query are all masked by causality; a block past the sequence's
    # new tokens (the grid is sized for the longest sequence) has no work at all.
    key_end = tl.minimum(seq_len, prefix_len + (query_block + 1) * BLOCK_M)
    key_end = tl.where(query_block * BLOCK_M < q_len, key_end, 0)
    offsets = tl.arange(0, BLOCK_N)
    chunk_ids = tile_chunk_ids(table_row, offsets, offsets < key_end, CHUNK_TOKENS)
    for block_start in range(0, key_end, BLOCK_N):
        positions = block_start + offsets
        position_mask = positions < key_end
        k, v, k_scale, v_scale = load_kv_tile(
            kv_pool_ptr, chunk_ids, positions, position_mask, dims, dim_mask, layer, kv_head,
            stride_pool_chunk, stride_pool_layer, stride_pool_kv, stride_pool_token, stride_pool_head,
            CHUNK_TOKENS, UPCAST, kv_scales_ptr, stride_scales_chunk, stride_scales_layer, stride_scales_kv,
            NUM_KV_HEADS,
            KV_SCALED,
            q_ptr.dtype.element_ty,
        )
        following = positions + BLOCK_N  # the next tile's chunk ids, one tile ahead (see tile_chunk_ids)
        chunk_ids = tile_chunk_ids(table_row, following, following < key_end, CHUNK_TOKENS)
        visible = (positions[None, :] <= query_positions[:, None]) & position_mask[None, :]
        running_max, running_sum, acc = online_softmax_step(
            q, k, v, visible, running_max, running_sum, acc, scale_log2, DOT_PRECISION, k_scale, v_scale, KV_SCALED,
            V_WEIGHT
        )

    safe_sum = tl.where(running_sum > 0, running_sum, 1.0)
    out = acc / safe_sum[:, None]
    out_offsets = (q_start + rows).to(tl.int64)[:, None] * stride_out_token + head * stride_out_head + dims[None, :]
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=io_mask)


def prefill_attention(
    q: torch.Tensor,
    kv_pool: torch.Tensor,
    layer: int,
    chunk_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_q_len: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    out: torch.Tensor | None = None,
    kv_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch prefill attention; see the module docstring. max_q_len (the longest q_len; a smaller
    value leaves rows unwritten) avoids a device sync; tiles default to ones that fit the GPU; out
    (q's shape and dtype, contiguous in head_dim) receives the result, e.g. a slice of the o_proj
    input."""
    chunk_tokens, num_kv_heads, head_dim, num_heads = check_attention_inputs(q, kv_pool, layer, chunk_tables, "tokens")
    kv_scaled = check_kv_scales(kv_pool, kv_scales)
    check_index_tensor(cu_seqlens_q, "cu_seqlens_q", 1, q.device)
    check_index_tensor(seq_lens, "seq_lens", 1, q.device)
    batch = seq_lens.shape[0]
    if cu_seqlens_q.shape[0] != batch + 1 or chunk_tables.shape[0] != batch:
        raise ValueError(f"cu_seqlens_q needs {batch + 1} entries and chunk_tables {batch} rows")
    tiles = prefill_tiles(head_dim, q.dtype, device_capability(q.device), kv_fp8=is_fp8(kv_pool.dtype))
    block_m, block_n = block_m or tiles["block_m"], block_n or tiles["block_n"]
    check_block("block_m", block_m)
    check_block("block_n", block_n)

    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(2) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device}, contiguous in head_dim")
    if batch == 0 or q.shape[0] == 0:
        return out
    if max_q_len is None:
        max_q_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    grid = (triton.cdiv(max_q_len, block_m), batch, num_heads)
    with device_guard(q):
        _prefill_attention_kernel[grid](
            q, kv_pool, kv_scales if kv_scaled else q, chunk_tables, cu_seqlens_q, seq_lens, out,
            layer, scale * LOG2_E,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            kv_pool.stride(0), kv_pool.stride(1), kv_pool.stride(2), kv_pool.stride(3), kv_pool.stride(4),
            *(kv_scales.stride()[:3] if kv_scaled else (0, 0, 0)),
            chunk_tables.stride(0),
            HEAD_DIM=head_dim, BLOCK_D=max(16, next_power_of_2(head_dim)), CHUNK_TOKENS=chunk_tokens,
            GROUP_SIZE=num_heads // num_kv_heads, NUM_KV_HEADS=num_kv_heads, KV_SCALED=kv_scaled,
            V_WEIGHT=v_weight(kv_pool.dtype), BLOCK_M=block_m, BLOCK_N=block_n,
            DOT_PRECISION=dot_precision(q.dtype), UPCAST=needs_upcast(q.dtype), num_stages=tiles["num_stages"],
            num_warps=tiles["num_warps"],
        )
    return out


def prefill_attention_ref(q, kv_pool, layer, chunk_tables, cu_seqlens_q, seq_lens, scale,
                          kv_scales=None) -> torch.Tensor:
    """Pure-torch causal prefill attention over chunked KV, in float32, one sequence at a time (an
    fp8 pool dequantised first)."""
    check_kv_scales(kv_pool, kv_scales)
    num_heads, num_kv_heads = q.shape[1], kv_pool.shape[4]
    out = torch.empty_like(q)
    for sequence in range(seq_lens.shape[0]):
        start, end = int(cu_seqlens_q[sequence]), int(cu_seqlens_q[sequence + 1])
        seq_len = int(seq_lens[sequence])
        if end == start:
            continue
        k, v = gather_sequence_kv(kv_pool, layer, chunk_tables[sequence], seq_len, kv_scales)
        k = k.float().repeat_interleave(num_heads // num_kv_heads, dim=1)  # [seq_len, heads, dim]
        v = v.float().repeat_interleave(num_heads // num_kv_heads, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[start:end].float(), k) * scale
        query_positions = torch.arange(seq_len - (end - start), seq_len, device=q.device)
        hidden = torch.arange(seq_len, device=q.device)[None, :] > query_positions[:, None]
        scores.masked_fill_(hidden, float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v).to(q.dtype)
    return out
