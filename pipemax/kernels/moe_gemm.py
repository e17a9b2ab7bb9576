"""Mixture-of-experts matmuls: every expert's tokens in one launch (a grouped GEMM).

Interface
    align_by_expert(topk_ids, num_experts, block_m) -> (sorted_pairs, block_experts)
        topk_ids  [tokens, top_k] int: the experts each token is routed to. A (token, choice)
                  pair is numbered token * top_k + choice.
        sorted_pairs  [max_blocks * block_m] int32: the pairs grouped by expert, each expert's
                  group padded to a multiple of block_m with the sentinel tokens * top_k.
        block_experts [max_blocks] int32: the expert of each block of block_m pairs, -1 past the
                  last. max_blocks bounds every routing of this many pairs, so the launch grid
                  never depends on the data (no host sync; CUDA graphs can replay it).
    grouped_gemm(a, weights, sorted_pairs, block_experts, top_k, out, row_scale=None)
        For every pair p routed to expert e: out[p] = a[p // top_k] @ weights[e].T, times
        row_scale[p] when given (the router weight, on the down projection).
        a        [rows, K]: token rows (top_k: the number of pairs per row) or pair rows (top_k 1)
        weights  [num_experts, N, K] (each expert's nn.Linear weight)
        out      [pairs, N], a's dtype; row_scale [pairs] float32
    moe_experts(hidden, topk_ids, topk_weights, gate_up, down) -> [tokens, hidden]
        The routed experts of a MoE layer: align, grouped gate|up projection, SiLU x up, grouped
        down projection scaled by the router weights, summed over each token's experts. Four
        launches for all experts; gate_up [experts, 2 * I, hidden], down [experts, hidden, I]
        (transformers' fused expert weights).
    grouped_gemm_ref(...) / moe_experts_ref(...): the same in torch, an expert at a time.

Numerics: float32 accumulation, one rounding to the dtype at the end (row_scale applied before
it), like a matmul of the dtype; the reference computes the same in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import SUPPORTED_DTYPES, device_guard, dot_precision, needs_upcast


def max_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Blocks of block_m pairs that any routing of num_pairs pairs over num_experts fills."""
    return triton.cdiv(num_pairs + num_experts * (block_m - 1), block_m)


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs sorted by expert, padded per expert to whole blocks (torch ops on the device)."""
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [tokens, top_k], got {tuple(topk_ids.shape)}")
    device = topk_ids.device
    flat = topk_ids.reshape(-1).long()
    num_pairs = flat.numel()
    blocks = max_blocks(num_pairs, num_experts, block_m)
    # (scatter_add, not bincount: bincount's size depends on the data, a sync with the host)
    counts = torch.zeros(num_experts, dtype=torch.long, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    order = torch.argsort(flat, stable=True)  # pair indices grouped by expert, in pair order
    expert_of_sorted = flat[order]
    start_of_sorted = torch.cumsum(counts, 0)[expert_of_sorted] - counts[expert_of_sorted]
    rank = torch.arange(num_pairs, device=device) - start_of_sorted
    sorted_pairs = torch.full((blocks * block_m,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs[padded_start[expert_of_sorted] + rank] = order.to(torch.int32)
    block_start = torch.arange(blocks, device=device) * block_m
    block_experts = torch.searchsorted(padded_end, block_start, right=True).to(torch.int32)
    block_experts[block_experts >= num_experts] = -1  # past the last expert's blocks
    return sorted_pairs, block_experts


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, w_ptr, out_ptr, sorted_pairs_ptr, block_experts_ptr, row_scale_ptr,
    num_pairs, N, K, top_k,
    stride_a, stride_we, stride_wn, stride_out,
    HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # float32 tiles: the CPU interpreter cannot do bf16 arithmetic
):
    block = tl.program_id(0)
    expert = tl.load(block_experts_ptr + block)
    if expert >= 0:
        pairs = tl.load(sorted_pairs_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
        valid = pairs < num_pairs
        rows = (pairs // top_k).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        w_base = w_ptr + expert.to(tl.int64) * stride_we
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + rows[:, None] * stride_a + ks[None, :], mask=valid[:, None] & (ks[None, :] < K),
                        other=0.0)
            w = tl.load(w_base + cols[None, :].to(tl.int64) * stride_wn + ks[:, None],
                        mask=(cols[None, :] < N) & (ks[:, None] < K), other=0.0)
            if UPCAST:
                a, w = a.to(tl.float32), w.to(tl.float32)
            acc += tl.dot(a, w, input_precision=DOT_PRECISION)
        if HAS_SCALE:
            acc *= tl.load(row_scale_ptr + pairs, mask=valid, other=0.0)[:, None]
        out = out_ptr + pairs[:, None].to(tl.int64) * stride_out + cols[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & (cols[None, :] < N))


def gemm_tiles(n: int, k: int, dtype: torch.dtype) -> dict:
    """Output columns and reduction step per program (at least 16: tl.dot's smallest). float32
    tiles of 64 x 128 spill registers (ptxas, sm_86/sm_90): 64 columns there."""
    widest = 64 if dtype == torch.float32 else 128
    return {"BLOCK_N": min(widest, max(16, triton.next_power_of_2(n))),
            "BLOCK_K": min(64, max(16, triton.next_power_of_2(k)))}


def grouped_gemm(a: torch.Tensor, weights: torch.Tensor, sorted_pairs: torch.Tensor, block_experts: torch.Tensor,
                 top_k: int, out: torch.Tensor, row_scale: torch.Tensor | None = None, block_m: int = 64) -> torch.Tensor:
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16, got {block_m}")
    if a.dim() != 2 or weights.dim() != 3 or a.shape[1] != weights.shape[2]:
        raise ValueError(f"a [rows, K] and weights [experts, N, K] must agree, got {tuple(a.shape)} and "
                         f"{tuple(weights.shape)}")
    if a.dtype not in SUPPORTED_DTYPES or weights.dtype != a.dtype or out.dtype != a.dtype:
        raise TypeError(f"a, weights and out must share a float dtype, got {a.dtype}, {weights.dtype}, {out.dtype}")
    if a.stride(1) != 1 or weights.stride(2) != 1 or out.stride(1) != 1:
        raise ValueError("a, weights and out need contiguous rows")
    num_pairs, n = a.shape[0] * top_k, weights.shape[1]
    if out.shape != (num_pairs, n):
        raise ValueError(f"out must be [{num_pairs}, {n}], got {tuple(out.shape)}")
    if sorted_pairs.numel() != block_experts.numel() * block_m:
        raise ValueError(f"sorted_pairs holds {sorted_pairs.numel()} entries for {block_experts.numel()} blocks of "
                         f"{block_m}")
    if row_scale is not None and (row_scale.shape != (num_pairs,) or row_scale.dtype != torch.float32):
        raise ValueError(f"row_scale must be [{num_pairs}] float32")
    if num_pairs == 0 or n == 0:
        return out
    tiles = {"BLOCK_M": block_m, **gemm_tiles(n, a.shape[1], a.dtype)}
    with device_guard(a):
        _grouped_gemm_kernel[(block_experts.numel(), triton.cdiv(n, tiles["BLOCK_N"]))](
            a, weights, out, sorted_pairs, block_experts, row_scale if row_scale is not None else out,
            num_pairs, n, a.shape[1], top_k, a.stride(0), weights.stride(0), weights.stride(1), out.stride(0),
            HAS_SCALE=row_scale is not None, **tiles, DOT_PRECISION=dot_precision(a.dtype),
            UPCAST=needs_upcast(a.dtype), num_warps=4,
        )
    return out


def grouped_gemm_ref(a, weights, sorted_pairs, block_experts, top_k, out, row_scale=None, block_m: int = 64):
    """An expert at a time, from the routing the aligned tensors describe."""
    num_pairs = a.shape[0] * top_k
    pairs = sorted_pairs.long().view(-1, block_m)
    for block, expert in enumerate(block_experts.tolist()):
        if expert < 0:
            continue
        chosen = pairs[block][pairs[block] < num_pairs]
        result = a[chosen // top_k].float() @ weights[expert].float().T
        if row_scale is not None:
            result = result * row_scale[chosen][:, None]
        out[chosen] = result.to(out.dtype)
    return out


MOE_BLOCK_M = 64  # pairs per program: one expert's rows


def moe_experts(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor, block_m: int = MOE_BLOCK_M) -> torch.Tensor:
    from .activation import silu_and_mul

    tokens, top_k = topk_ids.shape
    num_experts, intermediate = gate_up.shape[0], gate_up.shape[1] // 2
    sorted_pairs, block_experts = align_by_expert(topk_ids, num_experts, block_m)
    projected = torch.empty(tokens * top_k, 2 * intermediate, dtype=hidden.dtype, device=hidden.device)
    grouped_gemm(hidden, gate_up, sorted_pairs, block_experts, top_k, projected, block_m=block_m)
    activated = silu_and_mul(projected)
    del projected  # (the largest buffer: free before the down projection's output is allocated)
    out = torch.empty(tokens * top_k, down.shape[1], dtype=hidden.dtype, device=hidden.device)
    grouped_gemm(activated, down, sorted_pairs, block_experts, 1, out,
                 row_scale=topk_weights.reshape(-1).float(), block_m=block_m)
    return out.view(tokens, top_k, -1).sum(dim=1)


def moe_experts_ref(hidden, topk_ids, topk_weights, gate_up, down, block_m: int = MOE_BLOCK_M) -> torch.Tensor:
    """transformers' expert loop: each expert's tokens, SiLU(gate) x up, down, times the router
    weight, added up in the dtype."""
    out = torch.zeros_like(hidden)
    for expert in range(gate_up.shape[0]):
        token_index, choice = torch.where(topk_ids == expert)
        if token_index.numel() == 0:
            continue
        gate, up = torch.nn.functional.linear(hidden[token_index], gate_up[expert]).chunk(2, dim=-1)
        result = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, down[expert])
        result = result * topk_weights[token_index, choice, None]
        out.index_add_(0, token_index, result.to(out.dtype))
    return out
