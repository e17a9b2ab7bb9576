"""KV copy: move whole chunks between pools, or write back single rows into a host copy.

Interface
    copy_chunks(src_pool, dst_pool, src_chunk_ids, dst_chunk_ids)
        dst_pool[dst_chunk_ids[i]] = src_pool[src_chunk_ids[i]] for every i. Pools have the same
        chunk shape and dtype; either may live in pinned host memory (prefetch host->GPU,
        offload GPU->host) or both on the GPU.
    copy_rows(src_pool, dst_pool, src_chunk_ids, dst_chunk_ids, token_rows, layer_start, num_layers)
        For each row i and each layer in [layer_start, layer_start + num_layers): copy the K and V
        of token row token_rows[i] from chunk src_chunk_ids[i] to chunk dst_chunk_ids[i]. This is
        the write-through of new tokens of a host-resident sequence into its host copy.
    All id tensors are [n] int32/int64 on the device that runs the kernel.
    fp8 pools take their scales too (src_scales, dst_scales: [chunks, layers, 2, chunk_tokens,
    num_kv_heads] float32, fp8.py), which move with their chunks and rows: each copy is followed
    by a second launch of the same kernel over the scales (the same layout without head_dim).

Both are Triton kernels that load and store through pointers, so on a GPU one launch reads or
writes pinned host memory directly over PCIe (unified addressing). Measured on an H200: gathering
256 KiB chunks from pinned memory this way ran at 51 GB/s where one cudaMemcpyAsync per chunk
reached 33 GB/s, and scattered 2 KiB rows at 51 GB/s against 0.15 GB/s. The copies move bits
through integer views, so they are exact for every dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import bit_view, check_index_tensor, check_kv_pool, copy_warps, device_guard, next_power_of_2
from .fp8 import check_kv_scales

COPY_BLOCK = 4096  # elements per program: 8 KiB of bf16, enough in flight per SM for PCIe reads


# Sizes are runtime values (Triton still specialises them on divisibility by 16, which is what
# vectorised loads need), so a new model shape does not cost a compilation per size.
@triton.jit
def _copy_chunks_kernel(
    src_pool_ptr,  # [src_chunks, layers, 2, chunk_tokens, num_kv_heads, head_dim] as integers
    dst_pool_ptr,  # [dst_chunks, layers, 2, chunk_tokens, num_kv_heads, head_dim] as integers
    src_chunk_ids_ptr,  # [num_copies]
    dst_chunk_ids_ptr,  # [num_copies]
    chunk_elements,
    BLOCK: tl.constexpr,
):
    copy = tl.program_id(0)
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < chunk_elements
    src_chunk = tl.load(src_chunk_ids_ptr + copy).to(tl.int64)
    dst_chunk = tl.load(dst_chunk_ids_ptr + copy).to(tl.int64)
    values = tl.load(src_pool_ptr + src_chunk * chunk_elements + offsets, mask=mask)
    tl.store(dst_pool_ptr + dst_chunk * chunk_elements + offsets, values, mask=mask)


@triton.jit(do_not_specialize=["layer_start"])
def _copy_rows_kernel(
    src_pool_ptr,  # [src_chunks, layers, 2, chunk_tokens, num_kv_heads, head_dim] as integers
    dst_pool_ptr,  # [dst_chunks, layers, 2, chunk_tokens, num_kv_heads, head_dim] as integers
    src_chunk_ids_ptr,  # [num_rows]
    dst_chunk_ids_ptr,  # [num_rows]
    token_rows_ptr,  # [num_rows] row within the chunk
    layer_start,
    chunk_elements,
    row_elements,  # num_kv_heads * head_dim: one token's K (or V) at one layer
    chunk_tokens,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    layer_and_kv = tl.program_id(1)  # (layer - layer_start) * 2 + (0 for K, 1 for V)
    offsets = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < row_elements
    token_row = tl.load(token_rows_ptr + row)
    # [layers, 2, chunk_tokens] flattened: (layer * 2 + kv) * chunk_tokens + token_row rows.
    within_chunk = ((layer_start * 2 + layer_and_kv) * chunk_tokens + token_row) * row_elements + offsets
    src_chunk = tl.load(src_chunk_ids_ptr + row).to(tl.int64)
    dst_chunk = tl.load(dst_chunk_ids_ptr + row).to(tl.int64)
    values = tl.load(src_pool_ptr + src_chunk * chunk_elements + within_chunk, mask=mask)
    tl.store(dst_pool_ptr + dst_chunk * chunk_elements + within_chunk, values, mask=mask)


def _kernel_device(src_pool: torch.Tensor, dst_pool: torch.Tensor) -> torch.device:
    """The GPU that runs the copy, or the CPU when neither pool is on a GPU (interpreter)."""
    for pool in (src_pool, dst_pool):
        if pool.device.type == "cuda":
            return pool.device
    return src_pool.device


def _check_pools(src_pool: torch.Tensor, dst_pool: torch.Tensor, src_scales=None, dst_scales=None) -> bool:
    """Checks both pools (and an fp8 pool's scales); returns whether they are fp8."""
    check_kv_pool(src_pool, "src_pool")
    check_kv_pool(dst_pool, "dst_pool")
    scaled = check_kv_scales(src_pool, src_scales, "src_scales")
    check_kv_scales(dst_pool, dst_scales, "dst_scales")
    if src_pool.shape[1:] != dst_pool.shape[1:] or src_pool.dtype != dst_pool.dtype:
        raise ValueError(
            f"pools differ in chunk shape or dtype: {tuple(src_pool.shape[1:])} {src_pool.dtype} "
            f"vs {tuple(dst_pool.shape[1:])} {dst_pool.dtype}"
        )
    device = _kernel_device(src_pool, dst_pool)
    for name, pool in (("src_pool", src_pool), ("dst_pool", dst_pool), ("src_scales", src_scales),
                       ("dst_scales", dst_scales)):
        if pool is not None and pool.device != device and not pool.is_pinned():
            raise ValueError(f"{name} is on {pool.device}: a GPU kernel can only reach pinned host memory")
    return scaled


def _check_ids(ids: torch.Tensor, name: str, count: int, device: torch.device) -> None:
    check_index_tensor(ids, name, 1, device)
    if ids.shape[0] != count:
        raise ValueError(f"{name} has {ids.shape[0]} entries, expected {count}")


def copy_chunks(src_pool, dst_pool, src_chunk_ids, dst_chunk_ids, src_scales=None, dst_scales=None) -> None:
    """Programs run concurrently: within one pool, no chunk may be both a source and a destination."""
    scaled = _check_pools(src_pool, dst_pool, src_scales, dst_scales)
    device = _kernel_device(src_pool, dst_pool)
    num_copies = src_chunk_ids.shape[0] if src_chunk_ids.dim() == 1 else -1
    _check_ids(src_chunk_ids, "src_chunk_ids", num_copies, device)
    _check_ids(dst_chunk_ids, "dst_chunk_ids", num_copies, device)
    if num_copies == 0:
        return
    blocks = [(src_pool, dst_pool)] + ([(src_scales, dst_scales)] if scaled else [])
    for src, dst in blocks:  # the chunks' data, then (fp8) their scales: one copy each
        chunk_elements = src[0].numel()
        block = min(COPY_BLOCK, next_power_of_2(chunk_elements))
        with device_guard(src_chunk_ids):
            _copy_chunks_kernel[(num_copies, triton.cdiv(chunk_elements, block))](
                bit_view(src), bit_view(dst), src_chunk_ids, dst_chunk_ids, chunk_elements, BLOCK=block,
                num_warps=copy_warps(block),
            )


def copy_rows(src_pool, dst_pool, src_chunk_ids, dst_chunk_ids, token_rows, layer_start: int, num_layers: int,
              src_scales=None, dst_scales=None) -> None:
    scaled = _check_pools(src_pool, dst_pool, src_scales, dst_scales)
    device = _kernel_device(src_pool, dst_pool)
    num_rows = src_chunk_ids.shape[0] if src_chunk_ids.dim() == 1 else -1
    for name, ids in (("src_chunk_ids", src_chunk_ids), ("dst_chunk_ids", dst_chunk_ids), ("token_rows", token_rows)):
        _check_ids(ids, name, num_rows, device)
    layers = src_pool.shape[1]
    if not (0 <= layer_start and num_layers >= 0 and layer_start + num_layers <= layers):
        raise IndexError(f"layers [{layer_start}, {layer_start + num_layers}) are outside the pool's {layers}")
    if num_rows == 0 or num_layers == 0:
        return
    blocks = [(src_pool, dst_pool)] + ([(src_scales, dst_scales)] if scaled else [])
    for src, dst in blocks:  # the rows, then (fp8) their scales: the pool's layout without head_dim
        row_elements = src_pool.shape[4] * (src_pool.shape[5] if src is src_pool else 1)
        block = min(COPY_BLOCK, next_power_of_2(row_elements))
        with device_guard(src_chunk_ids):
            _copy_rows_kernel[(num_rows, num_layers * 2, triton.cdiv(row_elements, block))](
                bit_view(src), bit_view(dst), src_chunk_ids, dst_chunk_ids, token_rows, layer_start,
                src[0].numel(), row_elements, src_pool.shape[3], BLOCK=block, num_warps=copy_warps(block),
            )


def copy_chunks_ref(src_pool, dst_pool, src_chunk_ids, dst_chunk_ids, src_scales=None, dst_scales=None) -> None:
    scaled = _check_pools(src_pool, dst_pool, src_scales, dst_scales)
    for src, dst in [(src_pool, dst_pool)] + ([(src_scales, dst_scales)] if scaled else []):
        dst[dst_chunk_ids.long().to(dst.device)] = src[src_chunk_ids.long().to(src.device)].to(dst.device)


def copy_rows_ref(src_pool, dst_pool, src_chunk_ids, dst_chunk_ids, token_rows, layer_start, num_layers,
                  src_scales=None, dst_scales=None) -> None:
    scaled = _check_pools(src_pool, dst_pool, src_scales, dst_scales)
    layers = slice(layer_start, layer_start + num_layers)
    for src, dst in [(src_pool, dst_pool)] + ([(src_scales, dst_scales)] if scaled else []):
        rows = zip(src_chunk_ids.tolist(), dst_chunk_ids.tolist(), token_rows.tolist())
        for src_chunk, dst_chunk, token_row in rows:
            dst[dst_chunk, layers, :, token_row] = src[src_chunk, layers, :, token_row].to(dst.device)
