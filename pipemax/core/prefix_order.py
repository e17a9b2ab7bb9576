"""Prefix-aware order of an offline batch (issue 12): the whole batch is known before it starts,
so requests that share a prompt prefix are run together, while that prefix's chunks are cached,
and groups are spread over data-parallel replicas so that none computes a prefix another holds
(the micro-batches of one replica share its cache: they need no spreading).

Pure functions over token ids; the batch job still writes each result as its request finishes,
so the order changes when results arrive, never what they are.
"""

from __future__ import annotations

from .prefix_index import chunk_keys


def group_by_prefix(prompts: list[list[int]], chunk_tokens: int, keys: list[list[int]] | None = None) -> list[list[int]]:
    """Request indices grouped by their first full chunk (requests without one stand alone), and
    within a group sorted so that longer shared chains sit together (a trie's depth-first order).
    Groups keep the order of their first request; ties keep submission order. keys: each
    prompt's chunk_keys, when the caller has them already."""
    groups: dict[object, list[int]] = {}
    if keys is None:
        keys = [chunk_keys(prompt, chunk_tokens) for prompt in prompts]
    for index, chain in enumerate(keys):
        groups.setdefault(chain[0] if chain else ("alone", index), []).append(index)
    return [sorted(members, key=lambda i: (keys[i], i)) for members in groups.values()]


def prefix_order(prompts: list[list[int]], chunk_tokens: int, keys: list[list[int]] | None = None) -> list[int]:
    """Every request index once: sharers adjacent, deepest shared chains next to each other."""
    return [index for group in group_by_prefix(prompts, chunk_tokens, keys) for index in group]


def balance_groups(groups: list[list[int]], weights: list[int], parts: int) -> list[list[int]]:
    """Assign groups to `parts` (data-parallel replicas), each on the lightest part so far, the
    heaviest first (weights: each request's tokens), so that a prefix is computed on one part only.
    A group heavier than a part's fair share is cut (in its order, so deeper shared chains stay
    together) into pieces of at most that share: all parts then stay busy, each piece computing
    the prefix once. Each part keeps its requests in the order of `groups` (prefix order)."""
    share = sum(weights) / parts
    pieces = []
    for group in groups:
        piece, load = [], 0
        for index in group:
            if piece and load + weights[index] > share:
                pieces.append(piece)
                piece, load = [], 0
            piece.append(index)
            load += weights[index]
        pieces.append(piece)
    loads = [0] * parts
    assigned: list[list[int]] = [[] for _ in range(parts)]
    position = {index: rank for rank, index in enumerate(i for group in groups for i in group)}
    for piece in sorted(pieces, key=lambda p: (-sum(weights[i] for i in p), position[p[0]])):
        lightest = min(range(parts), key=lambda part: (loads[part], part))
        assigned[lightest] += piece
        loads[lightest] += sum(weights[i] for i in piece)
    return [sorted(part, key=position.__getitem__) for part in assigned]
