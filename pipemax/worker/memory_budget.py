"""How much of a device's memory is left for the KV cache once the weights, the largest step's
activations and the fixed overheads are counted. One function, used by the engine to size its
pools and by the planner (autotune, `pipemax plan`) to predict them for servers not at hand."""

from __future__ import annotations

import torch

from pipemax.models import ModelConfig

# cuBLAS workspaces and allocator fragmentation, plus a CUDA-graph pool per stage.
FIXED_OVERHEAD_BYTES = 1024 * 2**20
PER_STAGE_OVERHEAD_BYTES = 512 * 2**20


def activation_bytes(config: ModelConfig, dtype: torch.dtype, max_num_batched_tokens: int, max_num_seqs: int,
                     cuda_graphs: bool) -> int:
    """Activations of the largest step: hidden states, q/k/v, the MLP's intermediate, fp32 logits
    (and the piecewise graphs' pool, which keeps the largest step's activations for the run)."""
    element = torch.tensor([], dtype=dtype).element_size()
    mlp = 3 * config.intermediate_size
    if config.moe_layers:  # the largest of a dense layer's MLP and an expert layer's buffers
        k, width = config.num_experts_per_tok, config.moe_intermediate_size
        experts = k * (3 * width + config.hidden_size) + config.hidden_size + 3 * config.shared_expert_intermediate_size
        experts += 2 * config.num_experts * 4 // element  # the router's float32 logits and probabilities
        dense = len(config.moe_layers) < config.num_layers
        mlp = max(experts, mlp if dense else 0)
    per_token = (4 * config.hidden_size + config.q_size + 2 * config.kv_size + mlp) * element
    total = max_num_batched_tokens * per_token + max_num_seqs * config.vocab_size * 4 * 2
    if cuda_graphs:
        total += max_num_batched_tokens * per_token
    return total


def kv_budget_bytes(device_bytes: int, config: ModelConfig, stage_ranges: list[tuple[int, int]],
                    dtype: torch.dtype, max_num_batched_tokens: int, max_num_seqs: int, cuda_graphs: bool) -> int:
    """KV bytes left on a device of device_bytes holding the stages in stage_ranges (may be <= 0:
    the weights and activations do not leave room)."""
    weights = sum(config.weight_bytes(dtype, start, end) for start, end in stage_ranges)
    activations = activation_bytes(config, dtype, max_num_batched_tokens, max_num_seqs, cuda_graphs)
    overhead = FIXED_OVERHEAD_BYTES + PER_STAGE_OVERHEAD_BYTES * len(stage_ranges)
    return device_bytes - weights - activations - overhead
