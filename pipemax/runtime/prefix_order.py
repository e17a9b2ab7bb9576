"""Prefix-aware order of an offline batch (issue 12): the whole batch is known before it starts,
so requests that share a prompt prefix are run together, while that prefix's chunks are cached,
and groups are spread over micro-batches or replicas so that none computes a prefix another holds.

Pure functions over token ids; the batch job still writes each result as its request finishes,
so the order changes when results arrive, never what they are.
"""

from __future__ import annotations

from .prefix_index import chunk_keys


def group_by_prefix(prompts: list[list[int]], chunk_tokens: int) -> list[list[int]]:
    """Request indices grouped by their first full chunk (requests without one stand alone), and
    within a group sorted so that longer shared chains sit together (a trie's depth-first order).
    Groups keep the order of their first request; ties keep submission order."""
    groups: dict[object, list[int]] = {}
    keys = [chunk_keys(prompt, chunk_tokens) for prompt in prompts]
    for index, chain in enumerate(keys):
        groups.setdefault(chain[0] if chain else ("alone", index), []).append(index)
    return [sorted(members, key=lambda i: (keys[i], i)) for members in groups.values()]


def prefix_order(prompts: list[list[int]], chunk_tokens: int) -> list[int]:
    """Every request index once: sharers adjacent, deepest shared chains next to each other."""
    return [index for group in group_by_prefix(prompts, chunk_tokens) for index in group]


def balance_groups(groups: list[list[int]], weights: list[int], parts: int) -> list[list[int]]:
    """Assign whole groups to `parts` (micro-batches or replicas), largest first to the lightest
    part (weights: each request's tokens), so a prefix is computed on one part only. Each part
    keeps its requests in their order within the input."""
    loads = [0] * parts
    assigned: list[list[int]] = [[] for _ in range(parts)]
    position = {index: rank for rank, index in enumerate(i for group in groups for i in group)}
    for group in sorted(groups, key=lambda g: (-sum(weights[i] for i in g), position[g[0]])):
        lightest = min(range(parts), key=lambda part: (loads[part], part))
        assigned[lightest] += group
        loads[lightest] += sum(weights[i] for i in group)
    return [sorted(part, key=position.__getitem__) for part in assigned]
