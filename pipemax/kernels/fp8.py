"""fp8 KV: the formats, rounding to the fp8 grid inside kernels, and the torch reference of both.

A pool of dtype float8_e4m3fn or float8_e5m2 holds K and V as x / scale, rounded to the nearest
fp8 value (ties to even) and saturated at the format's largest finite value; a parallel tensor

    kv_scales [num_chunks, layers, 2, chunk_tokens, num_kv_heads] float32

holds the scale of every row: per chunk, layer, K or V, token and KV head, so x ~ q * scale. The
scales move with their chunk (every copy of a chunk or a row copies its scales).

Why a scale per token and head, finer than one per chunk: a row's scale is then a function of the
row alone (its largest magnitude / FP8_MAX), set when the row is stored, never changed. Per-chunk
scales need a rule for the rows that arrive in later steps (keep the first rows' scale with a
margin and saturate above it, or rescale the chunk's earlier rows), and with either rule a
chunk's stored bits depend on how its rows were split over steps, which the schedule decides: the
outputs then change with offload, micro-batches, chunk size or the step's token budget. Both
rules were built and measured against this (README, "fp8 KV cache"). The scales cost 4 bytes a
row and head (3% of the KV at head_dim 128).

A checkpoint's per-layer k_scale / v_scale (fixed_scales [layers, 2]) replace the computed scales
where > 0; rows beyond them saturate.

Rounding is done in float32 arithmetic (round_to_fp8) before the cast, so that the cast only meets
values already on the fp8 grid: Triton's interpreter rounds some values to the wrong binade
(127.2 -> 64 in e4m3), and with this every backend stores the same bits. Negative zero is stored
as +0 (the interpreter drops the sign of zero; the GPU would keep it): same bits everywhere.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# (mantissa bits, exponent of the smallest normal value, largest finite value)
FP8_FORMATS = {torch.float8_e4m3fn: (3, -6, 448.0), torch.float8_e5m2: (2, -14, 57344.0)}


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def v_weight(pool_dtype: torch.dtype) -> float:
    """Attention's weight of the probabilities over an fp8 pool (1 otherwise): the power of two at
    or above the format's largest value, so p x v_scale x V_WEIGHT ~ p x |v| (attention_core)."""
    if not is_fp8(pool_dtype):
        return 1.0
    return 2.0 ** math.ceil(math.log2(FP8_FORMATS[pool_dtype][2]))


def fp8_constants(dtype: torch.dtype) -> dict:
    """The constexprs a quantising kernel takes for dtype."""
    mantissa, min_normal_exponent, largest = FP8_FORMATS[dtype]
    return {"MANTISSA": mantissa, "MIN_NORMAL_EXP": min_normal_exponent, "FP8_MAX": largest}


@triton.jit
def round_to_fp8(x, MANTISSA: tl.constexpr, MIN_NORMAL_EXP: tl.constexpr):
    """float32 x, already inside the format's range, rounded to the nearest fp8 value (ties to
    even), still as float32: normal values keep MANTISSA bits (integer rounding of the bits, which
    carries into the exponent correctly); below the smallest normal value the step is fixed, and
    adding then subtracting a large power of two rounds to it."""
    bits = x.to(tl.int32, bitcast=True)
    DROP: tl.constexpr = 23 - MANTISSA
    bias = (1 << (DROP - 1)) - 1 + ((bits >> DROP) & 1)
    normal = ((bits + bias) & ~((1 << DROP) - 1)).to(tl.float32, bitcast=True)
    MAGIC: tl.constexpr = 1.5 * 2.0 ** (23 + MIN_NORMAL_EXP - MANTISSA)
    magnitude = (tl.abs(x) + MAGIC) - MAGIC
    subnormal = tl.where(x < 0, -magnitude, magnitude)
    rounded = tl.where(tl.abs(x) < 2.0 ** MIN_NORMAL_EXP, subnormal, normal)
    return tl.where(rounded == 0, 0.0, rounded)  # +0, never -0


@triton.jit
def row_scales(largest, fixed_scale, FP8_MAX: tl.constexpr):
    """The scales [heads] of one stored row from its largest magnitudes per head: the largest value
    maps to FP8_MAX, unless a checkpoint's fixed scale (> 0) is given."""
    return tl.where(fixed_scale > 0, fixed_scale, largest * (1.0 / FP8_MAX))


@triton.jit
def quantize(x, scale, MANTISSA: tl.constexpr, MIN_NORMAL_EXP: tl.constexpr, FP8_MAX: tl.constexpr):
    """float32 x / scale (scale 0: x is all zeros) on the fp8 grid, saturated, as float32."""
    inverse = 1.0 / tl.where(scale > 0, scale, 1.0)
    return round_to_fp8(tl.clamp(x * inverse, -FP8_MAX, FP8_MAX), MANTISSA, MIN_NORMAL_EXP)


def row_scales_ref(largest: torch.Tensor, fixed_scale: float, dtype: torch.dtype) -> torch.Tensor:
    if fixed_scale > 0:
        return torch.full_like(largest, fixed_scale)
    return largest.float() * torch.tensor(1.0 / FP8_FORMATS[dtype][2], dtype=torch.float32)


def quantize_ref(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x / scale (scale broadcast against x; 0 for all-zero x) as fp8 of dtype, saturated, +0 for zeros."""
    largest = FP8_FORMATS[dtype][2]
    inverse = 1.0 / torch.where(scale > 0, scale, torch.ones_like(scale))
    quantized = (x.float() * inverse).clamp(-largest, largest).to(dtype)
    bits = quantized.view(torch.uint8)
    bits[bits == 0x80] = 0  # -0 -> +0, as the kernels store it
    return quantized


def dequantize_ref(quantized: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return quantized.float() * scale


def check_kv_scales(kv_pool: torch.Tensor, kv_scales, name: str = "kv_scales") -> bool:
    """An fp8 pool needs its scales [num_chunks, layers, 2, chunk_tokens, num_kv_heads] float32 on
    its device; a pool of the model's dtype takes none. Returns whether the pool is fp8."""
    if not is_fp8(kv_pool.dtype):
        if kv_scales is not None:
            raise ValueError(f"{name} go with an fp8 pool; this pool is {kv_pool.dtype}")
        return False
    expected = tuple(kv_pool.shape[:5])
    if kv_scales is None:
        raise ValueError(f"an fp8 pool needs {name} {list(expected)} float32")
    if (tuple(kv_scales.shape) != expected or kv_scales.dtype != torch.float32 or kv_scales.device != kv_pool.device
            or not kv_scales.is_contiguous()):
        raise ValueError(f"{name} must be contiguous {list(expected)} float32 on {kv_pool.device}, got "
                         f"{tuple(kv_scales.shape)} {kv_scales.dtype} on {kv_scales.device}")
    return True


def check_fixed_scales(kv_pool: torch.Tensor, fixed_scales) -> None:
    """A checkpoint's scales: [layers, 2] float32 on the pool's device, for an fp8 pool only."""
    if fixed_scales is None:
        return
    layers = kv_pool.shape[1]
    if not is_fp8(kv_pool.dtype):
        raise ValueError("fixed_scales go with an fp8 pool")
    if (tuple(fixed_scales.shape) != (layers, 2) or fixed_scales.dtype != torch.float32
            or fixed_scales.device != kv_pool.device or not fixed_scales.is_contiguous()):
        raise ValueError(f"fixed_scales must be contiguous [{layers}, 2] float32 on {kv_pool.device}")
