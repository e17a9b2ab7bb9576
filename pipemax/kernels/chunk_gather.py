"""Triton helper: read a tile of K or V for consecutive token positions of one sequence.

Positions map to the chunked pool through the sequence's chunk table:
    chunk = chunk_table[position // CHUNK_TOKENS], row = position % CHUNK_TOKENS.
A tile may span several chunks (BLOCK_N need not equal CHUNK_TOKENS), so tiles keep the sizes
tensor cores need (>= 16) even with 8-token chunks.
"""

import triton
import triton.language as tl


@triton.jit
def token_row_offsets(
    chunk_table_row_ptr,  # [max_chunks] int32: this sequence's chunk ids, in position order
    positions,  # [BLOCK_N] token positions
    position_mask,  # [BLOCK_N] which positions are real
    layer,
    kv_head,
    stride_pool_chunk,
    stride_pool_layer,
    stride_pool_token,
    stride_pool_head,
    CHUNK_TOKENS: tl.constexpr,
):
    """Element offset of each position's K row (V is one stride_pool_kv further)."""
    chunk_ids = tl.load(chunk_table_row_ptr + positions // CHUNK_TOKENS, mask=position_mask, other=0)
    # int64 for the chunk term: a pool of a few GiB has more elements than int32 can index. The
    # other terms stay inside one chunk, which always fits int32.
    return (
        chunk_ids.to(tl.int64) * stride_pool_chunk
        + layer * stride_pool_layer
        + (positions % CHUNK_TOKENS) * stride_pool_token
        + kv_head * stride_pool_head
    )
