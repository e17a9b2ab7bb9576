"""RMSNorm, fused with the residual add before it: one read and one write of each row.

Interface
    rms_norm(x, weight, eps, residual=None, out=None) -> out
    x         [tokens, hidden], rows contiguous
    weight    [hidden], x's dtype
    residual  [tokens, hidden] or None. Given: residual <- x + residual (in place, rounded to the
              dtype like the unfused add), and the norm is taken of the new residual.
    out       [tokens, hidden] (default: a new tensor); may be x itself (in place)

The numerics are transformers' RMSNorm: the row in float32, x * rsqrt(mean(x^2) + eps), cast to
the dtype, then times the weight in the dtype. A decoder layer calls it twice (before attention,
before the MLP) and the stage once more at its end, each time instead of an add and ~8 kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import SUPPORTED_DTYPES, device_guard, next_power_of_2

MAX_HIDDEN = 65536


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    stride_x,
    stride_residual,
    stride_out,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK)
    mask = offsets < hidden
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + offsets, mask=mask, other=0.0).to(tl.float32)
        total = (x + residual).to(dtype)  # the unfused add rounds to the dtype here
        tl.store(residual_ptr + row * stride_residual + offsets, total, mask=mask)
        x = total.to(tl.float32)
    mean_square = tl.sum(x * x, axis=0) / hidden
    normed = (x * tl.math.rsqrt(mean_square + eps)).to(dtype).to(tl.float32)
    weight = tl.load(weight_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offsets, (weight * normed).to(dtype), mask=mask)


def _check(name: str, tensor: torch.Tensor, like: torch.Tensor) -> None:
    if tensor.shape != like.shape or tensor.dtype != like.dtype or tensor.device != like.device:
        raise ValueError(f"{name} must be {tuple(like.shape)} {like.dtype} on {like.device}, "
                         f"got {tuple(tensor.shape)} {tensor.dtype} on {tensor.device}")
    if tensor.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous within each row")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be [tokens, hidden] with contiguous rows, got {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x dtype {x.dtype} is not one of {SUPPORTED_DTYPES}")
    tokens, hidden = x.shape
    if not 0 < hidden <= MAX_HIDDEN:
        raise ValueError(f"hidden size {hidden} is outside 1..{MAX_HIDDEN}")
    if weight.shape != (hidden,) or weight.dtype != x.dtype or weight.device != x.device or weight.stride(0) != 1:
        raise ValueError(f"weight must be [{hidden}] {x.dtype} on {x.device}, contiguous")
    if residual is not None:
        _check("residual", residual, x)
    out = torch.empty_like(x) if out is None else out
    _check("out", out, x)
    if tokens == 0:
        return out
    block = next_power_of_2(hidden)
    with device_guard(x):
        _rms_norm_kernel[(tokens,)](
            x, residual if residual is not None else x, weight, out,
            x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0), hidden, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=max(1, min(16, block // 256)),
        )
    return out


def rms_norm_ref(x, weight, eps, residual=None, out=None):
    if residual is not None:
        residual.copy_(x + residual)
        x = residual
    variance = x.float().pow(2).mean(-1, keepdim=True)
    result = weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)
    if out is None:
        return result
    out.copy_(result)
    return out
