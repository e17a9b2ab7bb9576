"""Splitting a model's layers into pipeline stages: contiguous ranges, balanced by cost.

A stage's cost is the time its share of a step takes, which for the memory-bound decode steps
that dominate offline jobs follows the bytes of weights it reads: its decoder layers, plus on the
last stage the final norm and the LM head (a vocab x hidden matmul, as large as several layers
on small models). The embedding is a lookup of a few rows: its table sits on the first stage but
costs next to no time. The split minimises the most expensive stage (the pipeline runs at the
pace of its slowest stage).
"""

from __future__ import annotations

from pipemax.models import ModelConfig


class PartitionError(ValueError):
    pass


def layer_costs(config: ModelConfig) -> tuple[list[float], float]:
    """(cost of each decoder layer, cost of the last stage's norm + LM head), in weight elements."""
    head = config.vocab_size * config.hidden_size + config.hidden_size
    return [float(config.layer_weight_elements(layer)) for layer in range(config.num_layers)], float(head)


def partition_layers(config: ModelConfig, num_stages: int, stage_layers: list[int] | None = None
                     ) -> list[tuple[int, int]]:
    """[(layer_start, layer_end)] per stage."""
    num_layers = config.num_layers
    if num_stages < 1:
        raise PartitionError(f"pipeline parallel size must be at least 1, got {num_stages}")
    if num_stages > num_layers:
        raise PartitionError(f"{num_stages} pipeline stages for a model of {num_layers} layers: every stage needs "
                             f"at least one layer, so use at most {num_layers}")
    if stage_layers is not None:
        if len(stage_layers) != num_stages:
            raise PartitionError(f"stage layers name {len(stage_layers)} stages for a pipeline of {num_stages}")
        if any(count < 1 for count in stage_layers):
            raise PartitionError(f"every stage needs at least one layer, got {stage_layers}")
        if sum(stage_layers) != num_layers:
            raise PartitionError(f"stage layers {stage_layers} sum to {sum(stage_layers)}, but the model has "
                                 f"{num_layers} layers")
        return _ranges(stage_layers)
    costs, head = layer_costs(config)
    return _ranges(_balanced_counts(costs, head, num_stages))


def _ranges(counts: list[int]) -> list[tuple[int, int]]:
    ranges, start = [], 0
    for count in counts:
        ranges.append((start, start + count))
        start += count
    return ranges


def _balanced_counts(costs: list[float], head: float, num_stages: int) -> list[int]:
    """Layers per stage minimising the largest stage cost (dynamic programming over prefixes).
    Ties go to the split that puts fewer layers on the last stage, which also carries the head."""
    n = len(costs)
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)
    inf = float("inf")
    # best[s][i]: the smallest possible largest cost of splitting layers [0, i) into s stages.
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for stages in range(1, num_stages + 1):
        last = stages == num_stages
        for end in range(stages, n + 1):
            for start in range(stages - 1, end):
                cost = prefix[end] - prefix[start] + (head if last and end == n else 0.0)
                value = max(best[stages - 1][start], cost)
                if value < best[stages][end] or (value == best[stages][end] and start > cut[stages][end]):
                    best[stages][end], cut[stages][end] = value, start
    counts, end = [], n
    for stages in range(num_stages, 0, -1):
        start = cut[stages][end]
        counts.append(end - start)
        end = start
    return counts[::-1]
