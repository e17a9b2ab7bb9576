"""Helpers shared by the kernel launchers: argument checks and block-size choices."""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton

from .fp8 import FP8_DTYPES

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KV_POOL_DTYPES = SUPPORTED_DTYPES + FP8_DTYPES  # fp8: with scales (fp8.py)


def interpreter_active() -> bool:
    """True when Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_power_of_2(value: int) -> int:
    return triton.next_power_of_2(max(1, int(value)))


# Shared memory per block (opt-in maximum) by compute capability; others get the smallest we
# target: 99 KiB, sm_86/sm_89/sm_120 cards (RTX 3090/4090/5090, A6000, L40S, L20).
SHARED_MEMORY_PER_BLOCK = {(8, 0): 166_912, (8, 7): 166_912, (9, 0): 232_448, (10, 0): 232_448}
SMALLEST_SHARED_MEMORY = 101_376


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """The CUDA compute capability of device, None off CUDA (the interpreter)."""
    if device.type != "cuda":
        return None
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def shared_memory_per_block(capability: tuple[int, int] | None) -> int:
    return SHARED_MEMORY_PER_BLOCK.get(capability, SMALLEST_SHARED_MEMORY)


def prefill_tiles(head_dim: int, dtype: torch.dtype, capability: tuple[int, int] | None = None,
                  kv_fp8: bool = False) -> dict:
    """block_m x block_n tiles, warps and pipeline depth for prefill attention, per GPU
    generation: the largest tiles whose shared memory fits the card and whose registers do not
    spill (checked by ptxas in tests/kernels/aot_compile.py for sm_90, sm_80 and sm_86)."""
    wide = next_power_of_2(head_dim) > 128
    if dtype == torch.float32:  # the equality tests' dtype: correctness first (256 spills regardless)
        if head_dim <= 64:
            return {"block_m": 64, "block_n": 32, "num_warps": 8, "num_stages": 2}
        return {"block_m": 32, "block_n": 16, "num_warps": 4, "num_stages": 2}
    shared = shared_memory_per_block(capability)
    if shared >= 200_000:  # sm_90 / sm_100: 227 KiB
        if wide:
            # (an fp8 tile's widening and scales take registers: 64 x 64 spills at 256)
            return {"block_m": 64, "block_n": 32 if kv_fp8 else 64, "num_warps": 8, "num_stages": 3}
        return {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3}
    if shared >= 160_000:  # sm_80: 163 KiB
        if wide:
            return {"block_m": 64, "block_n": 32, "num_warps": 8, "num_stages": 3}
        return {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3}
    if wide:  # (64 x 32 tiles with two in flight need 100 KiB: just over)
        return {"block_m": 64, "block_n": 16, "num_warps": 8, "num_stages": 3}
    return {"block_m": 64, "block_n": 64, "num_warps": 4 if head_dim <= 64 else 8, "num_stages": 3}


def decode_tiles(head_dim: int, dtype: torch.dtype, capability: tuple[int, int] | None = None) -> dict:
    """Key positions per iteration, warps and pipeline depth for decode attention (one query
    row group per program: the tile is [BLOCK_G, BLOCK_N]): num_stages - 1 K/V tiles in flight
    within the card's shared memory, without spills."""
    if dtype == torch.float32:
        return {"block_n": 16, "num_warps": 4, "num_stages": 2}
    if next_power_of_2(head_dim) > 128 and shared_memory_per_block(capability) < 160_000:
        return {"block_n": 32, "num_warps": 4, "num_stages": 3}  # two 256-wide K/V tiles in flight
    return {"block_n": 64, "num_warps": 4, "num_stages": 3}


def device_guard(tensor: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


def dot_precision(dtype: torch.dtype) -> str:
    # float32 attention must stay float32: TF32 (the GPU default for fp32 tl.dot) keeps only 10
    # mantissa bits and would break the float32 end-to-end equality the engine promises.
    return "ieee" if dtype == torch.float32 else "tf32"


def needs_upcast(dtype: torch.dtype) -> bool:
    """The interpreter computes on numpy, which has no bfloat16: such tiles go through float32."""
    return dtype == torch.bfloat16 and interpreter_active()


def check_kv_pool(kv_pool: torch.Tensor, name: str = "kv_pool") -> None:
    """The pool is [num_chunks, layers, 2, chunk_tokens, num_kv_heads, head_dim], contiguous."""
    if kv_pool.dim() != 6 or kv_pool.shape[2] != 2:
        raise ValueError(
            f"{name} must have shape [num_chunks, layers, 2, chunk_tokens, num_kv_heads, head_dim], "
            f"got {tuple(kv_pool.shape)}"
        )
    if kv_pool.dtype not in KV_POOL_DTYPES:
        raise TypeError(f"{name} dtype {kv_pool.dtype} is not one of {KV_POOL_DTYPES}")
    if not kv_pool.is_contiguous():
        raise ValueError(f"{name} must be contiguous: a chunk is one block of memory")
    chunk_tokens = kv_pool.shape[3]
    if chunk_tokens < 1 or chunk_tokens & (chunk_tokens - 1):
        raise ValueError(f"chunk_tokens must be a power of two, got {chunk_tokens}")


def check_index_tensor(tensor: torch.Tensor, name: str, dim: int, device: torch.device) -> None:
    if tensor.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimension(s), got shape {tuple(tensor.shape)}")
    if tensor.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {tensor.dtype}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, expected {device}")
    if tensor.dim() and tensor.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension")


def check_layer(layer: int, kv_pool: torch.Tensor) -> None:
    if not 0 <= layer < kv_pool.shape[1]:
        raise IndexError(f"layer {layer} is outside the pool's {kv_pool.shape[1]} layers")


def bit_view(tensor: torch.Tensor) -> torch.Tensor:
    """The same memory as integers of the same width, so copies move bits and nothing else."""
    integer_dtype = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    return tensor.view(integer_dtype)


def check_attention_inputs(q: torch.Tensor, kv_pool: torch.Tensor, layer: int, chunk_tables: torch.Tensor,
                           rows: str) -> tuple[int, int, int, int]:
    """Checks shared by the attention launchers; returns (chunk_tokens, num_kv_heads, head_dim, num_heads).

    q is [rows, num_heads, head_dim] (rows: "batch" for decode, "tokens" for prefill)."""
    check_kv_pool(kv_pool)
    check_layer(layer, kv_pool)
    _, _, _, chunk_tokens, num_kv_heads, head_dim = kv_pool.shape
    if q.dim() != 3 or q.shape[2] != head_dim:
        raise ValueError(f"q must be [{rows}, num_heads, {head_dim}], got {tuple(q.shape)}")
    num_heads = q.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    fp8_pool = kv_pool.dtype not in SUPPORTED_DTYPES
    if q.device != kv_pool.device or (q.dtype != kv_pool.dtype and not fp8_pool) or q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q ({q.dtype}, {q.device}) must match kv_pool ({kv_pool.dtype}, {kv_pool.device})")
    if q.stride(2) != 1:
        raise ValueError("q must be contiguous in head_dim")
    check_index_tensor(chunk_tables, "chunk_tables", 2, q.device)
    return chunk_tokens, num_kv_heads, head_dim, num_heads


def check_block(name: str, block: int) -> None:
    if block < 16 or block & (block - 1):
        raise ValueError(f"{name} must be a power of two >= 16, got {block}")


def copy_warps(block: int) -> int:
    """Warps for a copy of `block` elements per program: at least 8 elements per thread, so that
    each access is 16 bytes wide for 16-bit data (PCIe writes of 2 bytes each would crawl)."""
    return max(1, min(8, block // (8 * 32)))
