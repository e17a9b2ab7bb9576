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

Offload (offload="force"): every request is admitted host-resident: its KV is computed into
staging chunks and written through to its host chunks as each layer produces it, so after the
step its staging chunks are simply released (a sequence that had to stay on the GPU, the host
pool being full, is offloaded after its step when room appears); before its next step, it is
prefetched into staging chunks again. The GPU pool then holds only the micro-batches that
run, and admission is bounded by the host pool. A sequence that cannot be staged (the GPU pool
is full) waits for a later step; preemption only picks sequences that hold GPU chunks.

offload="auto" makes sequences host-resident only while requests wait for lack of GPU chunks,
and only as much KV per micro-batch as its prefetch budget (prefetch_budget.py) lets come back
while the other micro-batches compute: new requests the budget covers are admitted
host-resident (as under force), and decoding sequences are offloaded, the longest first. A micro-batch over its
budget (the predictions moved) takes staged sequences back onto the GPU. Without a budget
nothing moves, so auto costs nothing where offload cannot pay.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .kv_manager import KVManager, PoolExhaustedError, Residency
from .prefix_order import prefix_order
from .prefix_sharing import PrefixSharing
from .residency_plan import GPU, HOST, STAGED, ResidencyState, SeqState, plan_residency
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

    @property
    def samples(self) -> bool:
        """The step computes the sequence's last known token, so it yields the next one."""
        return self.end == len(self.seq.token_ids)


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
        self._last_run: dict[int, int] = {}  # seq_id -> the step it last ran in (staging goes oldest first)
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
        self._must_shed: set[int] = set()  # groups to preempt their newest sequence at their next turn
        # Groups whose running sequences could not grow and wait for another group to shed: until
        # they have had their turn, nobody admits new requests (a shed sequence re-admitted at once
        # would take the chunks back, and the older sequence would wait forever).
        self._starved: set[int] = set()
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
        self._starved.discard(micro_batch)  # its turn: it tries to grow again
        self._promoted_now = 0  # host-only cached chunks this step's admissions bring back
        self._preempted_now = set()
        must_shed = micro_batch in self._must_shed
        self._must_shed.discard(micro_batch)
        if must_shed and self._starved:  # (no group starved any more: room appeared meanwhile)
            holding = [s for s in group if self._on_gpu(s)]
            if holding:
                self._preempt(group, holding[-1])
        if self.offload != "off":
            self._stage_in(group)
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
        if self.offload != "off":
            for entry in plan.scheduled:
                self._last_run[entry.seq.seq_id] = self._steps
            self._steps += 1
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
        return self.kv.chunks_for(len(seq.token_ids) + 1) <= self.kv.gpu.num_chunks

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
            if held.residency is Residency.STAGED:
                self.kv.release_staging(seq.seq_id)
            elif held.residency is Residency.GPU and len(held.gpu_chunks) <= self.kv.host_available:
                self.kv.offload(seq.seq_id)  # (a full host pool leaves it on the GPU)
                self.host_resident_ids.add(seq.seq_id)

    def predicted_step(self, micro_batch: int) -> float | None:
        """The cost model's time for the micro-batch's next step, from what it holds now."""
        return self._predict(self._load(micro_batch))

    def residency_state(self, micro_batch: int) -> ResidencyState:
        """What plan_residency needs, as plain data: micro_batch's step is back."""
        names = {Residency.GPU: GPU, Residency.HOST: HOST, Residency.STAGED: STAGED}
        seqs = tuple(
            SeqState(seq.seq_id, group, self._chunks_held(seq), len(seq.token_ids), max(1, seq.num_uncomputed_tokens),
                     seq.is_decoding, names[self.kv.residency(seq.seq_id)], seq.admission)
            for group, members in enumerate(self.groups) for seq in members)
        return ResidencyState(seqs, micro_batch, frozenset(self._in_flight),
                              tuple(self.budget.budget_chunks(m) for m in range(len(self.groups))),
                              self.kv.host_available, self.requests_wait(), self.max_num_seqs,
                              self.max_num_batched_tokens)

    def requests_wait(self) -> bool:
        """Requests wait for lack of GPU chunks: the next one's whole KV does not fit the pool now
        (auto moves KV to the host only then)."""
        return bool(self.waiting) and not self._fits_gpu(self.waiting[0])

    def _fits_gpu(self, seq: Sequence) -> bool:
        """The GPU pool has room now for the request's whole KV and its next token."""
        return self.kv.chunks_for(len(seq.token_ids)) + 1 <= self.kv.gpu_available

    def _apply_residency_plan(self, micro_batch: int) -> None:
        """auto: fit the micro-batch's host-resident KV to its prefetch budget, balance the
        micro-batches, then release the staging of what stays on the host."""
        plan = plan_residency(self.residency_state(micro_batch), self._predict_seconds)
        # Its staged sequences, before any moves: one moved away must not keep staging chunks.
        staged = [seq for seq in self.groups[micro_batch] if self.kv.residency(seq.seq_id) is Residency.STAGED]
        for seq_id in plan.to_gpu:
            self.kv.make_gpu_resident(seq_id)
        for seq_id in plan.to_host:
            self.kv.offload(seq_id)
            self.host_resident_ids.add(seq_id)
        by_id = {seq.seq_id: seq for seq in self.running}
        for seq_id, target in plan.moves:
            seq = by_id[seq_id]
            self.groups[seq.micro_batch].remove(seq)
            self.groups[target].append(seq)
            self.groups[target].sort(key=lambda s: s.admission)  # groups stay in admission order (preemption)
            seq.micro_batch = target
            self.num_moves += 1
        for seq in staged:
            if self.kv.residency(seq.seq_id) is Residency.STAGED:  # (not made GPU-resident)
                self.kv.release_staging(seq.seq_id)

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

    def _stage_in(self, group: list[Sequence]) -> None:
        """Prefetch the group's host-resident sequences into staging chunks while they fit, the
        longest waiting first (so none starves when not all fit)."""
        host_resident = [seq for seq in group if self.kv.residency(seq.seq_id) is Residency.HOST]
        room = self.kv.gpu_available
        for seq in sorted(host_resident, key=lambda seq: self._last_run.get(seq.seq_id, -1)):
            # Its chunks and the one its next token may open: staging one that then cannot grow
            # would only evict another. One that does not fit waits; smaller ones may go first.
            held = self.kv.sequence(seq.seq_id)
            needed = max(len(held.host_chunks), self.kv.chunks_for(held.num_tokens + 1))
            if needed > room:
                continue
            self.kv.prefetch(seq.seq_id)
            room -= needed

    def _on_gpu(self, seq: Sequence) -> bool:
        return self.offload == "off" or self.kv.residency(seq.seq_id) is not Residency.HOST

    def _schedule_decodes(self, group: list[Sequence], plan: StepPlan, budget: int) -> int:
        for seq in list(group):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or not seq.is_decoding or not self._on_gpu(seq):
                continue  # preempted meanwhile, still prefilling, or not staged this step
            if self._grow(group, seq, 1):
                plan.decode.append(ScheduledSequence(seq, seq.num_computed_tokens, 1, seq.num_preemptions))
                budget -= 1
        return budget

    def _schedule_prefills(self, group: list[Sequence], micro_batch: int, plan: StepPlan, budget: int) -> int:
        for seq in list(group):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or seq.is_decoding or not self._on_gpu(seq):
                continue
            count = min(seq.num_uncomputed_tokens, budget)
            if self._grow(group, seq, count):
                plan.prefill.append(ScheduledSequence(seq, seq.num_computed_tokens, count, seq.num_preemptions))
                budget -= count
        share = -(-(len(self.waiting) + sum(len(g) for g in self.groups)) // len(self.groups))
        deferred = 0  # waiting requests passed over: a running sequence is computing their next chunk
        while len(self.waiting) > deferred and budget > 0 and len(group) < min(self.max_num_seqs, share) \
                and not self._starved and deferred < MAX_DEFERRED:
            seq = self.waiting[deferred]
            if seq.seq_id in self._preempted_now:
                break
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
            room = self.budget.budget_chunks(micro_batch) - self._host_load(micro_batch) - self._promoted_now
        return self.prefix.match(seq, room)

    def _allocate_new(self, seq: Sequence, micro_batch: int, count: int) -> None:
        """KV for a request being admitted. One that will be host-resident is allocated staged
        (host chunks, and staging chunks for this step), so that its prefill KV is written
        through to the host as each layer produces it, overlapped with the following layers,
        rather than offloaded after the step."""
        if self._admits_to_host(seq, micro_batch):
            try:
                self.kv.allocate_staged(seq.seq_id, count)
                self.host_resident_ids.add(seq.seq_id)
                return
            except PoolExhaustedError as error:
                if error.pool != "host":
                    raise
        self.kv.allocate(seq.seq_id, count)  # (a full host pool leaves it on the GPU)

    def _admits_to_host(self, seq: Sequence, micro_batch: int) -> bool:
        """force: every request. auto: one whose whole KV (+ its growth) does not fit the GPU pool
        now (it would wait for chunks) and the micro-batch's prefetch budget still covers."""
        if self.offload == "force":
            return True
        if self.offload != "auto" or self._fits_gpu(seq):
            return False
        cost = self.kv.chunks_for(len(seq.token_ids)) + 1
        return self._host_load(micro_batch) + cost <= self.budget.budget_chunks(micro_batch)

    def _host_load(self, micro_batch: int) -> int:
        """Chunks the micro-batch's host-resident sequences prefetch before its next step (each
        + the one its growth may open)."""
        return sum(self._chunks_held(seq) + 1 for seq in self.groups[micro_batch]
                   if self.kv.residency(seq.seq_id) in (Residency.STAGED, Residency.HOST))

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
                if error.pool == "host":  # a staged sequence cannot grow its host copy: keep it on the GPU
                    self.kv.make_gpu_resident(seq.seq_id)
                    continue
                # The newest sequence that holds GPU chunks: a host-resident one frees none.
                newest = max((s for g in self.groups for s in g if self._on_gpu(s)), key=lambda s: s.admission)
                if newest.micro_batch != seq.micro_batch:  # its group may be in flight: it sheds at its turn
                    self._must_shed.add(newest.micro_batch)
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
