"""One wrapper for the Llama family: Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5 (qkv bias), Qwen3
(q/k RMSNorm). A model object holds a contiguous range of layers (a pipeline stage): the first
stage also holds the embedding, the last the final norm and the LM head.

Projections are fused (q|k|v, gate|up) for fewer, larger matmuls; the loader concatenates the
checkpoint's separate weights. Between the matmuls a layer launches three fused kernels (layer
ops, see models/attention.py): residual add + RMSNorm (twice), rotary embedding + q/k norm + KV
store, SiLU x up; the residual travels beside the hidden state and is added inside the next
norm. cos/sin rows are gathered once per step for all layers. Numerics follow transformers
(RMSNorm in float32, rope cos/sin in float32 then cast, each op rounded to the dtype), so float32
outputs match it closely.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import AttentionMetadata, ChunkedAttention, add_kv_scale_buffer, checkpoint_kv_scales
from .config import ModelConfig
from .rope import RotaryEmbedding


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(input_dtype)


class MoEBlock(nn.Module):
    """A mixture-of-experts MLP: a router picks each token's top-k experts (softmax in float32,
    renormalised over the chosen ones where the family does), the routed experts run as grouped
    GEMMs over tokens sorted by expert (kernels/moe_gemm.py), plus Qwen2-MoE's shared expert
    behind a sigmoid gate. Expert weights are transformers' fused [experts, 2 * I, hidden] and
    [experts, hidden, I]."""

    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        hidden, experts, intermediate = config.hidden_size, config.num_experts, config.moe_intermediate_size
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        # Qwen's routers hand the experts their weights in the model's dtype; Mixtral's in float32.
        self.weights_in_dtype = config.architecture != "MixtralForCausalLM"
        self.router = nn.Linear(hidden, experts, bias=False, **factory)
        self.experts_gate_up = nn.Parameter(torch.empty(experts, 2 * intermediate, hidden, **factory))
        self.experts_down = nn.Parameter(torch.empty(experts, hidden, intermediate, **factory))
        shared = config.shared_expert_intermediate_size
        self.has_shared = shared > 0
        if self.has_shared:
            self.shared_gate_up_proj = nn.Linear(hidden, 2 * shared, bias=False, **factory)
            self.shared_down_proj = nn.Linear(shared, hidden, bias=False, **factory)
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False, **factory)

    def forward(self, x: torch.Tensor, ops) -> torch.Tensor:
        logits = self.router(x)
        weights, chosen = torch.softmax(logits.float(), dim=-1).topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.weights_in_dtype:
            weights = weights.to(x.dtype)
        out = ops.moe_experts(x, chosen, weights, self.experts_gate_up, self.experts_down)
        if self.has_shared:
            shared = self.shared_down_proj(ops.silu_and_mul(self.shared_gate_up_proj(x)))
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * shared
        return out


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, device=None, dtype=None, moe: bool = False):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.config = config
        hidden = config.hidden_size
        self.input_layernorm = RMSNorm(hidden, config.rms_norm_eps, **factory)
        add_kv_scale_buffer(self, device)
        self.qkv_proj = nn.Linear(hidden, config.q_size + 2 * config.kv_size, bias=config.qkv_bias, **factory)
        self.o_proj = nn.Linear(config.q_size, hidden, bias=config.o_bias, **factory)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, **factory)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, **factory)
        self.post_attention_layernorm = RMSNorm(hidden, config.rms_norm_eps, **factory)
        if moe:
            self.moe = MoEBlock(config, **factory)
        else:
            self.gate_up_proj = nn.Linear(hidden, 2 * config.intermediate_size, bias=config.mlp_bias, **factory)
            self.down_proj = nn.Linear(config.intermediate_size, hidden, bias=config.mlp_bias, **factory)

    def forward(self, layer, hidden, residual, cos, sin, attention: ChunkedAttention, meta: AttentionMetadata):
        """(hidden, residual) in and out, the residual add fused into the next norm: the layer's
        output is hidden + residual. residual None: hidden is the layer's whole input."""
        q, residual = self.before_attention(layer, hidden, residual, cos, sin, attention, meta.slot_mapping)
        return self.after_attention(attention.attend(layer, q, meta), residual, attention)

    def before_attention(self, layer, hidden, residual, cos, sin, attention: ChunkedAttention, slot_mapping,
                         q_out=None):
        """Norm (with the residual add), the qkv projection, rotary + KV store: (q, residual), q
        written into q_out when given. Everything here has the step's token count as its only
        shape: graph-capturable."""
        config, ops, eps = self.config, attention.ops, self.config.rms_norm_eps
        if residual is None:
            residual = hidden
            normed = ops.rms_norm(hidden, self.input_layernorm.weight, eps)
        else:  # residual <- hidden + residual; normed <- norm(residual), written over hidden
            normed = ops.rms_norm(hidden, self.input_layernorm.weight, eps, residual, out=hidden)
        qkv = self.qkv_proj(normed)
        norms = (self.q_norm.weight, self.k_norm.weight) if config.qk_norm else (None, None)
        q = attention.rotate_store(layer, qkv, cos, sin, config.num_heads, slot_mapping, *norms, eps=eps, q_out=q_out)
        return q, residual

    def after_attention(self, attn, residual, attention: ChunkedAttention):
        """The output projection, norm (with the residual add), the MLP: (hidden, residual)."""
        ops, eps = attention.ops, self.config.rms_norm_eps
        hidden = self.o_proj(attn)
        normed = ops.rms_norm(hidden, self.post_attention_layernorm.weight, eps, residual, out=hidden)
        if hasattr(self, "moe"):
            return self.moe(normed, ops), residual
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(normed))), residual


class LlamaFamilyModel(nn.Module):
    """Layers [layer_start, layer_end) of a Llama-family model."""

    def __init__(self, config: ModelConfig, layer_start: int = 0, layer_end: int | None = None,
                 device=None, dtype=torch.float32):
        super().__init__()
        layer_end = config.num_layers if layer_end is None else layer_end
        if not 0 <= layer_start < layer_end <= config.num_layers:
            raise ValueError(f"layer range [{layer_start}, {layer_end}) is not within the model's {config.num_layers} layers")
        factory = dict(device=device, dtype=dtype)
        self.config = config
        self.layer_start, self.layer_end = layer_start, layer_end
        self.is_first, self.is_last = layer_start == 0, layer_end == config.num_layers
        if self.is_first:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, **factory)
        self.layers = nn.ModuleList(DecoderLayer(config, **factory, moe=config.is_moe_layer(layer))
                                    for layer in range(layer_start, layer_end))
        if self.is_last:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **factory)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, **factory)
            if config.tie_word_embeddings and self.is_first:
                self.lm_head.weight = self.embed_tokens.weight  # one tensor, as in the checkpoint
        self.rotary = RotaryEmbedding(config.hf_config, config.head_dim, config.max_model_len, device=device)

    def stage(self, layer_start: int, layer_end: int) -> LlamaFamilyModel:
        """Layers [layer_start, layer_end) of this model as a stage of its own, sharing the
        parameters (no copy): how one process holds every stage of an in-process pipeline."""
        if not self.layer_start <= layer_start < layer_end <= self.layer_end:
            raise ValueError(f"stage [{layer_start}, {layer_end}) is outside this model's layers "
                             f"[{self.layer_start}, {self.layer_end})")
        view = LlamaFamilyModel.__new__(LlamaFamilyModel)
        nn.Module.__init__(view)
        view.config = self.config
        view.layer_start, view.layer_end = layer_start, layer_end
        view.is_first, view.is_last = layer_start == 0, layer_end == self.config.num_layers
        if view.is_first:
            view.embed_tokens = self.embed_tokens
        view.layers = nn.ModuleList(self.layers[layer_start - self.layer_start:layer_end - self.layer_start])
        if view.is_last:
            view.norm, view.lm_head = self.norm, self.lm_head
        view.rotary = self.rotary
        return view

    def kv_cache_scales(self) -> torch.Tensor | None:
        """The checkpoint's k_scale / v_scale of this stage's layers [layers, 2], or None."""
        return checkpoint_kv_scales(self.layers)

    @property
    def num_stage_layers(self) -> int:
        return self.layer_end - self.layer_start

    def forward(self, inputs: torch.Tensor, positions: torch.Tensor, attention: ChunkedAttention,
                meta: AttentionMetadata) -> torch.Tensor:
        """inputs: token ids [tokens] on the first stage, hidden states [tokens, hidden] elsewhere.
        Returns hidden states; on the last stage after the final norm."""
        hidden, cos, sin = self.begin(inputs, positions)
        residual = None
        for layer, module in enumerate(self.layers):
            hidden, residual = module(layer, hidden, residual, cos, sin, attention, meta)
        return self.finish(hidden, residual, attention)

    def begin(self, inputs: torch.Tensor, positions: torch.Tensor):
        """(hidden, cos, sin) at the start of the stage: cos/sin rows once per step, for all layers."""
        hidden = self.embed_tokens(inputs) if self.is_first else inputs
        cos, sin = self.rotary.rows(positions)
        return hidden, cos, sin

    def finish(self, hidden: torch.Tensor, residual: torch.Tensor | None, attention: ChunkedAttention):
        """The stage's output: on the last stage the final norm (taking the last residual add),
        elsewhere the whole hidden state for the next stage."""
        if self.is_last:
            return attention.ops.rms_norm(hidden, self.norm.weight, self.config.rms_norm_eps, residual, out=hidden)
        return hidden if residual is None else hidden + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in the model's dtype: greedy's argmax reads them as they are (the same choice as
        on their float32 copy), and the sampler upcasts only what it computes with."""
        return self.lm_head(hidden)
