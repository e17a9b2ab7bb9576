"""The engine's schedule without tensors: a pure function from a workload and its settings to
the rounds the engine would run, each saying which micro-batches compute, with which tokens,
what every stage prefetches and writes back around each step, and which steps come
back.

It drives the real Scheduler and a KV manager exactly as the engine's loop does (engine.run):
launch every micro-batch that has no step in flight, then take back the oldest steps, one per
round unless `returns` says how many (a pipeline may return several while the host plans). A
step "samples" a stand-in token; requests stop at their output length. Step times are not
simulated here: the cost model (seeded with the given coefficients) only feeds the scheduler's
predictions, as the engine's does. The same inputs always give the same schedule.

Tests check the schedule's promises on it (tests/core/test_offload_schedule.py); a simulator
of whole servers can replay it against a timing model.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .cost_model import StepCostModel
from .prefetch_budget import PrefetchBudget
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence
from .step_plan import KVOp, RecordingKVManager


@dataclass(frozen=True)
class ScheduleSettings:
    num_gpu_chunks: int
    num_host_chunks: int
    chunk_tokens: int
    max_num_seqs: int
    max_num_batched_tokens: int
    num_micro_batches: int = 1
    offload: str = "off"
    prefill_mode: str = "mixed"
    step_cost: tuple[float, float, float] | None = None  # (alpha, beta, delta): the cost model's seed
    bytes_per_second: float = 0.0  # prefetch bandwidth (offload=auto)
    chunk_bytes: int = 1  # bytes one chunk moves (offload=auto)
    staging_chunks: int = 0  # S: one slot of the staging ring (0: offload moves nothing)


@dataclass(frozen=True)
class Step:
    index: int
    micro_batch: int
    kv_ops: tuple[KVOp, ...]  # what every stage replays (and copies) before the step computes
    computes: tuple[tuple[int, int, int], ...]  # (request, first position, tokens)
    host_resident: tuple[int, ...]  # requests computed from the step's staging slot: prefetched, written back
    prefetch_chunks: int = 0  # chunks every stage copies host -> GPU before this step computes

    @property
    def tokens(self) -> int:
        return sum(count for _, _, count in self.computes)

    @property
    def context_tokens(self) -> int:
        return sum(start + count for _, start, count in self.computes)

    @property
    def written_back_rows(self) -> int:
        """Token rows of host-resident requests written through to the host by this step."""
        staged = set(self.host_resident)
        return sum(count for seq_id, _, count in self.computes if seq_id in staged)


@dataclass(frozen=True)
class Round:
    launched: tuple[Step, ...]
    returned: tuple[int, ...]  # indices of the steps that came back at its end, oldest first
    finished: tuple[int, ...]  # requests that finished with them
    moved: tuple[int, ...] = ()  # requests moved to another micro-batch as those steps came back


@dataclass
class Schedule:
    rounds: list[Round] = field(default_factory=list)
    final_kv_ops: tuple[KVOp, ...] = ()  # logged by the last returns (frees), with no step to carry them
    requests: tuple[tuple[int, int], ...] = ()  # (prompt tokens, output tokens) each
    preemptions: int = 0
    host_resident_requests: int = 0

    @property
    def steps(self) -> list[Step]:
        return [step for round_ in self.rounds for step in round_.launched]


def plan_schedule(requests: list[tuple[int, int]], settings: ScheduleSettings,
                  returns: list[int] | None = None, max_rounds: int = 100_000) -> Schedule:
    """requests: (prompt tokens, output tokens) each; returns: steps taken back at the end of
    each round (clipped to 1..in flight; default 1, as the engine)."""
    kv = RecordingKVManager(settings.num_gpu_chunks, settings.num_host_chunks, settings.chunk_tokens,
                            settings.staging_chunks)
    cost = StepCostModel(seed=settings.step_cost) if settings.step_cost is not None else None
    budget = None
    if settings.offload == "auto":
        budget = PrefetchBudget(cost or StepCostModel(), settings.bytes_per_second, settings.chunk_bytes,
                                settings.num_micro_batches)
    scheduler = Scheduler(kv, settings.max_num_seqs, settings.max_num_batched_tokens, settings.prefill_mode,
                          settings.num_micro_batches, settings.offload, budget, cost)
    for seq_id, (prompt, outputs) in enumerate(requests):
        if prompt < 1 or outputs < 1:
            raise ValueError(f"request {seq_id}: needs >= 1 prompt and >= 1 output token, got {prompt}, {outputs}")
        scheduler.add(Sequence(seq_id, [1] * prompt, SamplingParams(max_tokens=outputs, ignore_eos=True)))
    schedule = Schedule(requests=tuple(requests))
    in_flight: deque[tuple[Step, list]] = deque()
    idle_rounds = step_count = 0
    for round_index in range(max_rounds):
        if not scheduler.has_unfinished() and not in_flight:
            break
        busy = {step.micro_batch for step, _ in in_flight}
        launched = []
        for micro_batch in range(settings.num_micro_batches):
            if micro_batch in busy:
                continue
            plan = scheduler.schedule(micro_batch)
            if not plan.scheduled:
                continue  # its KV operations ride with the next step, as in the engine
            for entry in plan.scheduled:
                entry.seq.num_computed_tokens = entry.end
            ops = tuple(kv.take_log())
            step = Step(step_count, micro_batch, ops,
                        tuple((e.seq.seq_id, e.start, e.num_tokens) for e in plan.scheduled),
                        tuple(e.seq.seq_id for e in plan.scheduled if kv.sequence(e.seq.seq_id).staged),
                        # (each logged stage / fetch carries the chunks it copies: none for a
                        # sequence that finds its KV still in its slot)
                        sum(copied for op, _, copied in ops if op in ("stage", "fetch")))
            step_count += 1
            launched.append(step)
            in_flight.append((step, plan.scheduled))
        if not in_flight:
            idle_rounds += 1  # a group waits for another to shed a sequence at its turn
            if idle_rounds > settings.num_micro_batches + 1:
                raise RuntimeError("no sequence can make progress: the KV pool is too small for the workload")
            schedule.rounds.append(Round(tuple(launched), (), ()))
            continue
        idle_rounds = 0
        wanted = returns[round_index] if returns is not None and round_index < len(returns) else 1
        returned, finished = [], []
        groups_before = {seq.seq_id: seq.micro_batch for seq in scheduler.running}
        for _ in range(max(1, min(wanted, len(in_flight)))):
            step, entries = in_flight.popleft()
            for entry in entries:
                if entry.samples and entry.preemptions == entry.seq.num_preemptions:
                    entry.seq.token_ids.append(1)
                    if entry.seq.num_output_tokens >= entry.seq.params.max_tokens:
                        scheduler.finish(entry.seq)
                        finished.append(entry.seq.seq_id)
            scheduler.step_done(step.micro_batch)
            returned.append(step.index)
        moved = tuple(seq.seq_id for seq in scheduler.running if groups_before.get(seq.seq_id, seq.micro_batch)
                      != seq.micro_batch)
        schedule.rounds.append(Round(tuple(launched), tuple(returned), tuple(finished), moved))
    else:
        raise RuntimeError(f"the schedule did not finish in {max_rounds} rounds")
    schedule.preemptions = scheduler.num_preemptions
    schedule.host_resident_requests = len(scheduler.host_resident_ids)
    schedule.final_kv_ops = tuple(kv.take_log())
    return schedule
