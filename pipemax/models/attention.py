"""The attention interface between models and kernels.

A model layer hands q, k, v of the step's tokens to `ChunkedAttention`; it stores k, v into the
stage's GPU KV pool and attends through the chunk tables in `AttentionMetadata`. The runtime
builds the metadata (it knows the sequences); models never see requests or block ids beyond it.

Token order in a step: the decode tokens first (one per decoding sequence), then the prefill
tokens of each prefilling sequence, packed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipemax import kernels

ATTENTION_BACKENDS = ("triton", "torch")


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] chunk_id * chunk_tokens + row, -1 = padding
    num_decode_tokens: int
    decode_chunk_tables: torch.Tensor  # [num_decode, max_chunks] int32
    decode_seq_lens: torch.Tensor  # [num_decode] int32, including the new token
    decode_max_seq_len: int
    prefill_chunk_tables: torch.Tensor  # [num_prefill_seqs, max_chunks] int32
    prefill_cu_seqlens_q: torch.Tensor  # [num_prefill_seqs + 1] int32, offsets into the prefill tokens
    prefill_seq_lens: torch.Tensor  # [num_prefill_seqs] int32, cached prefix + new tokens
    prefill_max_q_len: int


class ChunkedAttention:
    """Store new K/V, then decode and prefill attention, over one stage's GPU pool."""

    def __init__(self, kv_pool: torch.Tensor, backend: str, scale: float):
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
        self.kv_pool = kv_pool
        self.backend = backend
        self.scale = scale
        # Called with the layer index right after each layer's K/V are stored, in eager steps
        # only (the runtime writes KV through to the host from there); None: nothing to call.
        self.after_store = None

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata):
        """q [tokens, heads, dim], k/v [tokens, kv_heads, dim]; layer is the index within the stage."""
        triton_backend = self.backend == "triton"
        store = kernels.store_kv if triton_backend else kernels.store_kv_ref
        store(k, v, self.kv_pool, layer, meta.slot_mapping)
        if self.after_store is not None:
            self.after_store(layer)
        num_decode = meta.num_decode_tokens
        out = torch.empty_like(q)
        if num_decode:
            if triton_backend:
                out[:num_decode] = kernels.decode_attention(
                    q[:num_decode], self.kv_pool, layer, meta.decode_chunk_tables, meta.decode_seq_lens, self.scale,
                    max_seq_len=meta.decode_max_seq_len,
                )
            else:
                out[:num_decode] = kernels.decode_attention_ref(
                    q[:num_decode], self.kv_pool, layer, meta.decode_chunk_tables, meta.decode_seq_lens, self.scale
                )
        if q.shape[0] > num_decode:
            prefill_q = q[num_decode:]
            if triton_backend:
                out[num_decode:] = kernels.prefill_attention(
                    prefill_q, self.kv_pool, layer, meta.prefill_chunk_tables, meta.prefill_cu_seqlens_q,
                    meta.prefill_seq_lens, self.scale, max_q_len=meta.prefill_max_q_len,
                    **_interpreter_blocks(q.device),
                )
            else:
                out[num_decode:] = kernels.prefill_attention_ref(
                    prefill_q, self.kv_pool, layer, meta.prefill_chunk_tables, meta.prefill_cu_seqlens_q,
                    meta.prefill_seq_lens, self.scale,
                )
        return out


def _interpreter_blocks(device: torch.device) -> dict:
    # The interpreter runs every program on the CPU: small tiles waste less work on padding.
    return {"block_m": 16, "block_n": 16} if device.type == "cpu" else {}
