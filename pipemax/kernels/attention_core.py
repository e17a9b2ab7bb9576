"""Triton helpers shared by decode and prefill attention: reading K/V tiles through a chunk table,
and one step of the online softmax.

Positions map to the chunked pool through the sequence's chunk table:
    chunk = chunk_table[position // CHUNK_TOKENS], row = position % CHUNK_TOKENS.
A tile may span several chunks (BLOCK_N need not equal CHUNK_TOKENS), so tiles keep the sizes
tensor cores need (>= 16) even with 8-token chunks.

fp8 pools (fp8.py): a tile is loaded as fp8 (half the bytes of bf16 from HBM), widened in registers
to the compute dtype (exact: every e4m3 and e5m2 value is a bf16 and an fp16 value), and its
per-position scales (one per row and KV head) multiply the scores (K) and the probabilities (V):
the tile itself is never multiplied element by element.
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
    kv_scales_ptr,  # [num_chunks, layers, 2, chunk_tokens, num_kv_heads] float32 when KV_SCALED
    stride_scales_chunk,
    stride_scales_layer,
    stride_scales_kv,
    NUM_KV_HEADS: tl.constexpr,
    KV_SCALED: tl.constexpr,  # an fp8 pool
    compute_dtype: tl.constexpr,  # what fp8 tiles widen to: q's dtype
):
    """K and V tiles [BLOCK_N, BLOCK_D] of one KV head, and the scales [BLOCK_N] of K and V at
    each position (1.0 unless KV_SCALED); masked positions read as zeros."""
    # int64 for the chunk term: a pool of a few GiB has more elements than int32 can index. The
    # other terms stay inside one chunk, which always fits int32.
    rows = (chunk_ids.to(tl.int64) * stride_pool_chunk + layer * stride_pool_layer
            + (positions % CHUNK_TOKENS) * stride_pool_token + kv_head * stride_pool_head)
    tile_mask = position_mask[:, None] & dim_mask[None, :]
    k = tl.load(kv_pool_ptr + rows[:, None] + dims[None, :], mask=tile_mask, other=0.0)
    v = tl.load(kv_pool_ptr + rows[:, None] + stride_pool_kv + dims[None, :], mask=tile_mask, other=0.0)
    k_scale = 1.0
    v_scale = 1.0
    if KV_SCALED:
        scale_rows = (kv_scales_ptr + chunk_ids.to(tl.int64) * stride_scales_chunk + layer * stride_scales_layer
                      + (positions % CHUNK_TOKENS) * NUM_KV_HEADS + kv_head)
        k_scale = tl.load(scale_rows, mask=position_mask, other=0.0)
        v_scale = tl.load(scale_rows + stride_scales_kv, mask=position_mask, other=0.0)
        k = k.to(compute_dtype)
        v = v.to(compute_dtype)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v, k_scale, v_scale


@triton.jit
def online_softmax_step(q, k, v, visible, running_max, running_sum, acc, scale_log2, DOT_PRECISION: tl.constexpr,
                        k_scale, v_scale, KV_SCALED: tl.constexpr, V_WEIGHT: tl.constexpr):
    """Fold one K/V tile into the running (max, sum, weighted V) of each query row, base 2.

    visible [rows, BLOCK_N] masks keys out of range or hidden by causality; k_scale and v_scale
    [BLOCK_N] dequantise an fp8 tile (KV_SCALED).

    V_WEIGHT (fp8: a power of two near the format's largest value): p x v_scale is tiny (v_scale is
    a row's largest value / FP8_MAX), and in fp16 it would fall below the normal range, losing the
    bits of the small probabilities. Weighted by V_WEIGHT it has the size p x |v| has without fp8;
    the running sum carries the same factor, so acc / sum is unchanged (and each split's lse moves by
    the same log2(V_WEIGHT), which the merge of splits cancels)."""
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    if KV_SCALED:
        scores = scores * k_scale[None, :]
    scores = tl.where(visible, scores, float("-inf"))
    new_max = tl.maximum(running_max, tl.max(scores, axis=1))
    # A row that has seen no visible key yet keeps a finite max, so exp2 gives 0, not NaN.
    new_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    probs = tl.exp2(scores - new_max[:, None])
    rescale = tl.exp2(running_max - new_max)
    running_sum = running_sum * rescale + tl.sum(probs, axis=1) * V_WEIGHT
    weights = probs
    if KV_SCALED:
        weights = probs * (v_scale * V_WEIGHT)[None, :]
    acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=DOT_PRECISION)
    return new_max, running_sum, acc
