"""plan_residency, the pure function behind offload=auto, over random states and costs: what it
may change, the budgets and the host pool it respects, the local optimum its refinement reaches,
and that balancing never makes the slowest micro-batch slower. No tensors, no KV manager."""

from itertools import combinations

from hypothesis import given, settings
from hypothesis import strategies as st

from pipemax.core.residency_plan import (
    GPU,
    HOST,
    ResidencyState,
    SeqState,
    group_load,
    plan_residency,
    predicted_times,
)
from tests.helpers import examples


def linear(alpha, beta, delta):
    return lambda tokens, context: alpha * tokens + beta * context + delta


@st.composite
def states(draw):
    groups = draw(st.integers(1, 4))
    max_num_seqs = draw(st.integers(1, 6))
    seqs = []
    for group in range(groups):
        for _ in range(draw(st.integers(0, max_num_seqs))):
            decoding = draw(st.booleans())
            chunks = draw(st.integers(0, 12))
            residency = draw(st.sampled_from([GPU, GPU, HOST]))
            length = chunks * 8 - draw(st.integers(0, 7)) if chunks else 0
            tokens = 1 if decoding else draw(st.integers(1, 64))
            seqs.append(SeqState(len(seqs), group, chunks, max(length, 0), tokens, decoding, residency, len(seqs)))
    returned = draw(st.integers(0, groups - 1))
    busy = frozenset(g for g in range(groups) if g != returned and draw(st.booleans()))
    budgets = tuple(draw(st.integers(0, 40)) for _ in range(groups))
    return ResidencyState(tuple(seqs), returned, busy, budgets, draw(st.integers(0, 60)), draw(st.booleans()),
                          max_num_seqs, draw(st.sampled_from([16, 64, 1024])), draw(st.integers(0, 30)))


costs = st.one_of(st.none(), st.tuples(st.floats(0, 1e-3), st.floats(0, 1e-4), st.floats(0, 1e-2)))


def host_load(seqs, group):
    return sum(s.chunks + 1 for s in seqs.values() if s.group == group and s.residency == HOST)


def after(state, plan):
    seqs = {s.seq_id: s for s in state.seqs}
    for seq_id in plan.to_gpu:
        seqs[seq_id] = SeqState(**{**seqs[seq_id].__dict__, "residency": GPU})
    for seq_id in plan.to_host:
        seqs[seq_id] = SeqState(**{**seqs[seq_id].__dict__, "residency": HOST})
    for seq_id, group in plan.moves:
        seqs[seq_id] = SeqState(**{**seqs[seq_id].__dict__, "group": group})
    return seqs


@settings(max_examples=examples(300), deadline=None)
@given(state=states(), cost=costs)
def test_the_plan_keeps_every_promise(state, cost):
    predict = (lambda tokens, context: None) if cost is None else linear(*cost)
    plan = plan_residency(state, predict)
    assert plan_residency(state, predict) == plan  # a pure function: the same state, the same plan
    before = {s.seq_id: s for s in state.seqs}
    mine = {s.seq_id for s in state.seqs if s.group == state.returned}
    # Residency changes only for the returned micro-batch: host-resident ones back to the GPU
    # (within its free chunks, one to spare each for growth), decoding GPU-resident ones to the
    # host, and only while requests wait for GPU chunks.
    assert set(plan.to_gpu) <= {i for i in mine if before[i].residency == HOST}
    assert sum(before[i].chunks for i in plan.to_gpu) + (1 if plan.to_gpu else 0) <= max(state.gpu_free, 0) or \
        not plan.to_gpu
    assert set(plan.to_host) <= {i for i in mine if before[i].residency == GPU and before[i].decoding}
    assert len(set(plan.to_host)) == len(plan.to_host) and not set(plan.to_gpu) & set(plan.to_host)
    assert state.blocked or not plan.to_host
    # The host pool, with a chunk to spare for growth.
    assert not plan.to_host or sum(before[i].chunks for i in plan.to_host) <= state.host_free - 1
    seqs = after(state, plan)
    # The budget: the returned micro-batch ends within it, unless it was over and nothing it
    # holds on the host can come back (the GPU has no room for it); no other micro-batch goes
    # further over its own.
    load = host_load(seqs, state.returned)
    gpu_left = state.gpu_free - sum(before[i].chunks for i in plan.to_gpu)
    host_left = [i for i in mine if before[i].residency == HOST and i not in plan.to_gpu]
    assert load <= state.budgets[state.returned] or (
        not plan.to_host and all(before[i].chunks + 1 > gpu_left for i in host_left)
        and load <= host_load(before, state.returned))
    for group in range(len(state.budgets)):
        if group != state.returned:
            assert host_load(seqs, group) <= max(state.budgets[group], host_load(before, group))
        assert sum(s.group == group for s in seqs.values()) <= max(
            state.max_num_seqs, sum(s.group == group for s in before.values()))
    # Moves: decoding sequences only, out of the returned micro-batch, or back into it from a
    # micro-batch with no step in flight (a step in flight is reading its sequences' KV).
    where = {s.seq_id: s.group for s in state.seqs}
    for seq_id, group in plan.moves:
        origin = where[seq_id]
        assert before[seq_id].decoding and group != origin
        assert origin == state.returned or (group == state.returned and origin not in state.busy)
        where[seq_id] = group
    if cost is None:
        assert not plan.moves  # nothing to balance by
    else:
        old, new = predicted_times(state, before, predict), predicted_times(state, seqs, predict)
        assert max(new) <= max(old) + 1e-12  # balancing never makes the slowest step slower
        if plan.moves:
            assert max(new) < max(old)
    if state.blocked:  # the refinement's local optimum: no chosen one is worth two others
        free = state.host_free - sum(before[i].chunks for i in plan.to_host)
        load = host_load(after(state, type(plan)(plan.to_gpu, plan.to_host, [])), state.returned)  # before moves
        rest = [s for s in seqs.values() if s.seq_id in mine and before[s.seq_id].residency == GPU
                and s.decoding and s.residency == GPU]
        budget = state.budgets[state.returned]
        # ... and never moves fewer chunks to the host than longest-first alone.
        greedy_load = host_load(after(state, type(plan)(plan.to_gpu, [], [])), state.returned)
        greedy_free, greedy = state.host_free, 0
        for s in sorted((before[i] for i in mine if before[i].residency == GPU and before[i].decoding),
                        key=lambda s: (-s.chunks, s.seq_id)):
            if greedy_load + s.chunks + 1 <= budget and s.chunks + 1 <= greedy_free:
                greedy_load, greedy_free, greedy = greedy_load + s.chunks + 1, greedy_free - s.chunks, greedy + s.chunks
        assert sum(before[i].chunks for i in plan.to_host) >= greedy
        for chosen in plan.to_host:
            c = before[chosen].chunks
            for a, b in combinations(rest, 2):
                fits = load - (c + 1) + a.chunks + b.chunks + 2 <= budget and a.chunks + b.chunks - c + 1 <= free
                assert not (fits and a.chunks + b.chunks > c), (chosen, a, b)


def test_greedy_then_refinement_fills_a_budget_longest_first_cannot():
    # Budget 10 (costs are chunks + 1): longest first takes the 6 (cost 7) and nothing else fits;
    # the 5 and the 3 (costs 6 + 4) fill it: 8 chunks to the host instead of 6.
    seqs = tuple(SeqState(i, 0, chunks, chunks * 8, 1, True, GPU, i) for i, chunks in enumerate([6, 5, 3]))
    state = ResidencyState(seqs, 0, frozenset(), (10,), 100, True, 8, 64)
    plan = plan_residency(state, lambda tokens, context: None)
    assert sorted(plan.to_host) == [1, 2]
    # Not blocked: nothing goes to the host, whatever the budget.
    assert not plan_residency(ResidencyState(seqs, 0, frozenset(), (10,), 100, False, 8, 64), linear(0, 1, 0))


def test_a_heavy_micro_batch_gives_a_sequence_to_a_busy_one_and_exchanges_with_an_idle_one():
    def seq(i, group, length):
        return SeqState(i, group, -(-length // 8), length, 1, True, GPU, i)

    per_context = linear(0, 1e-3, 0)
    # Micro-batch 0 (back) reads 110 tokens, 1 reads 48: moving the 50 makes it 60 / 98.
    seqs = (seq(0, 0, 60), seq(1, 0, 50), seq(2, 1, 40), seq(3, 1, 8))
    state = ResidencyState(seqs, 0, frozenset({1}), (0, 0), 0, False, 8, 256)
    assert plan_residency(state, per_context).moves == [(1, 1)]
    # Micro-batch 1 full (2 of 2): with its step in flight nothing can move; idle, an exchange
    # (the 60 for the 40, or the 50 for the 8) makes the slowest 90 instead of 110.
    full = ResidencyState(seqs, 0, frozenset({1}), (0, 0), 0, False, 2, 256)
    assert not plan_residency(full, per_context).moves
    idle = ResidencyState(seqs, 0, frozenset(), (0, 0), 0, False, 2, 256)
    plan = plan_residency(idle, per_context)
    assert [group for _, group in plan.moves] == [1, 0]  # one exchange
    moved = after(idle, plan)
    assert [group_load(moved.values(), g, 256) for g in (0, 1)] in ([(2, 90), (2, 68)], [(2, 68), (2, 90)])


@settings(max_examples=examples(300), deadline=None)
@given(chunks=st.lists(st.integers(0, 12), min_size=2, max_size=8), budget=st.integers(0, 40),
       host_free=st.integers(0, 60))
def test_the_host_set_is_a_local_optimum_no_worse_than_longest_first(chunks, budget, host_free):
    """The refinement on its own: one micro-batch of decoding GPU-resident sequences, requests
    waiting. (The broad test above covers this too, but rarely draws such crowded states.)"""
    seqs = tuple(SeqState(i, 0, c, c * 8, 1, True, GPU, i) for i, c in enumerate(chunks))
    state = ResidencyState(seqs, 0, frozenset(), (budget,), host_free, True, 8, 64)
    plan = plan_residency(state, lambda tokens, context: None)
    on_host = [chunks[i] for i in plan.to_host]
    load, free = sum(c + 1 for c in on_host), host_free - sum(on_host)
    assert load <= budget and (not on_host or free >= 1)
    greedy_load, greedy_free, greedy = 0, host_free, 0
    for c in sorted(chunks, reverse=True):
        if greedy_load + c + 1 <= budget and c + 1 <= greedy_free:
            greedy_load, greedy_free, greedy = greedy_load + c + 1, greedy_free - c, greedy + c
    assert sum(on_host) >= greedy
    rest = [chunks[i] for i in range(len(chunks)) if i not in plan.to_host]
    for c in on_host:
        for a, b in combinations(rest, 2):
            fits = load - (c + 1) + a + b + 2 <= budget and a + b - c + 1 <= free
            assert not (fits and a + b > c)
