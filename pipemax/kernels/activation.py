"""SiLU(gate) x up in one pass over the fused gate|up projection.

Interface
    silu_and_mul(gate_up, out=None) -> out
    gate_up  [tokens, 2 * intermediate], rows contiguous: gate first, then up (the layer's fused
             projection)
    out      [tokens, intermediate], gate_up's dtype

Numerics as the unfused torch code: SiLU in float32 rounded to the dtype, then the product
rounded to the dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import SUPPORTED_DTYPES, device_guard

BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(gate_up_ptr, out_ptr, stride_gate_up, stride_out, intermediate, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < intermediate
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(gate_up_ptr + row * stride_gate_up + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_gate_up + intermediate + offsets, mask=mask, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offsets, (silu * up).to(dtype), mask=mask)


def silu_and_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(-1) != 1:
        raise ValueError(f"gate_up must be [tokens, 2 * intermediate] with contiguous rows, got {tuple(gate_up.shape)}")
    if gate_up.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"gate_up dtype {gate_up.dtype} is not one of {SUPPORTED_DTYPES}")
    tokens, intermediate = gate_up.shape[0], gate_up.shape[1] // 2
    if out is None:
        out = torch.empty(tokens, intermediate, dtype=gate_up.dtype, device=gate_up.device)
    if out.shape != (tokens, intermediate) or out.dtype != gate_up.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be [{tokens}, {intermediate}] {gate_up.dtype} with contiguous rows")
    if tokens == 0 or intermediate == 0:
        return out
    with device_guard(gate_up):
        _silu_and_mul_kernel[(tokens, triton.cdiv(intermediate, BLOCK))](
            gate_up, out, gate_up.stride(0), out.stride(0), intermediate, BLOCK=BLOCK, num_warps=4,
        )
    return out


def silu_and_mul_ref(gate_up, out=None):
    gate, up = gate_up.chunk(2, dim=-1)
    result = F.silu(gate) * up
    if out is None:
        return result
    out.copy_(result)
    return out
