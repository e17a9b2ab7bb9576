"""Prefix-aware ordering: a permutation of the batch where requests sharing a prefix sit together
(deeper shared chains together too), and groups spread whole over micro-batches or replicas with
loads within one group's weight of each other."""

from hypothesis import given
from hypothesis import strategies as st

from pipemax.core.prefix_index import chunk_keys
from pipemax.core.prefix_order import balance_groups, group_by_prefix, prefix_order

CHUNK = 4
HEADS = [[1, 2, 3, 4], [5, 6, 7, 8], [1, 2, 3, 9]]  # the first and third differ only in their last token
SECONDS = [[0, 0, 0, 0], [1, 1, 1, 1]]
prompt = st.builds(lambda head, second, tail: HEADS[head] + SECONDS[second] + tail,
                   st.integers(0, 2), st.integers(0, 1), st.lists(st.integers(0, 3), max_size=6)) | \
    st.lists(st.integers(0, 3), max_size=3)  # shorter than a chunk: no prefix to share
batches = st.lists(prompt, min_size=1, max_size=30)


def contiguous(order, members):
    positions = sorted(order.index(i) for i in members)
    return positions == list(range(positions[0], positions[0] + len(positions)))


@given(batches)
def test_sharers_sit_together_at_every_depth(prompts):
    order = prefix_order(prompts, CHUNK)
    assert sorted(order) == list(range(len(prompts)))
    for depth in (1, 2):
        chains: dict[tuple, list[int]] = {}
        for index, tokens in enumerate(prompts):
            keys = chunk_keys(tokens, CHUNK)
            if len(keys) >= depth:
                chains.setdefault(tuple(keys[:depth]), []).append(index)
        for members in chains.values():
            assert contiguous(order, members)


@given(batches, st.integers(1, 5))
def test_groups_spread_whole_and_balanced(prompts, parts):
    groups = group_by_prefix(prompts, CHUNK)
    weights = [len(tokens) + 1 for tokens in prompts]
    assigned = balance_groups(groups, weights, parts)
    assert len(assigned) == parts and sorted(i for part in assigned for i in part) == list(range(len(prompts)))
    part_of = {i: p for p, part in enumerate(assigned) for i in part}
    share = sum(weights) / parts
    for group in groups:  # a prefix on one part only, unless its group is more than a part's share
        if sum(weights[i] for i in group) <= share:
            assert len({part_of[i] for i in group}) == 1
    loads = [sum(weights[i] for i in part) for part in assigned]
    assert max(loads) - min(loads) <= max(share, max(weights))
    for part in assigned:  # submission-relative order kept within a part
        order = prefix_order(prompts, CHUNK)
        assert part == sorted(part, key=order.index)


def test_a_group_heavier_than_a_share_keeps_every_replica_busy():
    prompts = [HEADS[0] + [i] for i in range(8)]  # one prefix, eight requests, weight 6 each
    assigned = balance_groups(group_by_prefix(prompts, CHUNK), [6] * 8, 4)
    assert [len(part) for part in assigned] == [2, 2, 2, 2]


def test_short_prompts_and_submission_order():
    prompts = [[1, 2], HEADS[1] + [0], HEADS[0] + [5], [3], HEADS[1] + [9]]
    assert prefix_order(prompts, CHUNK) == [0, 1, 4, 2, 3]  # the [5,6,7,8] pair joins at its first request
