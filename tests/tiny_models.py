"""Tiny random transformers models of every supported family, built on the CPU in milliseconds."""

from __future__ import annotations

import torch
import transformers

COMMON = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=211, max_position_embeddings=512, rms_norm_eps=1e-6,
    # Larger than the default 0.02 so random logits have clear winners: greedy comparisons
    # then test the engine, not float rounding between near-equal logits.
    initializer_range=0.3,
)

OPT_COMMON = dict(hidden_size=64, ffn_dim=96, num_hidden_layers=3, num_attention_heads=4, vocab_size=211,
                  max_position_embeddings=512, init_std=0.3, word_embed_proj_dim=64, pad_token_id=1)

FAMILIES = {
    "llama3": lambda: transformers.LlamaConfig(**COMMON, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
    "llama-bias": lambda: transformers.LlamaConfig(**COMMON, attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON),
    "qwen3": lambda: transformers.Qwen3Config(**{**COMMON, "num_attention_heads": 4}, head_dim=32, tie_word_embeddings=True),
    # Mixture of experts: 4-5 experts, 2 per token; Qwen2-MoE with a shared expert and a dense layer.
    "mixtral": lambda: transformers.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2,
                                                  sliding_window=None),
    "qwen2-moe": lambda: transformers.Qwen2MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2,
                                                     moe_intermediate_size=48, shared_expert_intermediate_size=80,
                                                     mlp_only_layers=[1], norm_topk_prob=False),
    "qwen3-moe": lambda: transformers.Qwen3MoeConfig(**COMMON, head_dim=32, num_experts=5, num_experts_per_tok=2,
                                                     moe_intermediate_size=48, norm_topk_prob=True),
    # OPT: learned positions, LayerNorm, ReLU; the 350m shape (post-LN, word embeddings of another width).
    "opt": lambda: transformers.OPTConfig(**OPT_COMMON),
    "opt-350m": lambda: transformers.OPTConfig(**{**OPT_COMMON, "word_embed_proj_dim": 32}, do_layer_norm_before=False),
}
MODEL_CLASSES = {
    "llama3": transformers.LlamaForCausalLM,
    "llama-bias": transformers.LlamaForCausalLM,
    "mistral": transformers.MistralForCausalLM,
    "qwen2": transformers.Qwen2ForCausalLM,
    "qwen3": transformers.Qwen3ForCausalLM,
    "mixtral": transformers.MixtralForCausalLM,
    "qwen2-moe": transformers.Qwen2MoeForCausalLM,
    "qwen3-moe": transformers.Qwen3MoeForCausalLM,
    "opt": transformers.OPTForCausalLM,
    "opt-350m": transformers.OPTForCausalLM,
}


def tiny_hf_model(family: str, seed: int = 0, **overrides):
    config = FAMILIES[family]()
    for key, value in overrides.items():
        setattr(config, key, value)
    if getattr(config, "layer_types", None) is not None:  # one entry per layer, made with the config
        config.layer_types = [config.layer_types[0]] * config.num_hidden_layers
    torch.manual_seed(seed)
    model = MODEL_CLASSES[family](config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if family == "llama-bias" and name.endswith("bias"):  # biases start at zero: make them matter
                param.normal_(0, 0.3)
            if name.endswith(("gate.weight", "shared_expert_gate.weight")) and "proj" not in name:
                param.normal_(0, 0.3)  # routers may start at zero: every expert tied
    return model


def save_tiny_model(family: str, folder, seed: int = 0, max_shard_size=None, **overrides):
    model = tiny_hf_model(family, seed, **overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return model
