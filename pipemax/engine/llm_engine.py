"""The engine loop: schedule a micro-batch -> run it through the pipeline -> read its tokens later.

    plan = scheduler.schedule(m)         which sequences of micro-batch m, how many tokens each
    pending = pipeline.submit(...)       every stage applies the plan; the last one samples
    ... plan and submit the other micro-batches while the device works ...
    tokens = pending.result()            the oldest step's tokens: stop checks, finished requests

The host never waits for a step before it has launched every micro-batch that can run, so with
M >= 2 micro-batches it plans one while the device runs another (P = 1), and with P stages every
stage has work (M >= P). Only this loop knows requests and text; stages see step plans.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

from pipemax.core.cost_model import StepCostModel
from pipemax.core.kv_manager import KVManager
from pipemax.core.prefetch_budget import PrefetchBudget, staging_slot_chunks
from pipemax.core.scheduler import Scheduler, StepPlan
from pipemax.core.sequence import Sequence
from pipemax.core.step_plan import RecordingKVManager, SampledTokens, StagePlan
from pipemax.models import LlamaFamilyModel, ModelConfig, load_model, model_config_at
from pipemax.models.config import model_shape
from pipemax.parallel.cluster import current_cluster
from pipemax.parallel.distributed import DistributedPipeline, StageSpec, free_port, stage_devices
from pipemax.parallel.partition import PartitionError, partition_layers
from pipemax.parallel.pipeline import InProcessPipeline
from pipemax.worker.kv_pool import KVPool, KVPoolSpec
from pipemax.worker.kv_transfers import measure_copy_bandwidth
from pipemax.worker.memory_budget import kv_budget_bytes
from pipemax.worker.stage import PendingTokens, StageExecutor
from pipemax.worker.timeline import Timeline, hidden_fraction

from .config import DTYPES, ConfigError, EngineConfig  # noqa: F401 (re-exported)
from .cpu_threads import use_cpu_threads
from .step_costs import load_step_costs, save_step_costs, step_code_digest

log = logging.getLogger("pipemax")


@dataclass
class FinishedRequest:
    seq_id: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    finish_reason: str
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None
    stop_text_end: int | None = None  # where a matched stop string starts in the output text
    num_preemptions: int = 0


def check_prompt_ids(prompt_token_ids: list[int], max_model_len: int, vocab: int) -> None:
    """Raise ValueError for a prompt an engine of that context and vocabulary cannot serve."""
    if not prompt_token_ids:
        raise ValueError("the prompt is empty")
    if len(prompt_token_ids) >= max_model_len:
        raise ValueError(f"the prompt has {len(prompt_token_ids)} tokens; the maximum context is "
                         f"{max_model_len} tokens, output included")
    bad = next((t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab), None)
    if bad is not None:
        raise ValueError(f"token id {bad!r} is outside the vocabulary [0, {vocab})")


@dataclass
class InFlight:
    micro_batch: int
    plan: StepPlan
    pending: PendingTokens
    span: object = None  # (start, end) of the step's device work in this process (the cost model's measure)


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer=None, model: LlamaFamilyModel | None = None):
        """Loads config.model, unless a built model (with weights, on the device) is given:
        benchmarks pass random-weight models of real shapes that way."""
        self.config = config
        self.device = config.resolved_device()
        self.dtype = config.resolved_dtype()
        self.kv_dtype = config.resolved_kv_dtype()  # what the KV pools hold: the model's dtype or fp8
        self.tokenizer = tokenizer
        path = Path(config.model)
        self.model_config: ModelConfig = model_config_at(path) if model is None else model.config
        try:
            self.stage_ranges = partition_layers(self.model_config, config.pipeline_parallel,
                                                 list(config.stage_layers) if config.stage_layers else None)
        except PartitionError as error:
            option = "stage_layers" if config.stage_layers else "pipeline_parallel"
            raise ConfigError(option, f"does not fit this model: {error}") from None
        self.distributed = config.pipeline_transport == "distributed" and len(self.stage_ranges) > 1
        self.cluster = current_cluster()  # under torchrun: this process heads a replica of the world
        if self.cluster is not None and len(self.stage_ranges) > 1 and not self.distributed:
            raise ConfigError("pipeline_transport", "inprocess runs every stage in one process: under torchrun the "
                                                    "stages are torchrun's ranks (use distributed)")
        if self.distributed and self.cluster is not None:  # the stage ranks' GPUs: alike, on their nodes
            self.stage_devices = [str(self.device)] * len(self.stage_ranges)
        elif self.distributed:
            if model is not None:
                raise ConfigError("pipeline_transport", "distributed: stage processes load their weights from the "
                                                        "model path; a model built in memory runs inprocess only")
            try:
                self.stage_devices = stage_devices(self.device, len(self.stage_ranges))
            except ValueError as error:
                raise ConfigError("pipeline_parallel", f"{error}: use --pipeline-transport inprocess to run every "
                                                       "stage on one device") from None
        else:
            self.stage_devices = [str(self.device)] * len(self.stage_ranges)
        self._eos_token_ids = self._eos_token_ids_of(path)
        if self.device.type == "cpu" and not self.distributed:  # (stage processes share the cores out themselves)
            use_cpu_threads()  # before the step-cost key, which names the thread count

        # One chunk count for every stage: the scheduler's decisions must fit each stage's pool.
        specs = [KVPoolSpec(end - start, self.model_config.num_kv_heads, self.model_config.head_dim,
                            config.chunk_tokens, self.dtype, self.kv_dtype) for start, end in self.stage_ranges]
        if self.distributed:  # a pool per device: the tightest decides
            budgets = [self._kv_budget_bytes(torch.device(device), [stage_range], here=rank == 0)
                       for rank, (device, stage_range) in enumerate(zip(self.stage_devices, self.stage_ranges))]
            num_chunks = min(budget // spec.chunk_bytes for budget, spec in zip(budgets, specs))
            kv_bytes, chunk_bytes = min(budgets), max(spec.chunk_bytes for spec in specs)
        else:  # every pool on this one device
            kv_bytes = self._kv_budget_bytes(self.device, self.stage_ranges)
            chunk_bytes = sum(spec.chunk_bytes for spec in specs)
            num_chunks = kv_bytes // chunk_bytes
        max_len = self.model_config.max_model_len
        if config.max_model_len is not None and config.max_model_len > max_len:
            log.warning("max_model_len %d is above this model's limit of %d tokens: using %d",
                        config.max_model_len, max_len, max_len)
        elif config.max_model_len is not None:
            max_len = config.max_model_len
        # The staging ring (offload): its size depends on the fitted step costs, known before the
        # stages are built (every stage's KV manager splits its pool the same way).
        self.num_micro_batches = config.num_micro_batches
        # The host one step ahead (async scheduling): where one micro-batch runs in this process. With
        # several micro-batches the others hide the planning; offload's staging ring follows the
        # launch order of whole steps, one per micro-batch in flight.
        self.runs_ahead = (config.async_scheduling and not self.distributed and self.num_micro_batches == 1
                           and config.offload == "off")
        self.step_cost_key = self._step_cost_key(config)
        seed, seed_path = load_step_costs(self.step_cost_key)
        self.cost_model = StepCostModel(seed=seed)
        self.cost_model_seeded_from = str(seed_path) if seed is not None else None
        # One device's link carries every in-process stage's chunks; a process per stage, its own.
        self.link_chunk_bytes = (max if self.distributed else sum)(spec.chunk_bytes for spec in specs)
        self.copy_bytes_per_second = 0.0
        if config.offload == "auto":
            self.copy_bytes_per_second = (config.prefetch_gbs * 1e9 if config.prefetch_gbs is not None
                                          else measure_copy_bandwidth(max(specs, key=lambda spec: spec.chunk_bytes), self.device))
        self.staging_chunks = staging_slot_chunks(config.offload, num_chunks, self.num_micro_batches,
                                                  config.prefix_caching, self._step_budget_chunks(num_chunks))
        # Host pools: every stage's (on this node) together in host_kv_bytes, chunk ids shared.
        self.num_host_chunks = config.host_kv_bytes() // sum(spec.chunk_bytes for spec in specs)
        if config.offload != "off" and self.num_host_chunks < 1:
            raise ConfigError("host_memory_gib", f"leaves no room for one host KV chunk of "
                                                 f"{sum(spec.chunk_bytes for spec in specs) / 2**20:.2f} MiB")
        # A sequence lives whole in the owned region, or in one staging slot and its host copy.
        owned = num_chunks - 2 * self.staging_chunks
        room = max(owned, min(self.staging_chunks, self.num_host_chunks))
        if room * config.chunk_tokens < max_len:
            if room < 1:
                raise ConfigError("kv_cache_gib", f"leaves a KV budget of {kv_bytes / 2**30:.2f} GiB, less than one "
                                                  f"chunk of {chunk_bytes / 2**20:.2f} MiB: give the KV cache more")
            log.warning("KV pool holds %d tokens: max_model_len lowered from %d", room * config.chunk_tokens, max_len)
            max_len = room * config.chunk_tokens
        self.max_model_len = max_len
        backend = config.attention_backend
        if backend == "auto":
            backend = "triton" if self.device.type == "cuda" else "torch"
        if self.distributed:  # the stage processes load their layers while this one loads stage 0
            self.pipeline = self._spawn_stages(path, num_chunks, backend)
        try:
            if model is None:  # the distributed rank 0 holds stage 0 only
                end = self.stage_ranges[0][1] if self.distributed else None
                model = load_model(path, 0, end, device=self.device, dtype=self.dtype, config=self.model_config)
            self.model = model
            self._build_stages(model, specs, num_chunks, backend)
        except BaseException:
            if self.distributed:
                self.pipeline.close()
            raise
        # The scheduler's own KV manager decides; every stage replays its log.
        self.kv = RecordingKVManager(num_chunks, self.num_host_chunks, config.chunk_tokens, self.staging_chunks)
        if not self.distributed and len(self.stages) == 1 and self.num_host_chunks == 0:
            self.stages[0].share_manager(self.kv)  # one stage here, no copies to drive: no replay
        budget = None
        if config.offload == "auto":
            budget = PrefetchBudget(self.cost_model, self.copy_bytes_per_second, self.link_chunk_bytes,
                                    self.num_micro_batches)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens, config.prefill_mode,
                                   self.num_micro_batches, config.offload, budget, self.cost_model,
                                   prefix_caching=config.prefix_caching)
        self._sequences: dict[int, Sequence] = {}
        self._new_seqs: list[Sequence] = []  # added since the last plan: the last stage has no sampler state yet
        self._released: list[int] = []  # finished since the last plan: the last stage drops their state
        self._last_sampled: dict[int, int] = {}  # seq_id -> its row among the newest step's sampled ids
        self._in_flight: deque[InFlight] = deque()
        self._ids = itertools.count()
        self.num_steps = 0
        self.last_run_stats: dict = {}

    def _build_stages(self, model: LlamaFamilyModel, specs: list[KVPoolSpec], num_chunks: int, backend: str) -> None:
        config = self.config
        local_ranges = self.stage_ranges[:1] if self.distributed else self.stage_ranges
        self.stages = []
        for index, ((start, end), spec) in enumerate(zip(local_ranges, specs)):
            stage_model = model if (start, end) == (model.layer_start, model.layer_end) else model.stage(start, end)
            pool = KVPool(spec, num_chunks, self.num_host_chunks, self.device, backend)
            kv = KVManager(num_chunks, self.num_host_chunks, config.chunk_tokens, self.staging_chunks)
            self.stages.append(StageExecutor(index, stage_model, pool, kv, backend,
                                             self._eos_token_ids, config.seed))
        if config.cuda_graphs and self.device.type == "cuda" and backend == "triton":
            for stage in self.stages:
                stage.enable_cuda_graphs(config.max_num_seqs, self.max_model_len, config.max_num_batched_tokens)
        if self.distributed:
            self.pipeline.attach(self.stages[0])
        else:
            self.pipeline = InProcessPipeline(self.stages)

    def _spawn_stages(self, path: Path, num_chunks: int, backend: str) -> DistributedPipeline:
        """The stage processes, spawned on this node, or under torchrun the ranks after this one."""
        config, world = self.config, len(self.stage_ranges)
        head = self.cluster.rank if self.cluster is not None else 0
        init_method = "env://" if self.cluster is not None else f"tcp://127.0.0.1:{free_port()}"
        specs = [StageSpec(head + stage, world, init_method, config.stage_timeout, str(path), self.stage_ranges[stage],
                           self.stage_devices[stage], self.dtype, config.chunk_tokens, num_chunks, backend,
                           config.cuda_graphs, config.max_num_seqs, self.max_model_len, set(self._eos_token_ids),
                           config.seed, head_rank=head, num_host_chunks=self.num_host_chunks,
                           max_num_batched_tokens=config.max_num_batched_tokens,
                           staging_chunks=self.staging_chunks, kv_dtype=self.kv_dtype)
                 for stage in range(1, world)]
        return DistributedPipeline(specs, "nccl" if self.device.type == "cuda" else "gloo", self.device, self.cluster)

    def close(self) -> None:
        """End the stage processes of a distributed pipeline (nothing to do in process)."""
        self.pipeline.close()

    @property
    def eos_token_ids(self) -> set[int]:
        return self._eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, ids: set[int]) -> None:  # the last stage blocks them under min_tokens
        self._eos_token_ids = set(ids)
        if self.stages[-1].is_last:
            self.stages[-1].eos_token_ids = set(ids)

    @property
    def runner(self):
        """The model runner of a single-stage engine (tests swap its decode graphs)."""
        if len(self.stages) != 1:
            raise AttributeError("a pipelined engine has one runner per stage: see engine.stages")
        return self.stages[0].runner

    # ---- setup helpers -----------------------------------------------------------------------
    def _step_budget_chunks(self, num_chunks: int) -> int:
        """offload=auto: the chunks one step's prefetch can bring back behind a full decode step
        of the step before (the fitted cost model's prediction); 0 without a fit."""
        if self.config.offload != "auto" or not self.cost_model.ready:
            return 0
        seqs = self.config.max_num_seqs
        context = min(num_chunks * self.config.chunk_tokens, seqs * self.model_config.max_model_len // 2)
        seconds = self.cost_model.predict(seqs, context)
        if not seconds:
            return 0
        return int(self.copy_bytes_per_second * seconds // self.link_chunk_bytes)

    def _kv_budget_bytes(self, device: torch.device, stage_ranges: list[tuple[int, int]], here: bool = True) -> int:
        """KV bytes for the pools on one device, which holds the stages in stage_ranges; `here`:
        the device this process runs on (another stage process's device is sized from its total)."""
        config = self.config
        if config.kv_cache_gib is not None:
            return int(config.kv_cache_gib * 2**30)
        if device.type != "cuda":
            return 2**30
        if config.gpu_memory_gib:
            budget = int(config.gpu_memory_gib * 2**30)
        elif here:  # 90% of what is free now (other processes, the weights already loaded count)
            free_now, _ = torch.cuda.mem_get_info(device)
            budget = int(0.9 * (free_now + torch.cuda.memory_allocated(device)))
        else:  # another stage's GPU: asking for its free memory would open a context there from this process
            budget = int(0.9 * torch.cuda.get_device_properties(device).total_memory)
        free = kv_budget_bytes(budget, self.model_config, stage_ranges, self.dtype, config.max_num_batched_tokens,
                               config.max_num_seqs, config.cuda_graphs)
        if free <= 0:
            weights = sum(self.model_config.weight_bytes(self.dtype, start, end) for start, end in stage_ranges)
            raise ConfigError("gpu_memory_gib", f"of {budget / 2**30:.1f} leaves no room for a KV cache after "
                                                f"{weights / 2**30:.1f} GiB of weights on {device}: give PipeMax more "
                                                "memory")
        return free

    def _eos_token_ids_of(self, path: Path) -> set[int]:
        ids: set[int] = set()

        def add(value):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(v for v in value if isinstance(v, int))

        add(getattr(self.model_config.hf_config, "eos_token_id", None))
        generation_config = path / "generation_config.json" if path.is_dir() else None
        if generation_config and generation_config.exists():
            import json

            add(json.loads(generation_config.read_text()).get("eos_token_id"))
        if self.tokenizer is not None:
            add(self.tokenizer.eos_token_id)
        return ids

    # ---- requests ----------------------------------------------------------------------------
    def check_prompt(self, prompt_token_ids: list[int]) -> None:
        """Raise ValueError for a prompt this engine cannot serve."""
        check_prompt_ids(prompt_token_ids, self.max_model_len, self.model_config.vocab_size)

    def add_request(self, prompt_token_ids: list[int], params) -> int:
        self.check_prompt(prompt_token_ids)
        seq_id = next(self._ids)
        seq = Sequence(seq_id, list(prompt_token_ids), params)
        self._sequences[seq_id] = seq
        self._new_seqs.append(seq)
        self.scheduler.add(seq)
        return seq_id

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def abort_all(self) -> None:
        """Drop every unfinished request and reset every stage (after an interrupted run, which may
        have stopped mid-step with some stages ahead of others). After a run that finished, nothing
        is left to drop: the prefix cache stays, for the next run (every stage replayed it alike)."""
        if not self.has_unfinished() and not self._in_flight:
            return
        self.scheduler.abort_all()
        self.kv.reset()
        self._sequences.clear()
        self._new_seqs.clear()
        self._released = []
        self._in_flight.clear()  # their tokens, if any come, are dropped by the pipeline's reset
        self.pipeline.reset()

    # ---- the loop ----------------------------------------------------------------------------
    def run(self) -> Iterator[FinishedRequest]:
        """Step until every added request has finished, yielding each as it finishes. Afterwards
        `last_run_stats` holds the run's pipeline figures."""
        in_flight = self._in_flight  # kept on the engine: an abort must account for steps still in flight
        # The run's timeline (what ran when): for --trace, and for how much copy time compute hid.
        timeline = Timeline(self.device) if self.config.trace or self.config.offload != "off" else None
        self.pipeline.start_run(timeline)
        self.scheduler.host_resident_ids.clear()
        prefix = self.scheduler.prefix
        if prefix is not None:
            prefix.cached_tokens = prefix.needed_tokens = 0
            self.scheduler.order_waiting_by_prefix()  # results are yielded as they finish: ids unchanged
        cache = self.kv.prefix_cache
        tier_moves_before = (cache, cache.num_demoted, cache.num_promoted)
        steps_before, sequences, idle_rounds = self.num_steps, 0, 0
        in_flight_seqs = 0  # summed at each launch: the sequences of every step in flight then
        launched_ahead = 0  # steps launched before the tokens of the step before were read
        phase_seconds = {"prefill": 0.0, "decode": 0.0}

        def launch(micro_batch: int) -> bool:
            nonlocal sequences, in_flight_seqs
            planned = time.perf_counter()
            step = self._launch(micro_batch)
            if step is None:
                return False
            if timeline is not None:
                timeline.add_host(f"plan micro-batch {micro_batch}", planned, time.perf_counter())
            in_flight.append(step)
            sequences += len(step.plan.scheduled)
            in_flight_seqs += sum(len(flying.plan.scheduled) for flying in in_flight)
            return True

        while True:
            busy = {step.micro_batch for step in in_flight}
            for micro_batch in range(self.num_micro_batches):
                if micro_batch not in busy:
                    launch(micro_batch)
            if not in_flight:
                if not self.has_unfinished():
                    break
                # A group waits for another to shed a sequence at its turn: at most a round or two.
                idle_rounds += 1
                if idle_rounds > self.num_micro_batches + 1:
                    raise RuntimeError("no sequence can make progress: give the KV cache more memory")
                continue
            idle_rounds = 0
            step = in_flight.popleft()
            if not in_flight and self._may_run_ahead(step):
                # the host one step ahead: the device goes on while we wait here
                launched_ahead += launch(step.micro_batch)
            waited = time.perf_counter()
            sampled = step.pending.result()
            if timeline is not None:
                timeline.add_host(f"tokens of micro-batch {step.micro_batch}", waited, time.perf_counter())
            seconds = self._measure(step)
            if seconds is not None:  # the device time of steps with prompt pieces, and of pure decode steps
                phase_seconds["prefill" if step.plan.prefill else "decode"] += seconds
            yield from self._complete(step, sampled)
        steps = self.num_steps - steps_before
        self.last_run_stats = {"stages": len(self.stage_ranges), "micro_batches": self.num_micro_batches,
                               "kv_cache_dtype": self.config.kv_storage(),
                               "stage_layers": [end - start for start, end in self.stage_ranges], "steps": steps,
                               "mean_micro_batch_seqs": sequences / steps if steps else 0.0,
                               # What the GPUs' KV serves at once: offload's gain (M steps in flight,
                               # each with its slot), where off's single pool is shared by all of them.
                               "mean_in_flight_seqs": in_flight_seqs / steps if steps else 0.0,
                               "preemptions": self.scheduler.num_preemptions, "steps_launched_ahead": launched_ahead,
                               # Device seconds of steps with prompt pieces and of pure decode steps
                               # (this process's stages; steps whose time was known when their tokens came).
                               "phase_seconds": phase_seconds,
                               "balancing_moves": self.scheduler.num_moves, **self.pipeline.stats()}
        self.last_run_stats["cost_model"] = {**self.cost_model.stats(), "seeded_from": self.cost_model_seeded_from}
        self.last_run_stats["prefix_cached_tokens"] = prefix.cached_tokens if prefix is not None else 0
        if prefix is not None:
            cache, demoted, promoted = tier_moves_before
            if cache is not self.kv.prefix_cache:  # (reset by an abort in between: counted from there)
                cache, demoted, promoted = self.kv.prefix_cache, 0, 0
            self.last_run_stats["prefix_cache"] = {
                "reused_tokens": prefix.cached_tokens, "prompt_tokens": prefix.needed_tokens,
                "demoted_chunks": cache.num_demoted - demoted, "promoted_chunks": cache.num_promoted - promoted}
        if steps:
            save_step_costs(self.cost_model, self.step_cost_key)  # the next engine starts from this fit
        if timeline is not None:
            intervals = timeline.intervals()  # the run is over: one wait for the device
            # On the CPU a copy runs on the thread that computes (inside a step, for write-through
            # by layer): nothing runs beside it.
            self.last_run_stats["copy_time_hidden_fraction"] = hidden_fraction(
                intervals, concurrent=self.device.type == "cuda")
            if self.config.trace:
                try:
                    timeline.write_trace(self.config.trace, intervals)
                except OSError as error:  # the folder went away during the run, say: the results still count
                    log.warning("the trace was not written to %s (%s)", self.config.trace, error.strerror or error)
        if self.config.offload != "off":
            # Requests to be host-resident that the full host pool left on the GPU: said, not silent.
            kept_on_gpu = len(self.scheduler.host_pool_full_ids - self.scheduler.host_resident_ids)
            self.scheduler.host_pool_full_ids.clear()
            self.last_run_stats["offload"] = {"mode": self.config.offload,
                                              "host_resident_requests": len(self.scheduler.host_resident_ids),
                                              "host_pool_full_requests": kept_on_gpu}
            if kept_on_gpu:
                log.warning("offload %s: %d request(s) stayed on the GPU because the host KV pool (%d chunks of %d "
                            "tokens) was full; give it more with --host-memory-gib", self.config.offload, kept_on_gpu,
                            self.kv.host.num_chunks, self.config.chunk_tokens)

    def _may_run_ahead(self, step: InFlight) -> bool:
        """The next step may be launched before this one's tokens are read: running ahead, and no row
        of this step needs its sampled history on the host first (penalties and min_tokens read
        the tokens so far; such a step is waited for, as every step is without running ahead)."""
        return self.runs_ahead and not any(entry.samples and entry.seq.params.has_penalties
                                           for entry in step.plan.scheduled)

    def _launch(self, micro_batch: int) -> InFlight | None:
        plan = self.scheduler.schedule(micro_batch)
        if not plan.scheduled:
            return None
        stage_plan = self._stage_plan(micro_batch, plan)
        for entry in plan.scheduled:
            entry.seq.num_computed_tokens = entry.end
        pending = self.pipeline.submit(stage_plan)
        self.num_steps += 1
        for entry in plan.scheduled:
            if entry.samples:  # a placeholder until its token comes back (_complete)
                seq = entry.seq
                seq.token_ids.append(0)
                seq.pending_tokens += 1
                seq.awaits_last_token = (seq.num_output_tokens >= seq.params.max_tokens
                                         or len(seq.token_ids) >= self.max_model_len)
        if self.runs_ahead:  # where each token sits among this step's sampled ids: the next step's carried inputs
            self._last_sampled = {seq_id: index for index, seq_id in enumerate(
                entry.seq.seq_id for entry in plan.scheduled if entry.samples)}
        return InFlight(micro_batch, plan, pending, self.pipeline.clock.step_span())

    def _step_cost_key(self, config) -> dict:
        """What a step's time depends on, naming the saved step-cost profile that fits it."""
        mc = self.model_config
        if self.device.type == "cuda":
            hardware = torch.cuda.get_device_name(self.device)
        else:
            hardware = f"cpu x {torch.get_num_threads()} threads"
        return {"device": hardware, **model_shape(mc),
                "dtype": str(self.dtype).removeprefix("torch."), "kv_cache_dtype": config.kv_storage(),
                "stage_layers": [e - s for s, e in self.stage_ranges],
                "transport": "distributed" if self.distributed else "inprocess",
                "attention_backend": config.attention_backend, "chunk_tokens": config.chunk_tokens,
                "offload": config.offload,  # (on the CPU, write-through runs inside the timed step)
                "cuda_graphs": bool(config.cuda_graphs and self.device.type == "cuda"),
                "step_code": step_code_digest(), "torch": torch.__version__, "triton": triton.__version__}

    def _measure(self, step: InFlight) -> float | None:
        """The step's device time, once it has run (no waiting), teaches the cost model; None when
        it is not known yet."""
        if step.span is None:
            return None
        seconds = self.pipeline.clock.span_seconds(step.span)
        if seconds is not None:
            self.cost_model.observe(step.plan.num_tokens, sum(e.end for e in step.plan.scheduled), seconds)
        return seconds

    def _stage_plan(self, micro_batch: int, plan: StepPlan) -> StagePlan:
        entries = plan.scheduled
        token_ids: list[int] = []
        carried: list[tuple[int, int]] = []  # inputs the step before is still sampling: (row, its sampled index)
        for entry in entries:
            seq = entry.seq
            known = len(seq.token_ids) - seq.pending_tokens
            if entry.end > known:  # only a decode's one input can be on its way, from the last step launched
                carried.append((len(token_ids) + known - entry.start, self._last_sampled[seq.seq_id]))
            token_ids += seq.token_ids[entry.start:entry.end]
        new_seqs = [(seq.seq_id, seq.prompt_token_ids, seq.params) for seq in self._new_seqs]
        released, self._new_seqs, self._released = self._released, [], []
        return StagePlan(
            micro_batch=micro_batch, kv_ops=self.kv.take_log(), seq_ids=[e.seq.seq_id for e in entries],
            starts=[e.start for e in entries], counts=[e.num_tokens for e in entries], num_decode=len(plan.decode),
            samples=[e.samples for e in entries], token_ids=token_ids, new_seqs=new_seqs, released=released,
            carried=carried,
        )

    def _complete(self, step: InFlight, sampled: SampledTokens) -> list[FinishedRequest]:
        finished = []
        for index, seq_id in enumerate(sampled.seq_ids):
            seq = self._sequences.get(seq_id)
            if seq is None:  # it finished at the step before, which this one ran ahead of: not an output
                continue
            position = len(seq.token_ids) - seq.pending_tokens  # its oldest placeholder
            seq.token_ids[position] = sampled.tokens[index]
            seq.pending_tokens -= 1
            if seq.params.logprobs:
                seq.output_logprobs.append(sampled.logprobs[index])
            if seq.params.top_logprobs:
                seq.output_top_logprobs.append(sampled.top_logprobs[index])
            ahead = seq.token_ids[position + 1:]  # the next step's placeholder, when running ahead
            del seq.token_ids[position + 1:]  # the stop checks see the tokens so far
            if not self._check_stop(seq):
                seq.token_ids += ahead
            else:
                seq.pending_tokens = 0  # (the token of the step ahead is dropped when it comes)
                self.scheduler.finish(seq)
                del self._sequences[seq_id]
                self._released.append(seq_id)
                finished.append(FinishedRequest(
                    seq.seq_id, seq.prompt_token_ids, seq.output_token_ids, seq.finish_reason,
                    seq.output_logprobs if seq.params.logprobs else None,
                    seq.output_top_logprobs if seq.params.top_logprobs else None, seq.stop_text_end, seq.num_preemptions,
                ))
        self.scheduler.step_done(step.micro_batch)
        return finished

    def _check_stop(self, seq: Sequence) -> bool:
        params = seq.params
        token = seq.token_ids[-1]
        if token in params.stop_token_ids or (token in self.eos_token_ids and not params.ignore_eos):
            seq.finish_reason = "stop"
        elif params.stop and self._stop_string_end(seq) is not None:
            seq.finish_reason = "stop"
        elif seq.num_output_tokens >= params.max_tokens or len(seq.token_ids) >= self.max_model_len:
            seq.finish_reason = "length"
        return seq.finish_reason is not None

    def _stop_string_end(self, seq: Sequence) -> int | None:
        """Character offset in the output text where the first stop string starts, if one has appeared."""
        if self.tokenizer is None:
            return None
        longest = max(len(stop.encode()) for stop in seq.params.stop)
        # A stop string that completes with the newest token lies within its last `longest` tokens
        # plus a few: byte-level tokens carry at least one byte, and a few spare tokens cover
        # special tokens that decode to nothing and a split character at the window's start.
        window_start = max(seq.num_prompt_tokens, len(seq.token_ids) - (longest + 4))
        tail = self.tokenizer.decode(seq.token_ids[window_start:], skip_special_tokens=True)
        if not any(stop in tail for stop in seq.params.stop):
            return None
        text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
        positions = [text.find(stop) for stop in seq.params.stop if stop in text]
        seq.stop_text_end = min(positions)
        return seq.stop_text_end
