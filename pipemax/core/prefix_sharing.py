"""The scheduler's side of prefix caching (issue 12): which cached chunks a request starts with,
which chunks a returned step made shareable, and what the waiting requests still want.

  - A request admitted from the start takes the cached entries of its longest cached prefix but
    its last token (whose logits its step must compute); the rest is prefilled.
  - After a step returns, its sequences' newly full chunks are indexed and become shared, unless
    the same prefix is cached already (the sequence then keeps its own copy).
  - Demand: the chunk keys of every waiting request's prompt. The KV manager's prefix cache asks
    `wanted` before it evicts: chunks no waiting request wants go first, and only wanted ones are
    demoted to the host tier rather than dropped.
  - Deferral: a request whose next uncached chunk a running sequence is computing right now waits
    until that chunk is indexed (other requests are admitted meanwhile), so a batch of requests
    sharing a few-shot prefix computes it once, not once per request admitted in the same step.

Keys are hashed once per request (at submission, over its prompt) and extended chunk by chunk as
sequences grow; nothing is rehashed on the step path.
"""

from __future__ import annotations

from collections import Counter

from .kv_manager import KVManager, Residency
from .prefix_index import ROOT, PrefixIndex, chunk_keys
from .sequence import Sequence, SequenceStatus


class PrefixSharing:
    def __init__(self, kv: KVManager):
        self.kv = kv
        self.chunk_tokens = kv.chunk_tokens
        self.index = PrefixIndex(kv.chunk_tokens)
        self.keys: dict[int, list[int]] = {}  # seq_id -> keys of its full chunks known so far
        self.indexed: dict[int, int] = {}  # running seq_id -> its chunks already indexed or skipped
        self.promised: dict[int, list[int]] = {}  # running seq_id -> keys it will index, not yet indexed
        self.producing: Counter = Counter()  # key -> running sequences about to index it
        self.demand: Counter = Counter()  # key -> waiting requests whose prompts hold it
        self.cached_tokens = 0  # tokens of admitted requests whose KV came from the cache
        self.needed_tokens = 0  # tokens admitted requests needed KV for (a preempted one's again)
        self._hook()

    def _hook(self) -> None:
        self.kv.prefix_cache.on_drop = self.index.forget
        self.kv.prefix_cache.wanted = self.wanted

    def reset(self) -> None:
        """After an abort (the KV manager is reset too): nothing cached, nothing waiting."""
        self.__init__(self.kv)

    def wanted(self, entry: int) -> bool:
        """A waiting request's prompt holds this cached chunk's prefix."""
        indexed = self.index.by_entry.get(entry)
        return indexed is not None and self.demand[indexed.key] > 0

    # ---- the waiting queue -------------------------------------------------------------------
    def waiting(self, seq: Sequence) -> None:
        """seq (re)joins the waiting queue: the keys of its tokens but the last count as demand."""
        keys = chunk_keys(seq.token_ids[:len(seq.token_ids) - 1], self.chunk_tokens)
        self.keys[seq.seq_id] = keys
        self.demand.update(keys)

    def match(self, seq: Sequence, host_room: int | None = None) -> list[int] | None:
        """The cache entries seq starts with (host-only ones while host_room, the micro-batch's
        prefetch budget in chunks, covers them), or None: a running sequence is computing its
        next chunk, so it had better wait for it."""
        keys = self.keys[seq.seq_id]
        entries = self.index.match(seq.token_ids[:len(seq.token_ids) - 1], keys)
        if len(entries) < len(keys) and self.producing[keys[len(entries)]] > 0:
            return None
        if host_room is not None:
            for count, entry in enumerate(entries):
                if not self.kv.prefix_cache.on_gpu(entry):
                    host_room -= 1
                    if host_room < 0:
                        return entries[:count]
        return entries

    def admitted(self, seq: Sequence, shared: list[int]) -> None:
        keys = self.keys[seq.seq_id]
        _discount(self.demand, keys)
        self.cached_tokens += len(shared) * self.chunk_tokens
        self.needed_tokens += len(seq.token_ids)
        self.indexed[seq.seq_id] = len(shared)
        self.promised[seq.seq_id] = keys[len(shared):]
        self.producing.update(self.promised[seq.seq_id])

    def gone(self, seq: Sequence) -> None:
        """seq finished, or was preempted (it joins the waiting queue again through `waiting`)."""
        self._keep_promise(seq.seq_id, len(self.promised.get(seq.seq_id, ())))
        self.promised.pop(seq.seq_id, None)
        self.indexed.pop(seq.seq_id, None)
        self.keys.pop(seq.seq_id, None)

    def _keep_promise(self, seq_id: int, count: int) -> None:
        """The first `count` keys seq_id promised are indexed (or never will be by it)."""
        promised = self.promised.get(seq_id)
        if promised:
            _discount(self.producing, promised[:count])
            del promised[:count]

    # ---- a returned step ---------------------------------------------------------------------
    def index_step(self, group: list[Sequence]) -> None:
        """Index the chunks the returned step filled, so that later requests share them."""
        chunk_tokens = self.chunk_tokens
        for seq in group:
            if seq.status is not SequenceStatus.RUNNING:
                continue
            done = self.indexed[seq.seq_id]
            full = min(seq.num_computed_tokens, len(seq.token_ids)) // chunk_tokens
            if full <= done or self.kv.residency(seq.seq_id) is not Residency.GPU:
                continue  # (most decode steps fill no chunk; a host-resident one computed nothing)
            keys = self.keys[seq.seq_id]
            if len(keys) < full:  # chunks of generated tokens: their keys follow on
                keys += chunk_keys(seq.token_ids, chunk_tokens, keys[-1] if keys else ROOT, len(keys) * chunk_tokens,
                                   full * chunk_tokens)
            reached = done
            for index in range(done, full):
                parent = keys[index - 1] if index else ROOT
                if keys[index] in self.index.by_key:
                    reached = index + 1  # cached elsewhere already: this one keeps its own copy
                    continue
                if parent != ROOT and parent not in self.index.by_key:
                    # The chunk before is no longer cached: nothing after it can match (until that
                    # prefix is cached again), so nobody should wait for this sequence's chunks.
                    self._keep_promise(seq.seq_id, len(self.promised.get(seq.seq_id, ())))
                    break
                tokens = tuple(seq.token_ids[index * chunk_tokens:(index + 1) * chunk_tokens])
                self.index.insert(keys[index], parent, tokens, self.kv.cache_chunk(seq.seq_id, index))
                reached = index + 1
            self._keep_promise(seq.seq_id, reached - done)
            self.indexed[seq.seq_id] = reached


def _discount(counter: Counter, keys: list[int]) -> None:
    """One less of each key; keys at zero go (a long-lived engine sees millions of keys)."""
    for key in keys:
        left = counter[key] - 1
        if left > 0:
            counter[key] = left
        else:
            del counter[key]
