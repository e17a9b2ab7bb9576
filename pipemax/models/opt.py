"""OPT (`OPTForCausalLM`), the family FlexGen runs: learned positions with OPT's offset of 2,
LayerNorm with biases, a ReLU MLP (fc1, fc2), biases everywhere, multi-head attention without
rotary embeddings, and the 350m variant's post-LN layers and word embeddings of another width
(projected in and out). The same interface as the Llama family (begin, layers with
before_attention / after_attention, finish, stage), so the worker, pipeline stages, offload and
CUDA graphs treat it alike. Numerics as transformers: each op in the dtype, LayerNorm through
torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionMetadata, ChunkedAttention, add_kv_scale_buffer, checkpoint_kv_scales
from .config import ModelConfig

POSITION_OFFSET = 2  # OPT's learned positions start at row 2 (rows 0 and 1 were for padding)


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.config = config
        self.self_attn_layer_norm = nn.LayerNorm(hidden, eps=eps, **factory)
        add_kv_scale_buffer(self, device)
        self.qkv_proj = nn.Linear(hidden, 3 * hidden, bias=True, **factory)
        self.o_proj = nn.Linear(hidden, hidden, bias=True, **factory)
        self.final_layer_norm = nn.LayerNorm(hidden, eps=eps, **factory)
        self.fc1 = nn.Linear(hidden, config.intermediate_size, bias=True, **factory)
        self.fc2 = nn.Linear(config.intermediate_size, hidden, bias=True, **factory)

    def forward(self, layer, hidden, residual, cos, sin, attention: ChunkedAttention, meta: AttentionMetadata):
        q, residual = self.before_attention(layer, hidden, residual, cos, sin, attention, meta.slot_mapping)
        return self.after_attention(attention.attend(layer, q, meta), residual, attention)

    def before_attention(self, layer, hidden, residual, cos, sin, attention: ChunkedAttention, slot_mapping,
                         q_out=None):
        """(q, the layer's input): the input, normed first in pre-LN layers, projected; K/V stored."""
        x = hidden if residual is None else hidden + residual
        qkv = self.qkv_proj(self.self_attn_layer_norm(x) if self.config.pre_norm else x)
        config = self.config
        return attention.store(layer, qkv, config.num_heads, config.num_kv_heads, slot_mapping, q_out=q_out), x

    def after_attention(self, attn, residual, attention: ChunkedAttention):
        """(hidden, residual) whose sum is the layer's output (pre-LN), or (output, None) (post-LN)."""
        h = residual + self.o_proj(attn)
        if self.config.pre_norm:
            return self.fc2(F.relu(self.fc1(self.final_layer_norm(h)))), h
        h = self.self_attn_layer_norm(h)
        return self.final_layer_norm(h + self.fc2(F.relu(self.fc1(h)))), None


class OPTModel(nn.Module):
    """Layers [layer_start, layer_end) of an OPT model; the first stage holds the word and
    position embeddings (and project_in), the last the final LayerNorm, project_out and the head."""

    def __init__(self, config: ModelConfig, layer_start: int = 0, layer_end: int | None = None,
                 device=None, dtype=torch.float32):
        super().__init__()
        layer_end = config.num_layers if layer_end is None else layer_end
        if not 0 <= layer_start < layer_end <= config.num_layers:
            raise ValueError(f"layer range [{layer_start}, {layer_end}) is not within the model's {config.num_layers} layers")
        factory = dict(device=device, dtype=dtype)
        hidden, width = config.hidden_size, config.embed_dim or config.hidden_size
        self.config = config
        self.layer_start, self.layer_end = layer_start, layer_end
        self.is_first, self.is_last = layer_start == 0, layer_end == config.num_layers
        if self.is_first:
            self.embed_tokens = nn.Embedding(config.vocab_size, width, **factory)
            self.embed_positions = nn.Embedding(config.max_position_embeddings + POSITION_OFFSET, hidden, **factory)
            if config.embed_dim:
                self.project_in = nn.Linear(width, hidden, bias=False, **factory)
        self.layers = nn.ModuleList(OPTDecoderLayer(config, **factory) for _ in range(layer_start, layer_end))
        if self.is_last:
            if config.pre_norm:
                self.norm = nn.LayerNorm(hidden, eps=config.rms_norm_eps, **factory)
            if config.embed_dim:
                self.project_out = nn.Linear(hidden, width, bias=False, **factory)
            self.lm_head = nn.Linear(width, config.vocab_size, bias=False, **factory)
            if config.tie_word_embeddings and self.is_first:
                self.lm_head.weight = self.embed_tokens.weight

    def kv_cache_scales(self) -> torch.Tensor | None:
        """The checkpoint's k_scale / v_scale of this stage's layers [layers, 2], or None."""
        return checkpoint_kv_scales(self.layers)

    def stage(self, layer_start: int, layer_end: int) -> OPTModel:
        """Layers [layer_start, layer_end) as a stage of their own, sharing the parameters."""
        if not self.layer_start <= layer_start < layer_end <= self.layer_end:
            raise ValueError(f"stage [{layer_start}, {layer_end}) is outside this model's layers "
                             f"[{self.layer_start}, {self.layer_end})")
        view = OPTModel.__new__(OPTModel)
        nn.Module.__init__(view)
        view.config = self.config
        view.layer_start, view.layer_end = layer_start, layer_end
        view.is_first, view.is_last = layer_start == 0, layer_end == self.config.num_layers
        for name in ("embed_tokens", "embed_positions", "project_in") if view.is_first else ():
            if hasattr(self, name):
                setattr(view, name, getattr(self, name))
        view.layers = nn.ModuleList(self.layers[layer_start - self.layer_start:layer_end - self.layer_start])
        for name in ("norm", "project_out", "lm_head") if view.is_last else ():
            if hasattr(self, name):
                setattr(view, name, getattr(self, name))
        return view

    @property
    def num_stage_layers(self) -> int:
        return self.layer_end - self.layer_start

    def forward(self, inputs: torch.Tensor, positions: torch.Tensor, attention: ChunkedAttention,
                meta: AttentionMetadata) -> torch.Tensor:
        hidden, cos, sin = self.begin(inputs, positions)
        residual = None
        for layer, module in enumerate(self.layers):
            hidden, residual = module(layer, hidden, residual, cos, sin, attention, meta)
        return self.finish(hidden, residual, attention)

    def begin(self, inputs: torch.Tensor, positions: torch.Tensor):
        """(hidden, None, None): no rotary tables; the first stage adds the learned positions."""
        if not self.is_first:
            return inputs, None, None
        words = self.embed_tokens(inputs)
        if self.config.embed_dim:
            words = self.project_in(words)
        return words + self.embed_positions(positions + POSITION_OFFSET), None, None

    def finish(self, hidden: torch.Tensor, residual: torch.Tensor | None, attention: ChunkedAttention):
        hidden = hidden if residual is None else hidden + residual
        if self.is_last:
            if self.config.pre_norm:
                hidden = self.norm(hidden)
            if self.config.embed_dim:
                hidden = self.project_out(hidden)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in the model's dtype: greedy's argmax reads them as they are (the same choice as
        on their float32 copy), and the sampler upcasts only what it computes with."""
        return self.lm_head(hidden)
