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
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .kv_manager import KVManager, PoolExhaustedError
from .sequence import Sequence, SequenceStatus

PREFILL_MODES = ("mixed", "separate")


@dataclass
class ScheduledSequence:
    seq: Sequence
    start: int  # first position computed in this step
    num_tokens: int

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
                 num_micro_batches: int = 1):
        if prefill_mode not in PREFILL_MODES:
            raise ValueError(f"prefill_mode must be one of {PREFILL_MODES}, got {prefill_mode!r}")
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

    @property
    def running(self) -> list[Sequence]:
        return [seq for group in self.groups for seq in group]

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting) or any(self.groups)

    def abort_all(self) -> None:
        for seq in self.running:
            self.finish(seq)
        for seq in self.waiting:
            seq.status = SequenceStatus.FINISHED
        self.waiting.clear()

    def finish(self, seq: Sequence) -> None:
        self.groups[seq.micro_batch].remove(seq)
        self.kv.free(seq.seq_id)
        seq.status = SequenceStatus.FINISHED

    def schedule(self, micro_batch: int = 0) -> StepPlan:
        """The next step of one micro-batch (empty when it has nothing it can run now)."""
        group = self.groups[micro_batch]
        if micro_batch in self._must_shed:
            self._must_shed.discard(micro_batch)
            if group:
                self._preempt(group, group[-1])
        plan = StepPlan([], [])
        if self.prefill_mode == "mixed":
            budget = self._schedule_decodes(group, plan, self.max_num_batched_tokens)
            self._schedule_prefills(group, micro_batch, plan, budget)
        else:  # separate: prefill while there is prefill work that can run, else decode
            self._schedule_prefills(group, micro_batch, plan, self.max_num_batched_tokens)
            if not plan.prefill:
                self._schedule_decodes(group, plan, self.max_num_batched_tokens)
        # Scheduling grows KV as it goes: drop entries whose sequence a later entry preempted.
        plan.decode = [s for s in plan.decode if s.seq.status is SequenceStatus.RUNNING]
        plan.prefill = [s for s in plan.prefill if s.seq.status is SequenceStatus.RUNNING]
        if not plan.scheduled and self.waiting and not any(self.groups):
            raise RuntimeError(
                f"no sequence fits the KV pool ({self.kv.gpu.num_chunks} chunks of {self.kv.chunk_tokens} tokens): "
                "give the KV cache more memory or lower max_model_len"
            )
        return plan

    def _schedule_decodes(self, group: list[Sequence], plan: StepPlan, budget: int) -> int:
        for seq in list(group):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or not seq.is_decoding:
                continue  # preempted meanwhile, or still prefilling
            if self._grow(group, seq, 1):
                plan.decode.append(ScheduledSequence(seq, seq.num_computed_tokens, 1))
                budget -= 1
        return budget

    def _schedule_prefills(self, group: list[Sequence], micro_batch: int, plan: StepPlan, budget: int) -> int:
        for seq in list(group):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or seq.is_decoding:
                continue
            count = min(seq.num_uncomputed_tokens, budget)
            if self._grow(group, seq, count):
                plan.prefill.append(ScheduledSequence(seq, seq.num_computed_tokens, count))
                budget -= count
        share = -(-(len(self.waiting) + sum(len(g) for g in self.groups)) // len(self.groups))
        while self.waiting and budget > 0 and len(group) < min(self.max_num_seqs, share):
            seq = self.waiting[0]
            count = min(seq.num_uncomputed_tokens, budget)
            try:
                self.kv.allocate(seq.seq_id, count)
            except PoolExhaustedError:
                break  # wait for running sequences to finish and free their chunks
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            seq.micro_batch = micro_batch
            seq.admission = self._admissions
            self._admissions += 1
            group.append(seq)
            plan.prefill.append(ScheduledSequence(seq, seq.num_computed_tokens, count))
            budget -= count
        return budget

    def _grow(self, group: list[Sequence], seq: Sequence, count: int) -> bool:
        """Room for `count` more tokens of seq, preempting the newest sequences if needed (False:
        seq does not run this step)."""
        while True:
            try:
                self.kv.append(seq.seq_id, count)
                return True
            except PoolExhaustedError:
                newest = max((s for g in self.groups for s in g), key=lambda s: s.admission)
                if newest.micro_batch != seq.micro_batch:  # its group may be in flight: it sheds at its turn
                    self._must_shed.add(newest.micro_batch)
                    return False
                self._preempt(group, newest)
                if newest is seq:
                    return False

    def _preempt(self, group: list[Sequence], seq: Sequence) -> None:
        group.remove(seq)
        self.kv.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
