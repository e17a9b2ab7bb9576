"""The attention interface between models and kernels.

A model layer hands q, k, v of the step's tokens to `ChunkedAttention`; it stores k, v into the
stage's GPU KV pool and attends through the chunk tables in `AttentionMetadata`. The worker's
model runner builds the metadata (it knows the sequences); models never see requests or block ids beyond it.

Token order in a step: the decode tokens first (one per decoding sequence), then the prefill
tokens of each prefilling sequence, packed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipemax import kernels

ATTENTION_BACKENDS = ("triton", "torch")


def add_kv_scale_buffer(layer: torch.nn.Module, device=None) -> None:
    """A decoder layer's checkpoint KV scales (k_scale, v_scale; 0 = none in the checkpoint),
    float32 whatever the model's dtype: used only by an fp8 KV cache."""
    layer.register_buffer("kv_scale", torch.zeros(2, dtype=torch.float32, device=device), persistent=False)


def checkpoint_kv_scales(layers) -> torch.Tensor | None:
    """The stage's checkpoint KV scales [layers, 2] float32, or None when the checkpoint has none."""
    scales = torch.stack([layer.kv_scale.float() for layer in layers])
    return scales.contiguous() if bool((scales > 0).any()) else None


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
    # CUDA graphs: decode attention launches decode_max_splits programs per sequence and uses as
    # many as the device-side plan, computed each step from the real lengths, says.
    decode_max_splits: int | None = None
    decode_split_plan: torch.Tensor | None = None


class LayerOps:
    """The element-wise work of a decoder layer, fused: Triton kernels, or their torch
    references (the unfused model code) on the torch backend."""

    def __init__(self, backend: str):
        triton_backend = backend == "triton"
        self.rms_norm = kernels.rms_norm if triton_backend else kernels.rms_norm_ref
        self.silu_and_mul = kernels.silu_and_mul if triton_backend else kernels.silu_and_mul_ref
        self.rope_store_kv = kernels.rope_store_kv if triton_backend else kernels.rope_store_kv_ref
        self.moe_experts = kernels.moe_experts if triton_backend else kernels.moe_experts_ref
        self.store_kv = kernels.store_kv if triton_backend else kernels.store_kv_ref


class ChunkedAttention:
    """Store new K/V, then decode and prefill attention, over one stage's GPU pool.

    An fp8 pool comes with its scales (kv_scales [chunks, layers, 2, chunk_tokens, kv_heads]
    float32), and optionally a checkpoint's fixed per-layer scales ([layers, 2]; kernels/fp8.py)."""

    def __init__(self, kv_pool: torch.Tensor, backend: str, scale: float, kv_scales: torch.Tensor | None = None,
                 fixed_scales: torch.Tensor | None = None):
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
        self.kv_pool = kv_pool
        self.kv_scales = kv_scales
        self.fixed_scales = fixed_scales
        self.backend = backend
        self.scale = scale
        self.ops = LayerOps(backend)
        # Called with the layer index right after each layer's K/V are stored, in eager steps
        # only (the worker writes KV through to the host from there); None: nothing to call.
        self.after_store = None

    def rotate_store(self, layer: int, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                     slot_mapping: torch.Tensor, q_norm_weight=None, k_norm_weight=None,
                     eps: float = 1e-6, q_out: torch.Tensor | None = None) -> torch.Tensor:
        """From a layer's fused qkv projection [tokens, (heads + 2 kv_heads) * dim]: rotary
        embedding (and q/k norm) fused with the KV store in one launch. Returns q [tokens, heads,
        dim], rotated in place in qkv, or written into q_out."""
        q = self.ops.rope_store_kv(qkv, cos, sin, self.kv_pool, layer, slot_mapping, num_heads,
                                   q_norm_weight, k_norm_weight, eps, q_out=q_out, kv_scales=self.kv_scales,
                                   fixed_scales=self.fixed_scales)
        if self.after_store is not None:
            self.after_store(layer)
        return q

    def store(self, layer: int, qkv: torch.Tensor, num_heads: int, num_kv_heads: int,
              slot_mapping: torch.Tensor, q_out: torch.Tensor | None = None) -> torch.Tensor:
        """From a fused qkv projection, the KV store alone (models without rotary embeddings, such
        as OPT's learned positions). Returns q [tokens, heads, dim], a view of qkv (or q_out, a copy)."""
        tokens, head_dim = qkv.shape[0], qkv.shape[1] // (num_heads + 2 * num_kv_heads)
        q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=1)
        self.ops.store_kv(k.view(tokens, num_kv_heads, head_dim), v.view(tokens, num_kv_heads, head_dim),
                          self.kv_pool, layer, slot_mapping, self.kv_scales, self.fixed_scales)
        if self.after_store is not None:
            self.after_store(layer)
        if q_out is not None:
            return q_out.copy_(q.view(tokens, num_heads, head_dim))
        return q.view(tokens, num_heads, head_dim)

    def attend(self, layer: int, q: torch.Tensor, meta: AttentionMetadata,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """Decode and prefill attention of q [tokens, heads, dim] over the stored KV, into out
        [tokens, heads * dim] (the o_proj input; a new tensor by default)."""
        triton_backend = self.backend == "triton"
        num_decode = meta.num_decode_tokens
        if out is None:
            out = torch.empty(q.shape[0], q.shape[1] * q.shape[2], dtype=q.dtype, device=q.device)
        result, out = out, out.view(q.shape)
        # The kernels write straight into `out`, the o_proj input (the references return a copy).
        if num_decode:
            if triton_backend:
                kernels.decode_attention(
                    q[:num_decode], self.kv_pool, layer, meta.decode_chunk_tables, meta.decode_seq_lens, self.scale,
                    max_seq_len=meta.decode_max_seq_len, out=out[:num_decode],
                    num_splits=meta.decode_max_splits, split_plan=meta.decode_split_plan, kv_scales=self.kv_scales,
                )
            else:
                out[:num_decode] = kernels.decode_attention_ref(
                    q[:num_decode], self.kv_pool, layer, meta.decode_chunk_tables, meta.decode_seq_lens, self.scale,
                    self.kv_scales,
                )
        if q.shape[0] > num_decode:
            prefill_q = q[num_decode:]
            if triton_backend:
                kernels.prefill_attention(
                    prefill_q, self.kv_pool, layer, meta.prefill_chunk_tables, meta.prefill_cu_seqlens_q,
                    meta.prefill_seq_lens, self.scale, max_q_len=meta.prefill_max_q_len, out=out[num_decode:],
                    kv_scales=self.kv_scales, **_interpreter_blocks(q.device),
                )
            else:
                out[num_decode:] = kernels.prefill_attention_ref(
                    prefill_q, self.kv_pool, layer, meta.prefill_chunk_tables, meta.prefill_cu_seqlens_q,
                    meta.prefill_seq_lens, self.scale, self.kv_scales,
                )
        return result


def _interpreter_blocks(device: torch.device) -> dict:
    # The interpreter runs every program on the CPU: small tiles waste less work on padding.
    return {"block_m": 16, "block_n": 16} if device.type == "cpu" else {}
