"""offload=auto's residency decisions as a pure function: plain data in, a plan out.

When a micro-batch's step comes back, its sequences' KV is not in use on any stage, so the
scheduler may change where they live and which micro-batch they belong to. It describes the
situation (`ResidencyState`: every running sequence's size and place, the prefetch budgets, the
free host chunks, whether requests wait for GPU chunks) and applies what `plan_residency`
returns. The function touches nothing and holds no state, so it is tested on its own, without
tensors or a KV manager, over random states (tests/core/test_residency_plan.py).

Two steps, as the design asks:

1. Greedy fill of the returned micro-batch's prefetch budget. Over budget (the predictions moved),
   host-resident sequences are fetched back to the GPU's owned region while it has room, the
   smallest first. While requests wait for
   GPU chunks, GPU-resident decoding sequences go to the host, the longest first (the most GPU
   chunks freed per sequence), while they fit the budget and the host pool.
2. Local refinement.
   - GPU <-> host: longest-first cannot be bettered by exchanging one sequence for one other
     (a longer one that did not fit then does not fit later), but two shorter GPU-resident
     sequences in place of a chosen one may use the budget better: the same prefetch time then
     frees more GPU chunks.
   - Between micro-batches: every stage waits for the slowest micro-batch, so a decoding sequence
     of the returned micro-batch moves to another, or is exchanged with one of a micro-batch that
     has no step in flight, when that lowers the largest predicted step time (by the cost model)
     by a clear margin (a tenth of the spread between the slowest and the fastest). A sequence of a micro-batch with a step in flight never moves: that step
     is reading its KV.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

GPU, HOST = "gpu", "host"
MARGIN = 0.1  # a move must shorten the slowest predicted step by this share of the spread: no churn
MAX_MOVES = 2  # moves between micro-batches per returned step


@dataclass(frozen=True)
class SeqState:
    seq_id: int
    group: int  # its micro-batch
    chunks: int  # KV chunks it holds (its host copy, or on the GPU)
    length: int  # context tokens its next step reads
    tokens: int  # tokens its next step computes (1 while decoding)
    decoding: bool
    residency: str  # GPU or HOST
    admission: int  # admission order (groups stay sorted by it: the preemption order)

    @property
    def host_load(self) -> int:
        """Chunks it prefetches before its next step, + the one its growth may open."""
        return self.chunks + 1 if self.residency == HOST else 0


@dataclass(frozen=True)
class ResidencyState:
    seqs: tuple[SeqState, ...]
    returned: int  # the micro-batch whose step is back
    busy: frozenset[int]  # micro-batches with a step in flight
    budgets: tuple[int, ...]  # chunks each micro-batch may prefetch (its budget)
    host_free: int  # free chunks in the host pool
    blocked: bool  # requests wait for GPU chunks
    max_num_seqs: int
    max_num_batched_tokens: int
    gpu_free: int = 0  # owned chunks an allocation can get now (a fetch back to the GPU needs them)


@dataclass
class ResidencyPlan:
    to_gpu: list[int] = field(default_factory=list)  # host -> GPU-resident (fetched back)
    to_host: list[int] = field(default_factory=list)  # GPU-resident -> host (offload)
    moves: list[tuple[int, int]] = field(default_factory=list)  # (seq_id, its new micro-batch), in order

    def __bool__(self) -> bool:
        return bool(self.to_gpu or self.to_host or self.moves)


Predict = Callable[[int, int], "float | None"]  # (batch tokens, context tokens) -> seconds


def plan_residency(state: ResidencyState, predict: Predict) -> ResidencyPlan:
    plan = ResidencyPlan()
    seqs = {seq.seq_id: seq for seq in state.seqs}
    mine = [seq for seq in state.seqs if seq.group == state.returned]
    budget = state.budgets[state.returned]
    load = sum(seq.host_load for seq in mine)
    host_free = state.host_free

    # 1. Greedy fill. Over budget: host-resident ones come back while the GPU has room, the smallest first.
    gpu_free = state.gpu_free
    for seq in sorted((s for s in mine if s.residency == HOST), key=lambda s: (s.chunks, s.seq_id)):
        if load <= budget:
            break
        if seq.chunks + 1 > gpu_free:
            continue
        gpu_free -= seq.chunks
        plan.to_gpu.append(seq.seq_id)
        seqs[seq.seq_id] = replace(seq, residency=GPU)
        load -= seq.host_load
    if state.blocked:  # requests wait: hide what the budget allows, the longest first
        for seq in sorted(_offloadable(mine), key=lambda s: (-s.chunks, s.seq_id)):
            cost = seq.chunks + 1
            if load + cost <= budget and cost <= host_free:
                plan.to_host.append(seq.seq_id)
                seqs[seq.seq_id] = replace(seq, residency=HOST)
                load += cost
                host_free -= seq.chunks
        # 2a. GPU <-> host: longest-first leaves room a single longer sequence cannot use; two
        # shorter ones in place of a chosen one may fill it, freeing more GPU chunks for the same
        # prefetch time. Each exchange moves more chunks to the host, so this ends.
        exchanged = True
        while exchanged:
            exchanged = False
            for chosen in sorted(plan.to_host, key=lambda i: (seqs[i].chunks, i)):
                c = seqs[chosen]
                rest = sorted((s for s in _offloadable(mine) if seqs[s.seq_id].residency == GPU),
                              key=lambda s: (s.chunks, s.seq_id))
                # Costs (chunks + 1) of the pair: within the budget once c's is given back, and
                # within the host pool with one chunk to spare, as in the greedy fill.
                limit = min(budget - (load - (c.chunks + 1)), host_free + 1 + c.chunks)
                pair = _best_pair(rest, limit)
                if pair is None or pair[0].chunks + pair[1].chunks <= c.chunks:
                    continue
                plan.to_host.remove(chosen)
                seqs[chosen] = replace(c, residency=GPU)
                for seq in pair:
                    plan.to_host.append(seq.seq_id)
                    seqs[seq.seq_id] = replace(seq, residency=HOST)
                moved = pair[0].chunks + pair[1].chunks - c.chunks
                load += moved + 1
                host_free -= moved
                exchanged = True
                break

    # 2b. Between micro-batches: lower the slowest predicted step.
    for _ in range(MAX_MOVES):
        move = _best_move(state, seqs, predict)
        if move is None:
            break
        for seq_id, group in move:
            seqs[seq_id] = replace(seqs[seq_id], group=group)
            plan.moves.append((seq_id, group))
    return plan


def _best_pair(ascending: list[SeqState], limit: int):
    """The two sequences with the most chunks whose costs (chunks + 1 each) sum to at most
    limit (two pointers over the list, sorted by chunks), or None."""
    best, low, high = None, 0, len(ascending) - 1
    while low < high:
        cost = ascending[low].chunks + ascending[high].chunks + 2
        if cost > limit:
            high -= 1
            continue
        if best is None or cost > best[0].chunks + best[1].chunks + 2:
            best = (ascending[low], ascending[high])
        low += 1
    return best


def _offloadable(seqs) -> list[SeqState]:
    return [seq for seq in seqs if seq.decoding and seq.residency == GPU]


def group_load(seqs, group: int, max_num_batched_tokens: int) -> tuple[int, int]:
    """(tokens, context tokens) of a micro-batch's next step."""
    members = [seq for seq in seqs if seq.group == group]
    return min(max_num_batched_tokens, sum(seq.tokens for seq in members)), sum(seq.length for seq in members)


def predicted_times(state: ResidencyState, seqs: dict[int, SeqState], predict: Predict) -> list[float] | None:
    times = []
    for group in range(len(state.budgets)):
        tokens, context = group_load(seqs.values(), group, state.max_num_batched_tokens)
        time = predict(tokens, context) if tokens else 0.0
        if time is None:
            return None
        times.append(time)
    return times


def _best_move(state: ResidencyState, seqs: dict[int, SeqState], predict: Predict):
    """The move or exchange of decoding sequences that most lowers the slowest predicted step
    (then the spread), or None when none does so by MARGIN. Each candidate is scored from
    per-micro-batch totals changed by its two sequences (O(micro-batches) per candidate, not a
    pass over every sequence: the host runs this at every returned step)."""
    times = predicted_times(state, seqs, predict)
    if times is None or len(times) < 2:
        return None
    totals = _group_totals(seqs, len(times))
    returned = state.returned
    movable = [seq for seq in seqs.values() if seq.group == returned and seq.decoding]
    by_id = sorted(seqs.values(), key=lambda s: s.seq_id)
    threshold = max(times) - MARGIN * (max(times) - min(times))
    best, best_key = None, (float("inf"), float("inf"))
    for seq in sorted(movable, key=lambda s: s.seq_id):
        for group in range(len(times)):
            if group == returned:
                continue
            candidates = [[(seq, group)]]
            if group not in state.busy:  # an idle micro-batch may give one back
                candidates += [[(seq, group), (other, returned)] for other in by_id
                               if other.group == group and other.decoding]
            for move in candidates:
                after = {g: list(totals[g]) for g in (group, returned)}
                for moved, target in move:
                    for g, sign in ((moved.group, -1), (target, 1)):
                        after[g][0] += sign * moved.tokens
                        after[g][1] += sign * moved.length
                        after[g][2] += sign
                        after[g][3] += sign * moved.host_load
                if not all(_fits_totals(state, totals[g], after[g], g) for g in (group, returned)):
                    continue
                new_times = list(times)
                for g, (tokens, context, _, _) in after.items():
                    tokens = min(state.max_num_batched_tokens, tokens)
                    new_times[g] = predict(tokens, context) if tokens else 0.0
                key = (max(new_times), max(new_times) - min(new_times))
                if key[0] < threshold and key < best_key:
                    best, best_key = [(moved.seq_id, target) for moved, target in move], key
    return best


def _group_totals(seqs: dict[int, SeqState], groups: int) -> list[list[int]]:
    """[tokens, context tokens, sequences, host load] of each micro-batch."""
    totals = [[0, 0, 0, 0] for _ in range(groups)]
    for seq in seqs.values():
        if not 0 <= seq.group < groups:
            continue  # (as group_load: a sequence of no micro-batch counts in none)
        total = totals[seq.group]
        total[0] += seq.tokens
        total[1] += seq.length
        total[2] += 1
        total[3] += seq.host_load
    return totals


def _fits_totals(state: ResidencyState, before: list[int], after: list[int], group: int) -> bool:
    """After a move, a micro-batch within its sequence limit, and within its prefetch budget or
    at least no further over it (predictions move: what is over budget already may stay)."""
    return after[2] <= state.max_num_seqs and after[3] <= max(state.budgets[group], before[3])


def _apply(seqs: dict[int, SeqState], move) -> dict[int, SeqState]:
    after = dict(seqs)
    for seq_id, group in move:
        after[seq_id] = replace(after[seq_id], group=group)
    return after
