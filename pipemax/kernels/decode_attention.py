"""Decode attention: one new query token per sequence against its chunked KV cache.

Interface
    decode_attention(q, kv_pool, layer, chunk_tables, seq_lens, scale, num_splits=None) -> out
    q            [batch, num_heads, head_dim]                  the query of each sequence's newest token
    kv_pool      [num_chunks, layers, 2, chunk_tokens, num_kv_heads, head_dim]   (GPU pool), q's
                 dtype or fp8 (then kv_scales [num_chunks, layers, 2, chunk_tokens, num_kv_heads]
                 float32, fp8.py)
    layer        which layer of the pool (layer index within the stage)
    chunk_tables [batch, max_chunks] int32                     chunk ids in position order; entries
                                                               past a sequence's last chunk are ignored
    seq_lens     [batch] int32 >= 1                            tokens to attend to, the new one included
                                                               (its K/V must already be stored)
    out          [batch, num_heads, head_dim], q's dtype

GQA: query head h reads KV head h // (num_heads // num_kv_heads). Softmax is online, in float32.

Long contexts with few sequences would leave most of the GPU idle, so each sequence's positions
are split across `num_splits` programs (split-K). Each writes a partial output normalised by its
own softmax sum plus the log-sum-exp; a second small kernel merges the splits. With one split
the split kernel writes the output itself and no merge is launched.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    decode_tiles,
    device_capability,
    check_attention_inputs,
    check_block,
    check_index_tensor,
    device_guard,
    dot_precision,
    needs_upcast,
    next_power_of_2,
)
from .attention_core import load_kv_tile, online_softmax_step, tile_chunk_ids
from .fp8 import check_kv_scales, dequantize_ref, v_weight

LOG2_E = 1.4426950408889634


# Values that change from step to step must not trigger Triton's specialisation on 1 / 16.
@triton.jit(do_not_specialize=["layer", "tokens_per_split", "stride_table_batch", "num_heads", "num_splits"])
def _decode_attention_split_kernel(
    q_ptr,  # [batch, num_heads, head_dim]
    kv_pool_ptr,  # [num_chunks, layers, 2, chunk_tokens, num_kv_heads, head_dim]
    kv_scales_ptr,  # [num_chunks, layers, 2, chunk_tokens, num_kv_heads] float32 when KV_SCALED (fp8 pool)
    chunk_tables_ptr,  # [batch, max_chunks] int32
    seq_lens_ptr,  # [batch] int32
    partial_out_ptr,  # [batch, num_heads, num_splits, head_dim] float32
    partial_lse_ptr,  # [batch, num_heads, num_splits] float32, log2 domain
    out_ptr,  # [batch, num_heads, head_dim]: written directly when there is one split
    split_plan_ptr,  # [2] int32 (splits used, tokens per split) when PLAN_ON_DEVICE
    layer,
    scale_log2,  # softmax scale * log2(e): the kernel works with exp2
    tokens_per_split,
    stride_q_batch,
    stride_q_head,
    stride_out_batch,
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
    num_heads,  # runtime values: a new batch shape must not cost a recompilation
    num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CHUNK_TOKENS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,  # query heads per KV head
    NUM_KV_HEADS: tl.constexpr,
    KV_SCALED: tl.constexpr,  # an fp8 pool: tiles widen to q's dtype, scales per position (attention_core)
    V_WEIGHT: tl.constexpr,  # fp8: the probabilities' weight in fp16 range (attention_core.online_softmax_step)
    BLOCK_G: tl.constexpr,  # GROUP_SIZE padded to a tensor-core tile (>= 16)
    BLOCK_N: tl.constexpr,  # positions per iteration
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # compute in float32: the CPU interpreter cannot do bf16 arithmetic
    DIRECT: tl.constexpr,  # one split: normalise and write the output, no merge kernel
    PLAN_ON_DEVICE: tl.constexpr,  # the split plan comes from split_plan_ptr (CUDA graphs)
):
    tl.static_assert(BLOCK_G >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16)
    sequence = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    splits_used = num_splits
    if PLAN_ON_DEVICE:  # the grid holds num_splits programs; this step uses the plan's count
        splits_used = tl.load(split_plan_ptr)
        tokens_per_split = tl.load(split_plan_ptr + 1)
    seq_len = tl.load(seq_lens_ptr + sequence)
    split_start = split * tokens_per_split
    # The last split runs to the end of the sequence, so a stale max_seq_len costs speed, never keys.
    split_end = tl.where(split == splits_used - 1, seq_len, tl.minimum(split_start + tokens_per_split, seq_len))
    split_end = tl.where(split < splits_used, split_end, split_start)  # an unused split: no keys, weight 0

    group = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    group_mask = group < GROUP_SIZE
    dim_mask = dims < HEAD_DIM
    heads = kv_head * GROUP_SIZE + group

    q_offsets = sequence.to(tl.int64) * stride_q_batch + heads[:, None] * stride_q_head + dims[None, :]
    q = tl.load(q_ptr + q_offsets, mask=group_mask[:, None] & dim_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    running_max = tl.full([BLOCK_G], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table_row = chunk_tables_ptr + sequence.to(tl.int64) * stride_table_batch

    offsets = tl.arange(0, BLOCK_N)
    chunk_ids = tile_chunk_ids(table_row, split_start + offsets, split_start + offsets < split_end, CHUNK_TOKENS)
    for block_start in range(split_start, split_end, BLOCK_N):
        positions = block_start + offsets
        position_mask = positions < split_end
        k, v, k_scale, v_scale = load_kv_tile(
            kv_pool_ptr, chunk_ids, positions, position_mask, dims, dim_mask, layer, kv_head,
            stride_pool_chunk, stride_pool_layer, stride_pool_kv, stride_pool_token, stride_pool_head,
            CHUNK_TOKENS, UPCAST, kv_scales_ptr, stride_scales_chunk, stride_scales_layer, stride_scales_kv,
            NUM_KV_HEADS,
            KV_SCALED,
            q_ptr.dtype.element_ty,
        )
        following = positions + BLOCK_N  # the next tile's chunk ids, one tile ahead (see tile_chunk_ids)
        chunk_ids = tile_chunk_ids(table_row, following, following < split_end, CHUNK_TOKENS)
        running_max, running_sum, acc = online_softmax_step(
            q, k, v, position_mask[None, :], running_max, running_sum, acc, scale_log2, DOT_PRECISION, k_scale,
            v_scale, KV_SCALED, V_WEIGHT,
        )

    # A split past the end of a short sequence saw no position: weight zero in the merge.
    has_positions = running_sum > 0
    safe_sum = tl.where(has_positions, running_sum, 1.0)
    if DIRECT:  # (a padding row, seq_len 0, comes out as zeros)
        out_offsets = sequence.to(tl.int64) * stride_out_batch + heads[:, None] * stride_out_head + dims[None, :]
        tl.store(out_ptr + out_offsets, (acc / safe_sum[:, None]).to(out_ptr.dtype.element_ty),
                 mask=group_mask[:, None] & dim_mask[None, :])
        return
    lse = tl.where(has_positions, running_max + tl.log2(safe_sum), float("-inf"))

    partial_row = (sequence.to(tl.int64) * num_heads + heads) * num_splits + split
    out_offsets = partial_row[:, None] * HEAD_DIM + dims[None, :]
    tl.store(partial_out_ptr + out_offsets, acc / safe_sum[:, None], mask=group_mask[:, None] & dim_mask[None, :])
    tl.store(partial_lse_ptr + partial_row, lse, mask=group_mask)


@triton.jit(do_not_specialize=["num_heads", "num_splits"])
def _decode_attention_merge_kernel(
    partial_out_ptr,  # [batch, num_heads, num_splits, head_dim] float32
    partial_lse_ptr,  # [batch, num_heads, num_splits] float32, log2 domain
    out_ptr,  # [batch, num_heads, head_dim]
    split_plan_ptr,  # [2] int32 (splits used, tokens per split) when PLAN_ON_DEVICE
    stride_out_batch,
    stride_out_head,
    num_heads,
    num_splits,
    BLOCK_S: tl.constexpr,  # num_splits rounded up to a power of two
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PLAN_ON_DEVICE: tl.constexpr,
):
    sequence = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    splits_used = num_splits
    if PLAN_ON_DEVICE:
        splits_used = tl.load(split_plan_ptr)
    split_mask = splits < splits_used
    dim_mask = dims < HEAD_DIM

    row = (sequence.to(tl.int64) * num_heads + head) * num_splits
    lse = tl.load(partial_lse_ptr + row + splits, mask=split_mask, other=float("-inf"))
    max_lse = tl.max(lse, axis=0)
    # A padding row (seq_len 0) has no keys at all: its output is zeros, not NaN.
    max_lse = tl.where(max_lse == float("-inf"), 0.0, max_lse)
    weights = tl.exp2(lse - max_lse)
    partial = tl.load(
        partial_out_ptr + (row + splits)[:, None] * HEAD_DIM + dims[None, :],
        mask=split_mask[:, None] & dim_mask[None, :],
        other=0.0,
    )
    total_weight = tl.sum(weights, axis=0)
    merged = tl.sum(partial * weights[:, None], axis=0) / tl.where(total_weight > 0, total_weight, 1.0)
    out_offsets = sequence.to(tl.int64) * stride_out_batch + head * stride_out_head + dims
    tl.store(out_ptr + out_offsets, merged.to(out_ptr.dtype.element_ty), mask=dim_mask)


def choose_num_splits(batch: int, num_kv_heads: int, max_seq_len: int, block_n: int, target_programs: int) -> int:
    """Enough splits that batch * kv_heads * splits reaches target_programs, never an empty split."""
    programs = batch * num_kv_heads
    wanted = -(-target_programs // max(programs, 1))
    return max(1, min(wanted, -(-max_seq_len // block_n), 64))


def decode_split_plan(seq_lens: torch.Tensor, num_kv_heads: int, max_splits: int, block_n: int,
                      target_programs: int) -> torch.Tensor:
    """choose_num_splits as device tensor ops on the real lengths, no host sync: [splits used,
    tokens per split] int32, for a launch of max_splits programs per sequence (CUDA graphs)."""
    wanted = max(1, min(max_splits, -(-target_programs // max(seq_lens.shape[0] * num_kv_heads, 1))))
    blocks = (seq_lens.max().clamp(min=1).to(torch.int32) + block_n - 1) // block_n
    splits = blocks.clamp(max=wanted)
    return torch.stack([splits, block_n * ((blocks + splits - 1) // splits)]).to(torch.int32)


# CTAs of the split kernel one SM holds at once, per (device, tiles), read from the compiled
# kernel's registers and shared memory after its first launch.
_ctas_per_sm: dict[tuple, int] = {}


def _target_programs(device: torch.device, tiles_key: tuple = ()) -> int:
    if device.type == "cuda":
        # A full wave of programs on every SM hides the latency of the K/V loads.
        per_sm = _ctas_per_sm.get((device.index, tiles_key), 2)
        return per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter runs programs one by one: no reason to split


def _record_occupancy(compiled, device: torch.device, tiles_key: tuple) -> None:
    """CTAs per SM of a launched kernel: the tightest of threads, registers and shared memory."""
    if device.type != "cuda" or (device.index, tiles_key) in _ctas_per_sm:
        return
    try:
        props = torch.cuda.get_device_properties(device)
        threads = 32 * compiled.metadata.num_warps
        limits = [getattr(props, "max_threads_per_multi_processor", 2048) // threads]
        if getattr(compiled, "n_regs", 0):
            limits.append(getattr(props, "regs_per_multiprocessor", 65536) // (compiled.n_regs * threads))
        if compiled.metadata.shared:
            limits.append(getattr(props, "shared_memory_per_multiprocessor", 233472) // compiled.metadata.shared)
        _ctas_per_sm[(device.index, tiles_key)] = max(1, min(limits))
    except (AttributeError, TypeError):  # a Triton without these fields: keep the default
        _ctas_per_sm[(device.index, tiles_key)] = 2


def decode_attention(
    q: torch.Tensor,
    kv_pool: torch.Tensor,
    layer: int,
    chunk_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    max_seq_len: int | None = None,
    block_n: int | None = None,
    out: torch.Tensor | None = None,
    split_plan: torch.Tensor | None = None,
    kv_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch decode attention; see the module docstring. max_seq_len (a bound on seq_lens)
    avoids a device sync; block_n defaults to a tile that fits the GPU's shared memory; out
    (q's shape and dtype, contiguous in head_dim) receives the result, e.g. a slice of the
    o_proj input. split_plan (decode_split_plan, on the device) sets the splits a step uses out
    of the num_splits launched: how a captured graph follows the real lengths."""
    chunk_tokens, num_kv_heads, head_dim, num_heads = check_attention_inputs(q, kv_pool, layer, chunk_tables, "batch")
    kv_scaled = check_kv_scales(kv_pool, kv_scales)
    batch = q.shape[0]
    check_index_tensor(seq_lens, "seq_lens", 1, q.device)
    if chunk_tables.shape[0] != batch or seq_lens.shape[0] != batch:
        raise ValueError(f"chunk_tables and seq_lens need {batch} rows, q's batch")
    tiles = decode_tiles(head_dim, q.dtype, device_capability(q.device))
    block_n = block_n or tiles["block_n"]
    check_block("block_n", block_n)

    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(2) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device}, contiguous in head_dim")
    if batch == 0:
        return out
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())
    if chunk_tables.shape[1] * chunk_tokens < max_seq_len:
        raise ValueError(f"chunk_tables hold {chunk_tables.shape[1]} chunks of {chunk_tokens} tokens, "
                         f"fewer than max_seq_len {max_seq_len}")
    group_size = num_heads // num_kv_heads
    tiles_key = (q.dtype, kv_pool.dtype, head_dim, group_size, block_n)
    if split_plan is not None and num_splits is None:
        raise ValueError("a device split plan needs num_splits, the programs launched per sequence")
    if num_splits is None:
        num_splits = choose_num_splits(batch, num_kv_heads, max_seq_len, block_n,
                                       _target_programs(q.device, tiles_key))
    # Splits hold whole blocks so that only the last block of a sequence is partly masked.
    tokens_per_split = block_n * -(-max_seq_len // (block_n * num_splits))

    direct = num_splits == 1
    plan_on_device = split_plan is not None and not direct
    if direct:  # nothing to merge: the split kernel writes out itself
        partial_out = partial_lse = out
    else:
        partial_out = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        partial_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    plan = split_plan if plan_on_device else seq_lens  # (an unread placeholder without a plan)
    block_d = max(16, next_power_of_2(head_dim))
    with device_guard(q):
        compiled = _decode_attention_split_kernel[(batch, num_kv_heads, num_splits)](
            q, kv_pool, kv_scales if kv_scaled else q, chunk_tables, seq_lens, partial_out, partial_lse, out, plan,
            layer, scale * LOG2_E, tokens_per_split,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            kv_pool.stride(0), kv_pool.stride(1), kv_pool.stride(2), kv_pool.stride(3), kv_pool.stride(4),
            *(kv_scales.stride()[:3] if kv_scaled else (0, 0, 0)),
            chunk_tables.stride(0), num_heads, num_splits,
            HEAD_DIM=head_dim, BLOCK_D=block_d, CHUNK_TOKENS=chunk_tokens,
            GROUP_SIZE=group_size, NUM_KV_HEADS=num_kv_heads, KV_SCALED=kv_scaled,
            V_WEIGHT=v_weight(kv_pool.dtype), BLOCK_G=max(16, next_power_of_2(group_size)), BLOCK_N=block_n,
            DOT_PRECISION=dot_precision(q.dtype), UPCAST=needs_upcast(q.dtype), num_stages=tiles["num_stages"],
            num_warps=tiles["num_warps"], DIRECT=direct, PLAN_ON_DEVICE=plan_on_device,
        )
        _record_occupancy(compiled, q.device, tiles_key)
        if not direct:
            _decode_attention_merge_kernel[(batch, num_heads)](
                partial_out, partial_lse, out, plan, out.stride(0), out.stride(1), num_heads, num_splits,
                BLOCK_S=next_power_of_2(num_splits), HEAD_DIM=head_dim, BLOCK_D=block_d,
                PLAN_ON_DEVICE=plan_on_device,
            )
    return out


def gather_sequence_kv(kv_pool: torch.Tensor, layer: int, chunk_table: torch.Tensor, length: int,
                       kv_scales: torch.Tensor | None = None):
    """K and V of one sequence's first `length` positions, each [length, num_kv_heads, head_dim]:
    as stored, or dequantised to float32 by kv_scales (an fp8 pool)."""
    chunk_tokens = kv_pool.shape[3]
    num_chunks = -(-length // chunk_tokens)
    chunk_ids = chunk_table[:num_chunks].long()
    chunks = kv_pool[chunk_ids, layer]  # [n, 2, chunk_tokens, kv_heads, dim]
    if kv_scales is not None:  # scales [n, 2, chunk_tokens, kv_heads]: one per row and head, broadcast over dims
        chunks = dequantize_ref(chunks, kv_scales[chunk_ids, layer][..., None])
    k = chunks[:, 0].reshape(-1, *kv_pool.shape[4:])[:length]
    v = chunks[:, 1].reshape(-1, *kv_pool.shape[4:])[:length]
    return k, v


def decode_attention_ref(q, kv_pool, layer, chunk_tables, seq_lens, scale, kv_scales=None) -> torch.Tensor:
    """Pure-torch decode attention in float32, one sequence at a time (an fp8 pool dequantised first)."""
    check_kv_scales(kv_pool, kv_scales)
    num_heads, num_kv_heads = q.shape[1], kv_pool.shape[4]
    out = torch.empty_like(q)
    for sequence in range(q.shape[0]):
        k, v = gather_sequence_kv(kv_pool, layer, chunk_tables[sequence], int(seq_lens[sequence]), kv_scales)
        k = k.float().repeat_interleave(num_heads // num_kv_heads, dim=1)  # [len, heads, dim]
        v = v.float().repeat_interleave(num_heads // num_kv_heads, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[sequence].float(), k) * scale
        out[sequence] = torch.einsum("hl,lhd->hd", scores.softmax(dim=-1), v).to(q.dtype)
    return out
