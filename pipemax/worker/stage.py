"""One pipeline stage: its layers, its KV pool and KV manager, and (on the last stage) the sampler.

A stage applies step plans; it decides nothing. For each plan it replays the scheduler's KV
operations on its own KV manager (so its chunk tables match every other stage's), runs its
layers on the plan's tokens, and hands on hidden states, or on the last stage samples the next
tokens. Sampled ids come back as `PendingTokens`: the device-to-host copy is started at once
into pinned memory and only waited for when the engine asks for the result, so the host can plan
and launch another micro-batch meanwhile.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from pipemax.core.kv_manager import KVManager
from pipemax.core.sampling_params import SamplingParams
from pipemax.core.step_plan import SampledTokens, StagePlan
from pipemax.models import LlamaFamilyModel

from .kv_pool import KVPool
from .kv_transfers import KVTransfers
from .model_runner import ModelRunner
from .sampling import apply_penalties, device_tensor, row_seed, sample_on_device, to_host


@dataclass
class SamplerState:
    """What the last stage keeps of a sequence to sample it: parameters and token history (the
    prompt's ids on the device once penalties need them)."""
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    prompt_on_device: torch.Tensor | None = None
    # Tokens sampled so far, counted as they are drawn: a step launched before the one before it
    # has come back draws with the right key (output_token_ids lags until the tokens arrive).
    num_sampled: int = 0

    def prompt_ids(self, device: torch.device) -> list[int] | torch.Tensor:
        """For repetition_penalty: the prompt's ids, uploaded once per request."""
        if self.params.repetition_penalty == 1:
            return self.prompt_token_ids
        if self.prompt_on_device is None:
            self.prompt_on_device = device_tensor(self.prompt_token_ids, torch.int64, device)
        return self.prompt_on_device


class PendingTokens:
    """Sampled ids (and logprobs) of one step, on their way to the host."""

    def __init__(self, seq_ids: list[int], sampled, params: list[SamplingParams], on_result):
        self.seq_ids, self.params, self.on_result = seq_ids, params, on_result
        chosen, logprobs, top = sampled
        self.event = None
        device = chosen.device
        if device.type == "cuda":
            # Into pinned memory without blocking the host; the event says when it has landed.
            chosen, logprobs, top = (_to_pinned(chosen), _to_pinned(logprobs),
                                     None if top is None else (_to_pinned(top[0]), _to_pinned(top[1])))
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(device))  # the copies' stream, on their device
        self.sampled = (chosen, logprobs, top)
        self._result: SampledTokens | None = None

    def result(self) -> SampledTokens:
        if self._result is None:
            if self.event is not None:
                self.event.synchronize()
            tokens, logprobs, top = to_host(self.sampled, self.params)
            self._result = SampledTokens(self.seq_ids, tokens, logprobs, top)
            self.on_result(self._result)
        return self._result


def _to_pinned(tensor: torch.Tensor | None) -> torch.Tensor | None:
    if tensor is None:
        return None
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


class StageExecutor:
    def __init__(self, index: int, model: LlamaFamilyModel, kv_pool: KVPool, kv: KVManager, attention_backend: str,
                 eos_token_ids: set[int] | None = None, seed: int = 0):
        self.index = index
        self.model = model
        self.kv_pool = kv_pool
        self.kv = kv
        self.device = kv_pool.device
        self.runner = ModelRunner(model, kv_pool, kv, attention_backend)
        self.transfers = KVTransfers(kv_pool)
        self.transfers.track = f"stage {index}"
        self.is_first, self.is_last = model.is_first, model.is_last
        # Last stage only: sampling state per sequence, and the keys of unseeded rows' noise (a
        # seeded row's key comes from its seed and step: row_seed).
        self.samplers: dict[int, SamplerState] = {}
        self.eos_token_ids = eos_token_ids or set()
        self.noise_keys = random.Random(seed)
        self.replays_kv_ops = True  # False: the stage uses the scheduler's own manager (share_manager)
        self.last_sampled_ids: torch.Tensor | None = None  # last stage: the newest step's ids, on the device
        self.sampled_source: StageExecutor | None = None  # first stage: the last stage of its pipeline (in process)

    def share_manager(self, kv: KVManager) -> None:
        """Use the scheduler's KV manager itself (the only stage, in the scheduler's process, with no
        host pool and so no copies to drive): its decisions are already this stage's chunk tables
        when a plan is submitted, and replaying them on a second manager is host time for nothing."""
        if self.transfers.enabled:
            raise ValueError("a stage with a host pool replays the KV operations: their copies run from there")
        self.kv = self.runner.kv = kv
        self.replays_kv_ops = False

    def enable_cuda_graphs(self, max_batch: int, max_model_len: int, max_tokens: int = 0) -> None:
        self.runner.enable_cuda_graphs(max_batch, max_model_len, max_tokens)

    def execute(self, plan: StagePlan, hidden_in: torch.Tensor | None = None, clock=None, shared_batch=None):
        """(hidden states for the next stage, or on the last stage the step's PendingTokens; the
        batch, which a next stage on the same device may share: see ModelRunner.build_batch).
        A clock (pipeline.StageClock) marks when the device work starts and ends: the host's
        preparation of the batch before it is the device's wait for the host."""
        if self.replays_kv_ops:
            self.transfers.replay(self.kv, plan.kv_ops)
        for op, seq_id, _ in plan.kv_ops:
            if op == "free" and seq_id not in self.kv.sequences:
                self.runner.tables.forget(seq_id)
        if self.is_last:
            self.release(plan.released)
            for seq_id, prompt_token_ids, params in plan.new_seqs:
                self.samplers[seq_id] = SamplerState(params, prompt_token_ids)
        batch = self.runner.build_batch(plan, shared_batch)
        if plan.carried:
            self._carry_sampled_ids(plan, batch[0])
        rows_of, by_layer = self._write_through_rows(plan) if self.transfers.enabled else ({}, False)
        if by_layer:
            self.runner.attention.after_store = self.transfers.write_back_by_layer(rows_of)
        self.transfers.before_compute()
        start = clock.now() if clock is not None else None
        try:
            out = self.runner.forward(plan, batch, hidden_in)
        finally:
            self.runner.attention.after_store = None
        if self.is_last:
            out = self._sample(plan, out)
        if clock is not None:
            clock.add(self.index, start, clock.now())
        if self.transfers.enabled:
            self.transfers.after_compute(plan.seq_ids)
            if not by_layer:
                self.transfers.write_back(rows_of)  # on its own stream, after the step's stores
            self.transfers.end_step()
        return out, batch

    def _carry_sampled_ids(self, plan: StagePlan, input_ids: torch.Tensor) -> None:
        """Input tokens the step before is still sampling (the engine ran ahead of its tokens): copied
        on the device from that step's ids, which the stream computes first. No host wait."""
        source = self.sampled_source.last_sampled_ids if self.sampled_source is not None else None
        if source is None:
            raise RuntimeError("a step carries tokens from a step this stage has not seen")
        rows, indices = self.runner.upload_long([row for row, _ in plan.carried] +
                                                [index for _, index in plan.carried]).split(len(plan.carried))
        input_ids.index_copy_(0, rows, source.index_select(0, indices).to(input_ids.dtype))

    def _write_through_rows(self, plan: StagePlan) -> tuple[dict, bool]:
        """New KV rows of host-resident (staged) sequences go to their host copies as well, so
        their staging slot can be reused after the step with nothing to copy back. A step that carries
        prefill rows of such sequences (and runs eagerly) writes them layer by layer, as they are
        produced (a decode step, graph or not, carries none); a decode step's few rows go in one
        copy after the step. (rows, by layer)."""
        rows_of, prefill = {}, False
        for seq_id, start, count in zip(plan.seq_ids, plan.starts, plan.counts):
            if self.kv.sequence(seq_id).staged:
                rows_of[seq_id] = self.kv.write_back_rows(seq_id, start, start + count)
                prefill = prefill or count > 1
        return rows_of, prefill

    def reset(self) -> None:
        """No sequence and every chunk free, whatever the last (maybe failed) step left."""
        self.kv.reset()
        self.transfers.reset()
        self.runner.tables.reset()
        self.samplers.clear()

    def release(self, seq_ids: list[int]) -> None:
        for seq_id in seq_ids:
            self.samplers.pop(seq_id, None)

    def _sample(self, plan: StagePlan, logits: torch.Tensor) -> PendingTokens:
        seq_ids = [seq_id for seq_id, samples in zip(plan.seq_ids, plan.samples) if samples]
        states = [self.samplers[seq_id] for seq_id in seq_ids]
        params = [state.params for state in states]
        processed = None
        if any(p.has_penalties for p in params):
            histories = [(state.prompt_ids(self.device), state.output_token_ids) for state in states]
            processed = apply_penalties(logits.float(), params, histories, self.eos_token_ids)
        # (greedy rows draw no noise: their key is never read)
        seeds = [row_seed(p.seed, state.num_sampled) if p.seed is not None else 0 if p.greedy
                 else self.noise_keys.getrandbits(63) for p, state in zip(params, states)]
        for state in states:
            state.num_sampled += 1
        sampled = sample_on_device(logits, params, seeds, processed, greedy_ids=self.runner.greedy_ids)
        self.last_sampled_ids = sampled[0]

        def record(result: SampledTokens) -> None:  # the history that penalties read next step
            for state, token in zip(states, result.tokens):
                state.output_token_ids.append(token)

        return PendingTokens(seq_ids, sampled, params, record)
