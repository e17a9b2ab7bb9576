"""What PipeMax needs to know of a model, read through transformers' config classes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "OPTForCausalLM": "opt",
}
# Rope variants whose frequencies do not depend on the sequence length: precomputed once.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2, or Llama with attention_bias
    o_bias: bool  # Llama with attention_bias
    mlp_bias: bool
    qk_norm: bool  # Qwen3: RMSNorm on each head of q and k before rope
    max_model_len: int  # positions PipeMax serves; capped by a sliding window it does not implement
    hf_config: object  # the transformers config, for rope initialisation
    # Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE); 0 experts: every layer dense.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0  # each expert's
    norm_topk_prob: bool = True  # the chosen experts' weights renormalised to sum to 1
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's shared expert (0: none)
    moe_layers: tuple[int, ...] = ()  # the layers whose MLP is the experts
    # OPT: learned positions (offset 2), LayerNorm with bias, a ReLU MLP (fc1, fc2), pre-LN or
    # (350m) post-LN, and word embeddings of another width projected in and out.
    is_opt: bool = False
    pre_norm: bool = True
    embed_dim: int = 0  # word_embed_proj_dim where it differs from hidden_size (0: the same)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    def layer_weight_elements(self, layer: int) -> int:
        """Weight elements of one decoder layer: attention, norms, and its MLP or its experts."""
        hidden = self.hidden_size
        attention = hidden * (self.q_size + 2 * self.kv_size) + self.q_size * hidden + 2 * hidden
        if self.is_opt:  # fc1 and fc2 with biases, two LayerNorms with biases, q/k/v/out biases
            return attention + 2 * hidden * self.intermediate_size + self.intermediate_size + 5 * hidden + self.q_size \
                + 2 * self.kv_size
        if not self.is_moe_layer(layer):
            return attention + 3 * hidden * self.intermediate_size
        experts = self.num_experts * (3 * hidden * self.moe_intermediate_size + hidden)  # + the router's rows
        shared = 3 * hidden * self.shared_expert_intermediate_size + hidden if self.shared_expert_intermediate_size else 0
        return attention + experts + shared

    def layer_active_elements(self, layer: int) -> int:
        """Weight elements one token multiplies by in a layer: with experts, only its top-k."""
        if not self.is_moe_layer(layer):
            return self.layer_weight_elements(layer)
        hidden = self.hidden_size
        attention = hidden * (self.q_size + 2 * self.kv_size) + self.q_size * hidden + 2 * hidden
        routed = self.num_experts * hidden + self.num_experts_per_tok * 3 * hidden * self.moe_intermediate_size
        shared = 3 * hidden * self.shared_expert_intermediate_size + hidden if self.shared_expert_intermediate_size else 0
        return attention + routed + shared

    def weight_bytes(self, dtype: torch.dtype, layer_start: int = 0, layer_end: int | None = None) -> int:
        """Bytes of the weights of layers [layer_start, layer_end) plus embeddings/head where held."""
        layer_end = self.num_layers if layer_end is None else layer_end
        total = sum(self.layer_weight_elements(layer) for layer in range(layer_start, layer_end))
        if self.is_opt:  # learned positions on the first stage; projections in and out
            width = self.embed_dim or self.hidden_size
            total += (self.max_position_embeddings + 2) * self.hidden_size if layer_start == 0 else 0
            total += width * self.hidden_size if self.embed_dim and layer_start == 0 else 0
            total += width * self.hidden_size if self.embed_dim and layer_end == self.num_layers else 0
            total -= (self.hidden_size - width) * self.vocab_size * ((layer_start == 0) + (layer_end == self.num_layers
                                                                                          and layer_start != 0))
        if layer_start == 0:
            total += self.vocab_size * self.hidden_size
        if layer_end == self.num_layers:
            total += self.hidden_size + (0 if self.tie_word_embeddings and layer_start == 0 else self.vocab_size * self.hidden_size)
        return total * torch.tensor([], dtype=dtype).element_size()


def model_config_from_hf(hf_config) -> ModelConfig:
    architectures = getattr(hf_config, "architectures", None) or []
    model_type_archs = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                        "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM",
                        "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                        "opt": "OPTForCausalLM"}
    architecture = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
    if architecture is None and not architectures:
        architecture = model_type_archs.get(getattr(hf_config, "model_type", None))
    if architecture is None:
        raise UnsupportedModelError(
            f"unsupported architecture {architectures or getattr(hf_config, 'model_type', '?')}; "
            f"PipeMax supports {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    family = SUPPORTED_ARCHITECTURES[architecture]
    if family == "opt":
        return _opt_config(hf_config)
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(f"rope type {rope_type!r} is not supported; PipeMax supports {SUPPORTED_ROPE_TYPES}")
    if getattr(hf_config, "partial_rotary_factor", 1.0) not in (None, 1.0):
        raise UnsupportedModelError("partial rotary embeddings are not supported")

    num_heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
    max_len = hf_config.max_position_embeddings
    window = getattr(hf_config, "sliding_window", None)
    uses_window = window is not None and (family in ("mistral", "mixtral")
                                          or getattr(hf_config, "use_sliding_window", False))
    if uses_window:
        # Within the window, full attention is exactly sliding-window attention.
        max_len = min(max_len, window)
    attention_bias = bool(getattr(hf_config, "attention_bias", False))
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"activation {hf_config.hidden_act!r}: PipeMax's {family} layers run silu")
    return ModelConfig(
        architecture=architecture,
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        rms_norm_eps=hf_config.rms_norm_eps,
        max_position_embeddings=hf_config.max_position_embeddings,
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        qkv_bias=(family == "qwen2" or family == "qwen2_moe" and bool(getattr(hf_config, "qkv_bias", True))
                  or attention_bias),
        o_bias=family in ("llama", "mistral", "qwen3", "qwen3_moe") and attention_bias,
        mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
        qk_norm=family in ("qwen3", "qwen3_moe"),
        max_model_len=max_len,
        hf_config=hf_config,
        **_experts(hf_config, family),
    )


def _opt_config(hf_config) -> ModelConfig:
    if getattr(hf_config, "activation_function", "relu") != "relu":
        raise UnsupportedModelError(f"OPT with activation {hf_config.activation_function!r}: PipeMax runs relu")
    heads, hidden = hf_config.num_attention_heads, hf_config.hidden_size
    embed = hf_config.word_embed_proj_dim
    bias = bool(getattr(hf_config, "enable_bias", True))
    if not bias or not getattr(hf_config, "layer_norm_elementwise_affine", True):
        raise UnsupportedModelError("OPT without biases or without LayerNorm weights is not supported")
    if getattr(hf_config, "_remove_final_layer_norm", False):
        raise UnsupportedModelError("OPT with _remove_final_layer_norm is not supported")
    return ModelConfig(
        architecture="OPTForCausalLM", vocab_size=hf_config.vocab_size, hidden_size=hidden,
        intermediate_size=hf_config.ffn_dim, num_layers=hf_config.num_hidden_layers, num_heads=heads,
        num_kv_heads=heads, head_dim=hidden // heads, rms_norm_eps=1e-5,
        max_position_embeddings=hf_config.max_position_embeddings,
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)), qkv_bias=True, o_bias=True,
        mlp_bias=True, qk_norm=False, max_model_len=hf_config.max_position_embeddings, hf_config=hf_config,
        is_opt=True, pre_norm=bool(hf_config.do_layer_norm_before), embed_dim=embed if embed != hidden else 0)


def _experts(hf_config, family: str) -> dict:
    """The MoE fields: Mixtral's every layer; Qwen's every decoder_sparse_step-th layer not in
    mlp_only_layers (as transformers builds them)."""
    if family == "mixtral":
        return dict(num_experts=hf_config.num_local_experts, num_experts_per_tok=hf_config.num_experts_per_tok,
                    moe_intermediate_size=hf_config.intermediate_size, norm_topk_prob=True,
                    moe_layers=tuple(range(hf_config.num_hidden_layers)))
    if family in ("qwen2_moe", "qwen3_moe"):
        experts = hf_config.num_experts
        step = getattr(hf_config, "decoder_sparse_step", 1) or 1
        dense = set(getattr(hf_config, "mlp_only_layers", None) or [])
        layers = tuple(layer for layer in range(hf_config.num_hidden_layers)
                       if layer not in dense and experts > 0 and (layer + 1) % step == 0)
        return dict(num_experts=experts, num_experts_per_tok=hf_config.num_experts_per_tok,
                    moe_intermediate_size=hf_config.moe_intermediate_size,
                    norm_topk_prob=bool(hf_config.norm_topk_prob),
                    shared_expert_intermediate_size=getattr(hf_config, "shared_expert_intermediate_size", 0) or 0,
                    moe_layers=layers)
    return {}


def load_model_config(model_path: str | Path, gguf_file: str | None = None) -> ModelConfig:
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(str(model_path), gguf_file=gguf_file)
    except ValueError as error:  # transformers' message for an unknown model_type
        raise UnsupportedModelError(f"{error}; PipeMax supports {', '.join(SUPPORTED_ARCHITECTURES)}") from error
    return model_config_from_hf(hf_config)


# What a model's step time and memory depend on: the key of step-cost and server profiles.
MODEL_SHAPE_FIELDS = ("architecture", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                      "num_kv_heads", "head_dim", "vocab_size", "num_experts", "num_experts_per_tok",
                      "moe_intermediate_size", "shared_expert_intermediate_size", "moe_layers", "pre_norm",
                      "embed_dim")


def model_shape(model_config) -> dict:
    """What a model's step time and memory depend on, as JSON values (tuples as lists)."""
    shape = {name: getattr(model_config, name, None) for name in MODEL_SHAPE_FIELDS}
    return {name: list(value) if isinstance(value, tuple) else value for name, value in shape.items()}
