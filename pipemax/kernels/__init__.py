"""Triton kernels on the chunked KV layout, each with a launcher and a pure-torch reference.

Place in the stack: the bottom. May import torch and triton only, nothing of pipemax; knows tensors
and pointers, never requests or schedules (worker -> models -> kernels; see pipemax/core's rules).

KV layout (block-first). Per pipeline stage, a pool tensor

    kv_pool[num_chunks, layers_in_stage, 2, chunk_tokens, num_kv_heads, head_dim]

where index 2 is (K, V). A chunk holds K and V of `chunk_tokens` consecutive positions of one
sequence for all layers of the stage and is one contiguous block of memory, so it crosses PCIe as
one large copy. `chunk_tokens` is a power of two (8 to 256 are tested). A sequence's chunk table
lists its chunk ids in position order: position p lives in chunk table[p // chunk_tokens] at row
p % chunk_tokens. A slot (for the store kernel) is chunk_id * chunk_tokens + row. Every stage has a
GPU pool and a larger host pool of the same chunk shape; attention reads only the GPU pool.

Kernels, one file each (see each module's docstring for shapes):
    decode_attention.py   decode_attention: one query per sequence, GQA, split-K over long contexts
    prefill_attention.py  prefill_attention: causal attention of packed new tokens over cached
                          prefix + new tokens
    attention_core.py     the K/V tile reads through a chunk table and the online softmax both share
    kv_store.py           store_kv: write new tokens' K/V into their slots at one layer
    kv_copy.py            copy_chunks: whole chunks between pools (host->GPU, GPU->host, GPU->GPU);
                          copy_rows: single token rows at some layers (write-through to the host copy)
    norm.py               rms_norm: RMSNorm of rows, fused with the residual add before it
    rope.py               rope_store_kv: rotary embedding of q and k (Qwen3's q/k norm too) fused
                          with the KV store
    activation.py         silu_and_mul: SiLU(gate) x up over the fused gate|up projection
    sampling_noise.py     gumbel_noise: per-row Philox Gumbel noise for sampling on the device
    moe_gemm.py           moe_experts: a MoE layer's routed experts, grouped GEMMs over tokens sorted
                          by expert
    fp8.py                fp8 KV: formats, rounding to the fp8 grid in kernels, quantize_ref /
                          dequantize_ref; why a scale per row and head
Each has a `<name>_ref` in pure torch with the same arguments.

Dtypes float32, float16 and bfloat16; head_dim up to 256 (64, 80, 96, 128 tested). A KV pool may
instead hold fp8 (float8_e4m3fn, float8_e5m2) with a parallel scales tensor
[num_chunks, layers, 2, chunk_tokens, num_kv_heads] float32 (fp8.py): the store quantises, attention
dequantises in registers, copies move the scales with their chunks.

On a machine without CUDA the kernels are defined for Triton's interpreter (TRITON_INTERPRET=1,
set here unless the caller chose) so they can run on CPU tensors, slowly; the engine uses the
torch references there by default.
"""

import os

import torch

if not torch.cuda.is_available():
    # Must happen before any @triton.jit below runs: the decorator reads it once per kernel.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .decode_attention import decode_attention, decode_attention_ref  # noqa: E402
from .kv_copy import copy_chunks, copy_chunks_ref, copy_rows, copy_rows_ref  # noqa: E402
from .activation import silu_and_mul, silu_and_mul_ref  # noqa: E402
from .kv_store import store_kv, store_kv_ref  # noqa: E402
from .norm import rms_norm, rms_norm_ref  # noqa: E402
from .rope import rope_store_kv, rope_store_kv_ref  # noqa: E402
from .sampling_noise import gumbel_noise, gumbel_noise_ref  # noqa: E402
from .prefill_attention import prefill_attention, prefill_attention_ref  # noqa: E402
from .moe_gemm import moe_experts, moe_experts_ref  # noqa: E402
from .fp8 import FP8_DTYPES, dequantize_ref, is_fp8, quantize_ref  # noqa: E402

__all__ = [
    "FP8_DTYPES",
    "dequantize_ref",
    "is_fp8",
    "quantize_ref",
    "copy_chunks",
    "copy_chunks_ref",
    "copy_rows",
    "copy_rows_ref",
    "decode_attention",
    "decode_attention_ref",
    "gumbel_noise",
    "gumbel_noise_ref",
    "moe_experts",
    "moe_experts_ref",
    "prefill_attention",
    "prefill_attention_ref",
    "rms_norm",
    "rms_norm_ref",
    "rope_store_kv",
    "rope_store_kv_ref",
    "silu_and_mul",
    "silu_and_mul_ref",
    "store_kv",
    "store_kv_ref",
]
