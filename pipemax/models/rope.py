"""Rotary position embeddings, with the frequencies computed by transformers' own rope functions
(default, linear, llama3, yarn), so scaled variants match the reference implementation."""

from __future__ import annotations

import torch


def inverse_frequencies(hf_config, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim / 2] float32, attention_scaling) as transformers computes them."""
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type == "default":
        base = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
        return 1.0 / (base**exponents), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
    return inv_freq.float(), float(attention_scaling)


class RotaryEmbedding(torch.nn.Module):
    """cos/sin per position, cached up to max_positions; applied in the rotate-half convention."""

    def __init__(self, hf_config, head_dim: int, max_positions: int, device=None):
        super().__init__()
        inv_freq, scaling = inverse_frequencies(hf_config, head_dim)
        # float32 like transformers, then cast per use; built on the device, never cast with the model.
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        angles = torch.cat([freqs, freqs], dim=-1)  # [max_positions, head_dim]
        self.register_buffer("cos", (angles.cos() * scaling).to(device), persistent=False)
        self.register_buffer("sin", (angles.sin() * scaling).to(device), persistent=False)

    def rows(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [tokens, head_dim] float32 of the step's positions, for the fused kernel."""
        return self.cos.index_select(0, positions), self.sin.index_select(0, positions)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q [tokens, heads, head_dim], k [tokens, kv_heads, head_dim] -> rotated copies."""
        cos = self.cos[positions].to(q.dtype)[:, None, :]
        sin = self.sin[positions].to(q.dtype)[:, None, :]
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)
