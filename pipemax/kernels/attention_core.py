"""Triton helpers shared by decode and prefill attention: reading K/V tiles through a chunk table,
and one step of the online softmax.

Positions map to the chunked pool through the sequence's chunk table:
    chunk = chunk_table[position // CHUNK_TOKENS], row = position % CHUNK_TOKENS.
A tile may span several chunks (BLOCK_N need not equal CHUNK_TOKENS), so tiles keep the sizes
tensor cores need (>= 16) even with 8-token chunks.
"""

import triton
import triton.language as tl


@triton.jit
def tile_chunk_ids(chunk_table_row_ptr, positions, position_mask, CHUNK_TOKENS: tl.constexpr):
    """The chunk id of each position of a tile (0 where masked).

    The attention loops look these up one tile ahead and carry them in registers: a tile's K/V
    addresses then depend on no load of its own iteration, so the software pipeliner keeps
    num_stages - 1 tiles of K/V in flight (cp.async.wait_group num_stages - 1 in the loop,
    checked in the compiled code by tests/kernels/aot_compile.py). Looked up inside the
    iteration, the ids became async copies themselves and the loop waited for every copy
    (wait_group 0) at its top: one buffer in effect."""
    return tl.load(chunk_table_row_ptr + positions // CHUNK_TOKENS, mask=position_mask, other=0)


@triton.jit
def load_kv_tile(
    kv_pool_ptr,  # [num_chunks, layers, 2, chunk_tokens, num_kv_heads, head_dim]
    chunk_ids,  # [BLOCK_N] the chunk of each position (tile_chunk_ids)
    positions,  # [BLOCK_N]
    position_mask,  # [BLOCK_N]
    dims,  # [BLOCK_D]
    dim_mask,  # [BLOCK_D]
    layer,
    kv_head,
    stride_pool_chunk,
    stride_pool_layer,
    stride_pool_kv,
    stride_pool_token,
    stride_pool_head,
    CHUNK_TOKENS: tl.constexpr,
    UPCAST: tl.constexpr,  # float32 tiles: the CPU interpreter cannot do bf16 arithmetic
):
    """K and V tiles [BLOCK_N, BLOCK_D] of one KV head; masked positions read as zeros."""
    # int64 for the chunk term: a pool of a few GiB has more elements than int32 can index. The
    # other terms stay inside one chunk, which always fits int32.
    rows = (chunk_ids.to(tl.int64) * stride_pool_chunk + layer * stride_pool_layer
            + (positions % CHUNK_TOKENS) * stride_pool_token + kv_head * stride_pool_head)
    tile_mask = position_mask[:, None] & dim_mask[None, :]
    k = tl.load(kv_pool_ptr + rows[:, None] + dims[None, :], mask=tile_mask, other=0.0)
    v = tl.load(kv_pool_ptr + rows[:, None] + stride_pool_kv + dims[None, :], mask=tile_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def online_softmax_step(q, k, v, visible, running_max, running_sum, acc, scale_log2, DOT_PRECISION: tl.constexpr):
    """Fold one K/V tile into the running (max, sum, weighted V) of each query row, base 2.

    visible [rows, BLOCK_N] masks keys out of range or hidden by causality."""
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    scores = tl.where(visible, scores, float("-inf"))
    new_max = tl.maximum(running_max, tl.max(scores, axis=1))
    # A row that has seen no visible key yet keeps a finite max, so exp2 gives 0, not NaN.
    new_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    probs = tl.exp2(scores - new_max[:, None])
    rescale = tl.exp2(running_max - new_max)
    running_sum = running_sum * rescale + tl.sum(probs, axis=1)
    acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION)
    return new_max, running_sum, acc
