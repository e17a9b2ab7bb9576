"""Gumbel noise for sampling, drawn on the device from counter-based Philox, one stream per row.

Interface
    gumbel_noise(seeds, vocab, out=None) -> out
    seeds   [rows] int64 in [0, 2**63): one Philox key per row (the sampler derives it from the
            request's seed and its step, so a row's noise depends on nothing else in the batch)
    out     [rows, vocab] float32: G = -log(-log(U)), U uniform in [0, 1) from Philox 4x32-10
            (Triton's tl.rand) at counter = column

argmax(logits / temperature + G) draws a token with probability softmax(logits / temperature):
the Gumbel-max trick, with no softmax and no sort. U is clamped to 1e-30 (it is 0 with
probability 2**-31), so G stays finite and a row left with one allowed token always draws it.

gumbel_noise_ref computes the same Philox in torch integer arithmetic, bit for bit, so the CPU
path and the GPU draw the same noise for the same seeds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_index_tensor, device_guard

BLOCK = 1024
MASK32 = 0xFFFFFFFF
PHILOX_KEY_A, PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUND_A, PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
UNIFORM_SCALE = 4.6566127342e-10  # Triton's uint_to_uniform_float for 32-bit draws
TINY = 1e-30  # U is clamped here: G stays finite, so a row with one allowed token draws it


@triton.jit
def _gumbel_noise_kernel(seeds_ptr, out_ptr, stride_out, vocab, TINY: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    seed = tl.load(seeds_ptr + row)
    uniform = tl.maximum(tl.rand(seed, columns), TINY)  # U = 0 would make G = -inf: see the docstring
    noise = -tl.log(-tl.log(uniform))
    tl.store(out_ptr + row.to(tl.int64) * stride_out + columns, noise, mask=columns < vocab)


def _check(seeds: torch.Tensor, vocab: int) -> None:
    check_index_tensor(seeds, "seeds", 1, seeds.device)
    if seeds.dtype != torch.int64:
        raise TypeError(f"seeds must be int64, got {seeds.dtype}")
    if vocab < 1:
        raise ValueError(f"vocab must be >= 1, got {vocab}")


def gumbel_noise(seeds: torch.Tensor, vocab: int, out: torch.Tensor | None = None) -> torch.Tensor:
    _check(seeds, vocab)
    rows = seeds.shape[0]
    if out is None:
        out = torch.empty(rows, vocab, dtype=torch.float32, device=seeds.device)
    if out.shape != (rows, vocab) or out.dtype != torch.float32 or out.stride(1) != 1:
        raise ValueError(f"out must be [{rows}, {vocab}] float32 with contiguous rows")
    if rows:
        with device_guard(seeds):
            _gumbel_noise_kernel[(rows, triton.cdiv(vocab, BLOCK))](seeds, out, out.stride(0), vocab, TINY=TINY,
                                                                    BLOCK=BLOCK)
    return out


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32 bits of a * b for a 32-bit constant a and 32-bit values b, in int64 without
    overflow: b is split in 16-bit halves."""
    b_high, b_low = b >> 16, b & 0xFFFF
    with_high, with_low = a * b_high, a * b_low  # each < 2**48
    high = (with_high + (with_low >> 16)) >> 16
    low = (((with_high & 0xFFFF) << 16) + with_low) & MASK32
    return high, low


def philox_uint32(seed: int, counters: torch.Tensor, rounds: int = 10) -> torch.Tensor:
    """First word of Philox 4x32 with key `seed` at counters (c0 = counter, c1 = c2 = c3 = 0), as
    int64 in [0, 2**32): what tl.randint returns."""
    c0, c1 = counters.to(torch.int64) & MASK32, torch.zeros_like(counters, dtype=torch.int64)
    c2, c3 = torch.zeros_like(c1), torch.zeros_like(c1)
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for _ in range(rounds):
        high_b, low_b = _mulhilo(PHILOX_ROUND_B, c2)
        high_a, low_a = _mulhilo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = high_b ^ c1 ^ k0, low_b, high_a ^ c3 ^ k1, low_a
        k0, k1 = (k0 + PHILOX_KEY_A) & MASK32, (k1 + PHILOX_KEY_B) & MASK32
    return c0


def gumbel_noise_ref(seeds: torch.Tensor, vocab: int, out: torch.Tensor | None = None) -> torch.Tensor:
    _check(seeds, vocab)
    columns = torch.arange(vocab, dtype=torch.int64, device=seeds.device)
    rows = []
    for seed in seeds.tolist():
        draw = philox_uint32(seed, columns)
        draw = torch.where(draw >= 2**31, draw - 2**32, draw)  # as int32
        draw = torch.where(draw < 0, -draw - 1, draw)
        uniform = (draw.to(torch.float32) * UNIFORM_SCALE).clamp(min=TINY)
        rows.append(-torch.log(-torch.log(uniform)))
    result = torch.stack(rows) if rows else torch.empty(0, vocab, dtype=torch.float32, device=seeds.device)
    if out is None:
        return result
    out.copy_(result)
    return out
