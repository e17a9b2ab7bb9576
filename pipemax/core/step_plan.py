"""The step plan: what one micro-batch step asks of every pipeline stage.

The scheduler (rank 0) decides; each stage only applies. A plan is a small record of plain ints
and lists (and the SamplingParams of sequences the last stage meets for the first time), so it
can travel with the activations from stage to stage.

KV chunks: the scheduler's KV manager records every allocate / append / free it performs as
`kv_ops`; each stage replays them, in plan order, on its own KV manager. Allocation is
deterministic (lowest free id first), so every stage ends up with the same chunk tables without
ever sending one. The prefix cache's decisions too: "cache_chunk", "allocate_with_prefix" (a
sequence that starts with cached entries, promoting host-only ones) and each eviction of a cached
chunk ("evict_gpu", which may demote it to the host, and "evict_host"), logged before the operation
that needed the room, so a stage never chooses what to evict. Residency travels the same way:
"begin_step" opens the step's staging slot, "stage" gives a host-resident sequence ring ids there
(its prefetch), "allocate_host" admits a new host-resident sequence into the slot, "offload" and
"fetch" move a sequence between the owned region and the host. The scheduler counts every copy
done at once; each stage runs them (kv_transfers.py) and orders later work after them by events.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .kv_manager import KVManager
from .sampling_params import SamplingParams

KVOp = tuple[str, int, object]  # (operation, seq_id, tokens): allocate, allocate_host, append, free,
# offload, stage, fetch; begin_step (step, 0); cache_chunk (seq_id, chunk index),
# allocate_with_prefix (seq_id, (entries, tokens)), evict_gpu (entry, demoted), evict_host (entry, 0)


@dataclass
class StagePlan:
    micro_batch: int
    kv_ops: list[KVOp]  # replayed on every stage before the step runs
    seq_ids: list[int]  # the scheduled sequences: decodes first, then prefill pieces
    starts: list[int]  # first position computed for each
    counts: list[int]  # tokens computed for each (1 for a decode)
    num_decode: int
    samples: list[bool]  # the step yields the sequence's next token
    token_ids: list[int]  # the step's input tokens, packed in sequence order (read by the first stage)
    new_seqs: list[tuple[int, list[int], SamplingParams]] = field(default_factory=list)  # sampler state to create
    released: list[int] = field(default_factory=list)  # sampler state to drop (finished or aborted)
    # Running ahead: (row of token_ids, index among the previous step's sampled ids) for input
    # tokens the previous step is still sampling; the first stage takes them from the device.
    carried: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def sample_rows(self) -> list[int]:
        """Rows of the step's hidden states whose logits are sampled: a sequence's last token."""
        rows, end = [], 0
        for count, samples in zip(self.counts, self.samples):
            end += count
            if samples:
                rows.append(end - 1)
        return rows


@dataclass
class SampledTokens:
    """What the last stage sends back to rank 0 for one step, in sample_rows order."""
    seq_ids: list[int]
    tokens: list[int]
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None


class RecordingKVManager(KVManager):
    """The scheduler's KV manager: it also logs each successful change for the stages to replay."""

    def __init__(self, num_gpu_chunks: int, num_host_chunks: int, chunk_tokens: int, staging_chunks: int = 0):
        super().__init__(num_gpu_chunks, num_host_chunks, chunk_tokens, staging_chunks)
        self.log: list[KVOp] = []
        self.prefix_cache.on_evict = self._log_eviction  # (kept across reset)

    def _log_eviction(self, tier: str, entry: int, demoted: bool) -> None:
        self.log.append((f"evict_{tier}", entry, demoted))

    def allocate(self, seq_id: int, num_tokens: int) -> list[int]:
        chunks = super().allocate(seq_id, num_tokens)
        self.log.append(("allocate", seq_id, num_tokens))
        return chunks

    def allocate_host(self, seq_id: int, num_tokens: int) -> list[int]:
        chunks = super().allocate_host(seq_id, num_tokens)
        self.log.append(("allocate_host", seq_id, num_tokens))
        return chunks

    def begin_step(self, step: int) -> None:
        super().begin_step(step)
        self.log.append(("begin_step", step, 0))

    def append(self, seq_id: int, count: int = 1) -> None:
        super().append(seq_id, count)
        self.log.append(("append", seq_id, count))

    def allocate_with_prefix(self, seq_id: int, shared: list[int], num_tokens: int) -> list[int]:
        chunks = super().allocate_with_prefix(seq_id, shared, num_tokens)
        self.log.append(("allocate_with_prefix", seq_id, (tuple(shared), num_tokens)))
        return chunks

    def cache_chunk(self, seq_id: int, index: int) -> int:
        chunk = super().cache_chunk(seq_id, index)
        self.log.append(("cache_chunk", seq_id, index))
        return chunk

    def free(self, seq_id: int) -> None:
        super().free(seq_id)
        self.log.append(("free", seq_id, 0))

    def offload(self, seq_id: int) -> list[tuple[int, int]]:
        pairs = super().offload(seq_id)
        self.log.append(("offload", seq_id, len(pairs)))  # (the chunks it copies)
        return pairs

    def stage(self, seq_id: int) -> list[tuple[int, int]]:
        pairs = super().stage(seq_id)
        self.log.append(("stage", seq_id, len(pairs)))  # (the chunks it copies)
        return pairs

    def fetch(self, seq_id: int) -> list[tuple[int, int]]:
        pairs = super().fetch(seq_id)
        self.log.append(("fetch", seq_id, len(pairs)))  # (the chunks it copies)
        return pairs

    def reset(self) -> None:
        super().reset()
        self.log = []

    def take_log(self) -> list[KVOp]:
        log, self.log = self.log, []
        self.prefix_cache.copies.clear()  # (the stages run them: this manager only decides)
        return log


def apply_kv_ops(kv: KVManager, ops: list[KVOp], copies=None) -> None:
    """Replay the scheduler's KV decisions on a KV manager. On a stage with a host pool, `copies`
    (kv_transfers.KVTransfers) runs the copies of residency changes and of the prefix cache's
    tiers, and orders chunk reuse."""
    for op, seq_id, tokens in ops:
        if op == "begin_step":
            kv.begin_step(seq_id)
            if copies is not None:
                copies.begin_step(seq_id)
        elif op == "allocate":
            chunks = kv.allocate(seq_id, tokens)
            _run_cache_copies(kv, copies)
            if copies is not None:
                copies.claim(chunks)
        elif op == "allocate_host":
            kv.allocate_host(seq_id, tokens)
            _run_cache_copies(kv, copies)
            if copies is not None:
                copies.claim_host(kv.sequence(seq_id).host_chunks)
        elif op == "allocate_with_prefix":
            shared, num_tokens = tokens
            chunks = kv.allocate_with_prefix(seq_id, list(shared), num_tokens)
            _run_cache_copies(kv, copies)  # promotions of host-only entries, into chunks that wait for them
            if copies is not None:
                copies.claim(chunks[len(shared):])
        elif op == "cache_chunk":
            kv.cache_chunk(seq_id, tokens)
        elif op in ("evict_gpu", "evict_host"):
            kv.evict_cached(op.removeprefix("evict_"), seq_id, bool(tokens))
            _run_cache_copies(kv, copies)
        elif op == "append":
            held = kv.sequence(seq_id)
            gpu_before, host_before = len(held.gpu_chunks), len(held.host_chunks)
            kv.append(seq_id, tokens)
            _run_cache_copies(kv, copies)
            if copies is not None:
                copies.claim(held.gpu_chunks[gpu_before:])
                copies.claim_host(held.host_chunks[host_before:])
        elif op == "free":
            if copies is not None:
                held = kv.sequence(seq_id)
                copies.freeing(seq_id, held.gpu_chunks, finished=True, cached=_cached(kv, seq_id),
                               host_chunks=held.host_chunks)
            kv.free(seq_id)
        elif op == "offload":
            cached = _cached(kv, seq_id)
            pairs = kv.offload(seq_id)
            _run_cache_copies(kv, copies)
            if copies is not None:
                copies.claim_host([host for _, host in pairs])
                copies.offload(seq_id, pairs)
                copies.freeing(seq_id, [gpu for gpu, _ in pairs], cached=cached)
        elif op == "stage":
            pairs = kv.stage(seq_id)
            if copies is not None:
                copies.prefetch(seq_id, pairs)
        elif op == "fetch":
            pairs = kv.fetch(seq_id)
            _run_cache_copies(kv, copies)
            if copies is not None:
                copies.claim([gpu for _, gpu in pairs])
                copies.prefetch(seq_id, pairs, host_freed=True)
        else:
            raise ValueError(f"unknown KV operation {op!r}")


def _cached(kv: KVManager, seq_id: int) -> list[int]:
    """The sequence's GPU chunks that are shared prefix chunks (others may still read them)."""
    return [chunk for chunk in kv.sequence(seq_id).gpu_chunks if chunk in kv.prefix_cache.by_gpu_chunk]


def _run_cache_copies(kv: KVManager, copies) -> None:
    """Run the demotions and promotions the last operation queued, in order (a run of one kind
    in one copy). Without a host pool there are none."""
    queued, kv.prefix_cache.copies = kv.prefix_cache.copies, []
    if copies is None or not queued:
        return
    start = 0
    for end in range(1, len(queued) + 1):
        if end == len(queued) or queued[end][0] != queued[start][0]:
            run = queued[start:end]
            (copies.demote if run[0][0] == "demote" else copies.promote)([(a, b) for _, a, b in run])
            start = end
