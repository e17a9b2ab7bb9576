"""Continuous batching: which sequences run in the next step, and with how many tokens.

Each step has a token budget (max_num_batched_tokens) and a sequence limit (max_num_seqs).
Decoding sequences take one token each; prompts are prefilled in pieces of up to the remaining
budget (chunked prefill), so a prompt longer than one step spans several steps. New requests
join as soon as budget, sequence slots and KV chunks allow, while others are still decoding.

prefill_mode:
  "mixed"    decodes and prefill pieces share a step (decodes never stall behind a long prompt)
  "separate" a step is all-prefill while prompts wait, else all-decode

When the KV pool is full, the most recently admitted running sequence of the micro-batch being
scheduled is preempted: its KV is freed and it goes back to the front of the queue to be
recomputed (prompt + what it generated so far). Nothing is lost: its generated tokens stay, and
recomputation yields the same KV.

Micro-batches: the running sequences form M groups that take turns (in a pipeline, one group per
stage at a time; on one device, the host plans one group while the device runs another). The
limits above apply to each group's step. The groups share the waiting queue and the KV pool; a
group admits new requests only up to its fair share of all requests in the system, so the
groups stay balanced and none waits behind a heavy one. Preemption follows one order across the
groups, as with one group: the newest admitted sequence goes first. When that sequence belongs to
another group (whose step may be in flight, reading its KV), the blocked sequence waits a step and
that group sheds its newest sequence at its next turn; groups evicting each other in turn could
otherwise go on forever.

Offload: a running sequence is GPU-resident (its KV in the owned region of the GPU pool) or
host-resident (its KV in pinned host memory). A host-resident sequence that a step computes is
staged for it: the step's staging slot (kv_manager.py: slot n mod 2 of a ring of 2 x S chunks)
holds its chunks, prefetched before the step on each stage, and its new rows are written through
to the host copy; nothing is released afterwards, the slot is reused two steps later. So only
the step computing and the next one hold host-resident KV on a GPU, and admission is bounded by
the owned region (GPU-resident sequences), each step's slot (the host-resident sequences it
computes, S chunks with their growth) and the host pool.

offload="force": every request is admitted host-resident while its micro-batch's host-resident
KV fits a slot; its prefill is computed in the slot and written through as each layer produces
it. A sequence admitted on the GPU (the slot or the host pool full, or a cached prefix to share)
goes to the host after its step when there is room. Host-resident sequences of a micro-batch
that do not all fit its slot take turns, the longest waiting first.

offload="auto" moves KV to the host only while requests wait for lack of owned chunks, and only
as much per step as its prefetch budget (prefetch_budget.py) lets come back while the step before
it computes: new requests the budget covers are admitted host-resident (as under force), and
decoding sequences are offloaded, the longest first. A micro-batch over its budget (the
predictions moved) fetches host-resident sequences back to the owned region. Without a budget
nothing moves, so auto costs nothing where offload cannot pay.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .kv_manager import KVManager, PoolExhaustedError, Residency
from .prefix_order import prefix_order
from .prefix_sharing import PrefixSharing
from .residency_plan import GPU, HOST, ResidencyState, SeqState, plan_residency
from .sequence import Sequence, SequenceStatus

PREFILL_MODES = ("mixed", "separate")
MAX_DEFERRED = 64  # waiting requests an admission looks past (each waits for a chunk being computed)
OFFLOAD_MODES = ("off", "auto", "force")


@dataclass
class ScheduledSequence:
    seq: Sequence
    start: int  # first position computed in this step
    num_tokens: int
    preemptions: int = 0  # the sequence's preemption count when scheduled: a later preemption voids it

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    def __post_init__(self):
        # The step computes the sequence's last known token, so it yields the next one. Fixed when
        # scheduled: at launch the sequence gets a placeholder for that token.
        self.samples = self.end == len(self.seq.token_ids)


@dataclass
class StepPlan:
    decode: list[ScheduledSequence]  # one token each, listed first in the batch
    prefill: list[ScheduledSequence]

    @property
    def scheduled(self) -> list[ScheduledSequence]:
        return self.decode + self.prefill

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, kv: KVManager, max_num_seqs: int, max_num_batched_tokens: int, prefill_mode: str = "mixed",
                 num_micro_batches: int = 1, offload: str = "off", budget=None, cost_model=None,
                 prefix_caching: bool = False):
        if prefill_mode not in PREFILL_MODES:
            raise ValueError(f"prefill_mode must be one of {PREFILL_MODES}, got {prefill_mode!r}")
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {offload!r}")
        if offload != "off" and kv.host.num_chunks == 0:
            raise ValueError("offload needs a host KV pool: give it host memory")
        self.offload = offload
        if offload == "auto" and budget is None:
            raise ValueError("offload=auto needs a prefetch budget")
        self.budget = budget  # PrefetchBudget (auto)
        self.cost_model = cost_model  # StepCostModel: balances the micro-batches' step times
        self.num_moves = 0  # sequences moved between micro-batches to balance them
        self.host_resident_ids: set[int] = set()  # sequences that have been host-resident (for stats)
        self.host_pool_full_ids: set[int] = set()  # to be host-resident, admitted to the GPU: the host pool was full
        self._last_run: dict[int, int] = {}  # seq_id -> the step it last ran in (staging goes oldest first)
        self._staging_need: dict[int, int] = {}
        # Steps scheduled since the pool last made a sequence wait or preempted one (none yet: quiet).
        self._quiet_steps = 2 * num_micro_batches
        self._steps = 0
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill_mode = prefill_mode
        if num_micro_batches < 1:
            raise ValueError("num_micro_batches must be >= 1")
        self.waiting: deque[Sequence] = deque()
        self.groups: list[list[Sequence]] = [[] for _ in range(num_micro_batches)]  # each in admission order
        self.num_preemptions = 0
        self._admissions = 0  # global admission counter: the preemption order across groups
        # Groups to preempt their newest sequence holding chunks of a pool (GPU or host) at their next turn.
        self._must_shed: dict[int, str] = {}
        # Groups whose running sequences could not grow and wait for another group to shed: until
        # they have had their turn, nobody admits new requests (a shed sequence re-admitted at once
        # would take the chunks back, and the older sequence would wait forever).
        self._starved: set[int] = set()
        self._grows_first = False  # the group being scheduled was starved: no admissions in this step
        self._in_flight: set[int] = set()  # micro-batches scheduled and not yet back (step_done)
        # Preempted while planning this step: not admitted again in it (it would only be preempted
        # again at its next step, and in "separate" mode keep the decodes from ever running).
        self._preempted_now: set[int] = set()
        self._promoted_now = 0  # host-only cached chunks the admissions of the step being planned bring back
        # Prefix caching (prefix_sharing.py): requests start from the cached chunks of their
        # longest cached prefix; returned steps make their full chunks shareable.
        self.prefix = PrefixSharing(kv) if prefix_caching else None

    def _wait(self, seq: Sequence, front: bool = False) -> None:
        """seq joins the waiting queue (a preempted one at its front)."""
        if front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)
        if self.prefix is not None:
            self.prefix.waiting(seq)

    @property
    def running(self) -> list[Sequence]:
        return [seq for group in self.groups for seq in group]

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self._wait(seq)

    def order_waiting_by_prefix(self) -> None:
        """Prefix caching: the waiting requests in prefix order (prefix_order.py), so that requests
        sharing a prefix run together while it is cached. Only when nothing runs yet (a run's start):
        the whole batch is known then."""
        if self.prefix is None or any(self.groups):
            return
        waiting = list(self.waiting)
        order = prefix_order([seq.token_ids for seq in waiting], self.kv.chunk_tokens,
                             [self.prefix.keys[seq.seq_id] for seq in waiting])
        self.waiting = deque(waiting[index] for index in order)

    def has_unfinished(self) -> bool:
        return bool(self.waiting) or any(self.groups)

    def abort_all(self) -> None:
        for seq in self.running:
            self.finish(seq, aborted=True)
        for seq in self.waiting:
            seq.status = SequenceStatus.FINISHED
        self.waiting.clear()
        self._must_shed.clear()
        self._starved.clear()
        self._in_flight.clear()
        if self.prefix is not None:  # the KV manager is reset next: nothing stays cached
            self.prefix.reset()

    def finish(self, seq: Sequence, aborted: bool = False) -> None:
        if seq.status is SequenceStatus.WAITING:  # preempted while its last token was on its way: holds nothing
            self.waiting.remove(seq)
            seq.status = SequenceStatus.FINISHED
            return
        if self.prefix is not None and not aborted:
            self.prefix.index_step([seq])  # its last step's chunks, before they go (it may finish in its first)
        self.groups[seq.micro_batch].remove(seq)
        self.kv.free(seq.seq_id)
        if self.prefix is not None:
            self.prefix.gone(seq)
        self._last_run.pop(seq.seq_id, None)
        seq.status = SequenceStatus.FINISHED

    def schedule(self, micro_batch: int = 0) -> StepPlan:
        """The next step of one micro-batch (empty when it has nothing it can run now)."""
        group = self.groups[micro_batch]
        self._quiet_steps += 1
        # Its turn: it tries to grow again, before admitting anyone (in "separate" mode an admitted
        # prompt would take the step, and the freed chunks, from the sequences that waited for them).
        self._grows_first = micro_batch in self._starved
        self._starved.discard(micro_batch)
        self._promoted_now = 0  # host-only cached chunks this step's admissions bring back
        self._preempted_now = set()
        must_shed = self._must_shed.pop(micro_batch, None)
        if must_shed and self._starved:  # (no group starved any more: room appeared meanwhile)
            holding = [s for s in group if self._holds(s, must_shed)]
            if holding:
                self._preempt(group, holding[-1])
        self._staging_need = {}  # staged seq_id -> the staging chunks it may take this step, growth included
        if self.offload != "off":
            self.kv.begin_step(self._steps)
            self._stage_host_resident(group)
        plan = StepPlan([], [])
        if self.prefill_mode == "mixed":
            budget = self._schedule_decodes(group, plan, self.max_num_batched_tokens)
            self._schedule_prefills(group, micro_batch, plan, budget)
        else:  # separate: prefill while there is prefill work that can run, else decode
            self._schedule_prefills(group, micro_batch, plan, self.max_num_batched_tokens)
            if not plan.prefill:
                self._schedule_decodes(group, plan, self.max_num_batched_tokens)
        # Scheduling grows KV as it goes: drop entries whose sequence a later entry preempted (even
        # if it was admitted again since: its new entry is the one that counts).
        plan.decode = [s for s in plan.decode if self._still_valid(s)]
        plan.prefill = [s for s in plan.prefill if self._still_valid(s)]
        if self.offload != "off" and plan.scheduled:
            for entry in plan.scheduled:
                self._last_run[entry.seq.seq_id] = self._steps
            self._steps += 1  # (an empty plan is never launched: the next one takes its slot)
        if plan.scheduled:
            self._in_flight.add(micro_batch)
        if self.budget is not None and plan.scheduled:
            self.budget.record(micro_batch, plan.num_tokens, sum(entry.end for entry in plan.scheduled))
        if (not plan.scheduled and self.waiting and not any(self.groups)
                and (not self._preempted_now or not self._fits_empty_pool(self.waiting[0]))):
            # (host-resident sequences that could not be staged keep their group non-empty; one
            # preempted in this very call that fits the pool is admitted again at the next)
            raise RuntimeError(
                f"no sequence fits the KV pool ({self.kv.gpu.num_chunks} chunks of {self.kv.chunk_tokens} tokens): "
                "give the KV cache more memory or lower max_model_len"
            )
        return plan

    def _fits_empty_pool(self, seq: Sequence) -> bool:
        need = self.kv.chunks_for(len(seq.token_ids) + 1)
        return need <= self.kv.gpu.num_chunks or (self.offload != "off"
                                                  and need <= min(self.kv.staging_chunks, self.kv.host.num_chunks))

    @staticmethod
    def _still_valid(entry: ScheduledSequence) -> bool:
        return entry.seq.status is SequenceStatus.RUNNING and entry.preemptions == entry.seq.num_preemptions

    def step_done(self, micro_batch: int) -> None:
        """A micro-batch's step has come back: under offload, its sequences go to the host; under
        auto, plan_residency decides what moves (residency_plan.py)."""
        self._in_flight.discard(micro_batch)
        if self.prefix is not None:
            self.prefix.index_step(self.groups[micro_batch])
        if self.offload == "off":
            return
        if self.offload == "auto":
            self._apply_residency_plan(micro_batch)
            return
        for seq in self.groups[micro_batch]:
            held = self.kv.sequence(seq.seq_id)
            if held.residency is Residency.GPU and len(held.gpu_chunks) <= self.kv.host_available \
                    and self._host_load(micro_batch) + self._staging_cost(seq) <= self.kv.staging_chunks:
                self.kv.offload(seq.seq_id)  # (a full host pool or slot leaves it on the GPU)
                self.host_resident_ids.add(seq.seq_id)

    def predicted_step(self, micro_batch: int) -> float | None:
        """The cost model's time for the micro-batch's next step, from what it holds now."""
        return self._predict(self._load(micro_batch))

    def residency_state(self, micro_batch: int) -> ResidencyState:
        """What plan_residency needs, as plain data: micro_batch's step is back."""
        names = {Residency.GPU: GPU, Residency.HOST: HOST}
        seqs = tuple(
            SeqState(seq.seq_id, group, self._chunks_held(seq), len(seq.token_ids), max(1, seq.num_uncomputed_tokens),
                     seq.is_decoding, names[self.kv.residency(seq.seq_id)], seq.admission)
            for group, members in enumerate(self.groups) for seq in members)
        return ResidencyState(seqs, micro_batch, frozenset(self._in_flight),
                              tuple(self._host_budget(m) for m in range(len(self.groups))),
                              self.kv.host_available, self.requests_wait(), self.max_num_seqs,
                              self.max_num_batched_tokens, self.kv.gpu_available)

    def requests_wait(self) -> bool:
        """Requests wait for lack of GPU chunks: the next one's whole KV does not fit the pool now
        (auto moves KV to the host only then)."""
        return bool(self.waiting) and not self._fits_gpu(self.waiting[0])

    def _fits_gpu(self, seq: Sequence) -> bool:
        """The GPU pool has room now for the request's whole KV and its next token."""
        return self.kv.chunks_for(len(seq.token_ids)) + 1 <= self.kv.gpu_available

    def _apply_residency_plan(self, micro_batch: int) -> None:
        """auto: fit the micro-batch's host-resident KV to its prefetch budget, then balance the
        micro-batches."""
        plan = plan_residency(self.residency_state(micro_batch), self._predict_seconds)
        for seq_id in plan.to_gpu:
            self.kv.fetch(seq_id)
        for seq_id in plan.to_host:
            self.kv.offload(seq_id)
            self.host_resident_ids.add(seq_id)
        by_id = {seq.seq_id: seq for seq in self.running}
        # No balancing while the pool is contended (a preemption or a shed request within the last
        # two rounds): a sequence moved away from the chunks it waits for lets a new request take
        # them, and the two could trade places forever.
        moves = plan.moves if self._quiet_steps >= 2 * len(self.groups) else []
        for seq_id, target in moves:
            seq = by_id[seq_id]
            self.groups[seq.micro_batch].remove(seq)
            self.groups[target].append(seq)
            self.groups[target].sort(key=lambda s: s.admission)  # groups stay in admission order (preemption)
            seq.micro_batch = target
            self.num_moves += 1

    def _host_budget(self, micro_batch: int) -> int:
        """Chunks the micro-batch's host-resident sequences may hold (each + the one its growth may
        open): a staging slot under force; under auto also what its prefetch can bring back
        while the step before it computes."""
        if self.offload == "force":
            return self.kv.staging_chunks
        if self.offload == "auto":
            return min(self.kv.staging_chunks, self.budget.budget_chunks(micro_batch))
        return 0

    def _predict_seconds(self, tokens: int, context: int) -> float | None:
        return self._predict((tokens, context))

    def _load(self, micro_batch: int) -> tuple[int, int]:
        """(tokens, context tokens) of the micro-batch's next step, from what it holds now."""
        group = self.groups[micro_batch]
        tokens = min(self.max_num_batched_tokens, sum(max(1, seq.num_uncomputed_tokens) for seq in group))
        return tokens, sum(len(seq.token_ids) for seq in group)

    def _predict(self, load: tuple[int, int]) -> float | None:
        if self.cost_model is None or not self.cost_model.ready:
            return None
        return self.cost_model.predict(*load) if load[0] > 0 else 0.0

    def _stage_host_resident(self, group: list[Sequence]) -> None:
        """Stage the group's host-resident sequences in this step's slot while they fit with
        their growth, the longest waiting first (so none starves when not all fit)."""
        host_resident = [seq for seq in group if self.kv.residency(seq.seq_id) is Residency.HOST]
        for seq in sorted(host_resident, key=lambda seq: self._last_run.get(seq.seq_id, -1)):
            held = self.kv.sequence(seq.seq_id)
            growth = 1 if seq.is_decoding else min(seq.num_uncomputed_tokens, self.max_num_batched_tokens)
            needed = self.kv.chunks_for(held.num_tokens + growth)
            if needed > self.kv.staging_chunks:  # it outgrew a slot: to the owned region, or recomputed there
                try:
                    self.kv.fetch(seq.seq_id)
                except PoolExhaustedError:
                    self._preempt(group, seq)
                continue
            if needed > self._ring_free():
                continue  # one that does not fit waits; smaller ones may go first
            self.kv.stage(seq.seq_id)
            self._staging_need[seq.seq_id] = needed

    def _ring_free(self) -> int:
        """Staging chunks of this step's slot that neither a sequence nor a staged one's growth
        has taken."""
        reserved = 0
        for seq_id, needed in self._staging_need.items():
            held = self.kv.sequences.get(seq_id)
            if held is not None and held.staged:
                reserved += max(0, needed - len(held.staging))
        return self.kv.ring_room - reserved

    def _holds_gpu(self, seq: Sequence) -> bool:
        """Its KV is in owned chunks (preempting it frees some)."""
        return self.offload == "off" or self.kv.residency(seq.seq_id) is Residency.GPU

    def _holds(self, seq: Sequence, pool: str) -> bool:
        """Preempting it frees chunks of the pool ("GPU": owned chunks, "host": host chunks)."""
        return self._holds_gpu(seq) if pool == "GPU" else self.kv.residency(seq.seq_id) is Residency.HOST

    def _runnable(self, seq: Sequence) -> bool:
        """Its KV is on the GPU for this step: owned, or staged in this step's slot."""
        return self.offload == "off" or self.kv.residency(seq.seq_id) is Residency.GPU \
            or self.kv.sequence(seq.seq_id).staged

    def _schedule_decodes(self, group: list[Sequence], plan: StepPlan, budget: int) -> int:
        for seq in list(group):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or not seq.is_decoding or not self._runnable(seq) \
                    or seq.awaits_last_token:
                continue  # preempted meanwhile, still prefilling, not staged this step, or its last token is due
            if self._grow(group, seq, 1):
                plan.decode.append(ScheduledSequence(seq, seq.num_computed_tokens, 1, seq.num_preemptions))
                budget -= 1
        return budget

    def _schedule_prefills(self, group: list[Sequence], micro_batch: int, plan: StepPlan, budget: int) -> int:
        for seq in list(group):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or seq.is_decoding or not self._runnable(seq):
                continue
            count = min(seq.num_uncomputed_tokens, budget)
            if self._grow(group, seq, count):
                plan.prefill.append(ScheduledSequence(seq, seq.num_computed_tokens, count, seq.num_preemptions))
                budget -= count
        share = -(-(len(self.waiting) + sum(len(g) for g in self.groups)) // len(self.groups))
        deferred = 0  # waiting requests passed over: a running sequence is computing their next chunk
        while len(self.waiting) > deferred and budget > 0 and len(group) < min(self.max_num_seqs, share) \
                and not self._starved and not self._grows_first and deferred < MAX_DEFERRED:
            seq = self.waiting[deferred]
            if seq.seq_id in self._preempted_now or seq.pending_tokens:
                break  # (a token of its is still on its way: it is admitted again once it has come)
            shared = self._cached_prefix(seq, micro_batch)
            if shared is None:
                deferred += 1
                continue
            seq.num_computed_tokens = len(shared) * self.kv.chunk_tokens
            promoted = 0 if self.budget is None else sum(not self.kv.prefix_cache.on_gpu(e) for e in shared)
            count = min(seq.num_uncomputed_tokens, budget)
            try:
                if shared:
                    self.kv.allocate_with_prefix(seq.seq_id, shared, seq.num_computed_tokens + count)
                else:
                    self._allocate_new(seq, micro_batch, count)
            except PoolExhaustedError:
                seq.num_computed_tokens = 0
                break  # wait for running sequences to finish and free their chunks
            del self.waiting[deferred]
            self._promoted_now += promoted
            if self.prefix is not None:
                self.prefix.admitted(seq, shared)
            seq.status = SequenceStatus.RUNNING
            seq.micro_batch = micro_batch
            seq.admission = self._admissions
            self._admissions += 1
            group.append(seq)
            plan.prefill.append(ScheduledSequence(seq, seq.num_computed_tokens, count, seq.num_preemptions))
            budget -= count
        return budget

    def _cached_prefix(self, seq: Sequence, micro_batch: int) -> list[int] | None:
        """The cache entries a request admitted now starts with (None: it had better wait for a
        chunk a running sequence is computing). Under offload=auto, host-only entries come back
        only while the micro-batch's prefetch budget covers them."""
        if self.prefix is None:
            return []
        room = None
        if self.budget is not None:
            room = self._host_budget(micro_batch) - self._host_load(micro_batch) - self._promoted_now
        return self.prefix.match(seq, room)

    def _allocate_new(self, seq: Sequence, micro_batch: int, count: int) -> None:
        """KV for a request being admitted. One that will be host-resident is allocated in this
        step's staging slot and its host chunks, so that its prefill KV is written through to
        the host as each layer produces it, overlapped with the following layers, rather than
        offloaded after the step."""
        if self._admits_to_host(seq, micro_batch, count):
            try:
                self.kv.allocate_host(seq.seq_id, count)
                self.host_resident_ids.add(seq.seq_id)
                return
            except PoolExhaustedError as error:
                if error.pool == "GPU":
                    raise
                self.host_pool_full_ids.add(seq.seq_id)
        self.kv.allocate(seq.seq_id, count)  # (a full host pool or slot leaves it on the GPU)

    def _admits_to_host(self, seq: Sequence, micro_batch: int, count: int) -> bool:
        """force: every request. auto: one whose whole KV (+ its growth) does not fit the owned
        region now (it would wait for chunks). Either way only while the micro-batch's host-resident
        KV (its whole prompt + its growth counted) stays within its budget, and this step's chunks
        fit the slot."""
        if self.offload == "off" or (self.offload == "auto" and self._fits_gpu(seq)):
            return False
        if self.kv.chunks_for(count) > self._ring_free():
            return False
        return self._host_load(micro_batch) + self._staging_cost(seq) <= self._host_budget(micro_batch)

    def _host_load(self, micro_batch: int) -> int:
        """Staging chunks the micro-batch's host-resident sequences take at its next step."""
        return sum(self._staging_cost(seq) for seq in self.groups[micro_batch]
                   if self.kv.residency(seq.seq_id) is Residency.HOST)

    def _staging_cost(self, seq: Sequence) -> int:
        """Staging chunks a sequence takes at its next step: its whole KV, the token it computes
        next included (a prompt: all of it), and one token more."""
        return self.kv.chunks_for(len(seq.token_ids) + 1)

    def _chunks_held(self, seq: Sequence) -> int:
        held = self.kv.sequence(seq.seq_id)
        return len(held.host_chunks or held.gpu_chunks)

    def _grow(self, group: list[Sequence], seq: Sequence, count: int) -> bool:
        """Room for `count` more tokens of seq, preempting the newest sequences if needed (False:
        seq does not run this step)."""
        while True:
            try:
                self.kv.append(seq.seq_id, count)
                return True
            except PoolExhaustedError as error:
                if error.pool == "staging":  # its slot is full: it runs at a later step
                    return False
                if error.pool == "host":  # a staged sequence cannot grow its host copy: to the GPU
                    try:
                        self.kv.fetch(seq.seq_id)
                        continue
                    except PoolExhaustedError:
                        pass
                # The newest sequence holding chunks of the exhausted pool is recomputed.
                pool = "host" if error.pool == "host" else "GPU"
                newest = max((s for g in self.groups for s in g if self._holds(s, pool)), key=lambda s: s.admission)
                self._quiet_steps = 0
                if newest.micro_batch != seq.micro_batch:  # its group may be in flight: it sheds at its turn
                    self._must_shed[newest.micro_batch] = pool
                    self._starved.add(seq.micro_batch)
                    return False
                self._preempt(group, newest)
                if newest is seq:
                    return False

    def _preempt(self, group: list[Sequence], seq: Sequence) -> None:
        group.remove(seq)
        self.kv.free(seq.seq_id)
        if self.prefix is not None:
            self.prefix.gone(seq)
        self._last_run.pop(seq.seq_id, None)
        self._preempted_now.add(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self._wait(seq, front=True)
        self.num_preemptions += 1
