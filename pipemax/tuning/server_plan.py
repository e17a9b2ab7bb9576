"""Choosing the engine's settings for a server, and predicting what they give.

Inputs are plain facts: each GPU's memory, PCIe and inter-GPU bandwidth, the host memory for KV,
and step costs per layer (measured by `pipemax autotune`, or a roofline from peak figures for a
server not at hand). Two models work together:

  - a closed-form steady state chooses the micro-batch count M, the batch size and the per-step
    limits. A decode step of b sequences of mean context c on a stage of k layers takes
    T = k (a b + beta b c + d) (+ the LM head on the last stage). A cycle of the pipeline (each
    micro-batch one step) lasts max(M T_slowest, the sum of the stages' T plus the activations'
    transfers); prefill tokens cost a per token on every stage. Where KV capacity binds, the
    micro-batches' KV fills each stage's pool of N chunks:
      - without offload, all of it stays on the GPU: M b c tokens fit N chunks;
      - with offload=auto, each stage's pool is an owned region of N - 2 S chunks and a staging
        ring of two slots of S (core/kv_manager.py): step n computes its host-resident sequences
        in slot n mod 2, prefetched while the step before it computes on that stage. So the
        micro-batches hold N - 2 S + M x staged chunks, where each step stages what PCIe brings
        back in one stage-step (and no more than S, nor than its share of the host pool, nor
        anything with M = P, where the first stage would wait for the whole prefetch). S is what
        the engine will make of the plan's settings (prefetch_budget.staging_slot_chunks, at most
        N / 4); the plan counts on a lower prefetch rate where the host pool could not hold what
        a larger ring would stage. Where the ring does not pay, pp_offload is planned without it.
    Throughput only grows with b (the fixed cost d is shared by more sequences), so more GPU
    memory, host memory or bandwidth never predicts less: the tests check it. Each layout has
    the per-step limits its own batch asks for: pp's depend on nothing offload does (host memory,
    PCIe), and pp_offload asks for a larger batch only with a ring the engine will size (S > 0);
    without one it is pp, limits and all.
  - the discrete-event simulator (simulator.py) replays the real scheduler on a workload with the
    chosen settings (plan_schedule), with each stage's staging ring and copy engines, for the
    figures `pipemax plan` prints: the whole run's, and the steady state's, while requests still
    wait to start. A ring it finds slower than pp (the closed form's steady state can be wrong
    for a workload not much larger than what the pipeline holds at once), or that keeps no
    request on the host, is dropped from the plan: offload=auto never loses to off, and a
    pp_offload that offloads nothing is pp.
Every KV byte (the pools, the ring, a prefetch, a write-back row, attention's read of the
context) is counted in the KV cache's storage (`kv_cache_dtype`, core/kv_dtype.py): fp8 holds
twice the tokens in the same memory, moves half the bytes over PCIe and reads half through
attention, plus its scales (a float32 per token, layer, K/V and KV head: 4 / head_dim more).
Weights and activations stay in the model's dtype.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch

from pipemax.core.kv_dtype import is_fp8, kv_chunk_bytes, kv_storage_name, kv_token_bytes
from pipemax.core.offload_schedule import ScheduleSettings, plan_schedule
from pipemax.core.prefetch_budget import staging_slot_chunks
from pipemax.models import ModelConfig
from pipemax.parallel.partition import PartitionError, layer_costs, partition_layers
from pipemax.worker.memory_budget import kv_budget_bytes

from .simulator import SimulatedServer, StageCosts, simulate

MAX_SEQS_PER_STEP = 1024  # largest batch a plan gives a micro-batch (CUDA graphs are captured up to it)
MIN_BATCHED_TOKENS = 2048  # the most prefill tokens a plan puts in one step (and the activations sized for it)
KERNEL_GAP_S = 2.5e-6  # between the ~9 kernels of a layer replayed from a CUDA graph (roofline costs)
STEP_OVERHEAD_S = 150e-6  # a step's host planning, sampling and the hand-over to the next stage (roofline)
OFFLOAD_MARGIN = 1.02  # offload must beat keeping the KV on the GPUs by 2% to be chosen (it costs host memory)
RING_ROUNDS = 4  # the staging ring's batch and step time feed each other: rounds to settle them


class PlanError(ValueError):
    """The model does not fit the server in this layout: the message says why in one line."""


@dataclass(frozen=True)
class ComputeCosts:
    """A stage's step time: its layers' costs, plus the LM head and sampling on the last stage."""
    layer: StageCosts  # one decoder layer
    head: StageCosts  # the last stage's final norm, LM head and sampling, and the step's fixed overhead

    def stage(self, layers: int, last: bool) -> StageCosts:
        head = self.head if last else StageCosts(0.0, 0.0, 0.0)
        return StageCosts(layers * self.layer.alpha + head.alpha, layers * self.layer.beta + head.beta,
                          layers * self.layer.delta + head.delta)

    def to_dict(self) -> dict:
        return {"layer": asdict(self.layer), "head": asdict(self.head)}

    @classmethod
    def from_dict(cls, record: dict) -> "ComputeCosts":
        return cls(StageCosts(**record["layer"]), StageCosts(**record["head"]))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def kv_storage(dtype: torch.dtype, kv_cache_dtype: str) -> str:
    """The KV pools' storage name (core/kv_dtype.py) for a model in dtype: "bfloat16", "fp8_e4m3", ..."""
    return kv_storage_name(kv_cache_dtype, dtype_name(dtype))


def stage_chunk_bytes(config: ModelConfig, ranges: list[tuple[int, int]], chunk_tokens: int,
                      storage: str) -> tuple[int, ...]:
    """One KV chunk of each stage's layers, in the pools' storage (fp8: its scales included)."""
    return tuple(kv_chunk_bytes(end - start, config.num_kv_heads, config.head_dim, chunk_tokens, storage)
                 for start, end in ranges)


def roofline_costs(config: ModelConfig, dtype: torch.dtype, hbm_bytes_per_s: float, flops_per_s: float,
                   kv_cache_dtype: str = "auto") -> ComputeCosts:
    """Step costs from peak figures: per token, the matmuls' FLOPs at flops_per_s; per context
    token, its K and V read at HBM bandwidth (in the KV cache's storage: fp8 reads half, plus its
    scales); per step, the weights read at HBM bandwidth and the kernels' gaps. The sum of
    the compute and memory times, not their maximum: a step near the ridge point gets neither for
    free. Weights and activations are in the model's dtype whatever the KV's."""
    element = torch.tensor([], dtype=dtype).element_size()
    context_token_bytes = kv_token_bytes(1, config.num_kv_heads, config.head_dim, kv_storage(dtype, kv_cache_dtype))
    layers, head = layer_costs(config)  # weight elements: a step reads them all (every expert, at scale)
    per_layer = sum(layers) / len(layers)  # (MoE models may mix dense and expert layers)
    # A token multiplies only by its own experts' weights.
    active = sum(config.layer_active_elements(layer) for layer in range(config.num_layers)) / config.num_layers
    layer = StageCosts(alpha=2 * active / flops_per_s, beta=context_token_bytes / hbm_bytes_per_s,
                       delta=per_layer * element / hbm_bytes_per_s + 9 * KERNEL_GAP_S)
    return ComputeCosts(layer, StageCosts(alpha=2 * head / flops_per_s, beta=0.0,
                                          delta=head * element / hbm_bytes_per_s + STEP_OVERHEAD_S))


@dataclass(frozen=True)
class ServerFacts:
    gpus: int
    gpu_memory_bytes: int  # what PipeMax may use on each GPU, weights included
    pcie_bytes_per_s: float  # host <-> GPU, one direction, each GPU: what a prefetch gets
    link_bytes_per_s: float  # GPU -> GPU, the activations between stages
    host_kv_bytes: int  # host memory for offloaded KV, the whole node
    costs: ComputeCosts
    chunk_tokens: int = 16
    gpu_name: str = "GPU"


@dataclass(frozen=True)
class Workload:
    requests: tuple[tuple[int, int], ...]  # (prompt tokens, output tokens) each

    @property
    def mean_input(self) -> float:
        return sum(p for p, _ in self.requests) / len(self.requests)

    @property
    def mean_output(self) -> float:
        return sum(o for _, o in self.requests) / len(self.requests)

    @property
    def running_context(self) -> float:
        """Mean KV length of a running sequence: each request's mean length (prompt + half its
        output) weighted by how long it runs (its output), since long requests stay longest."""
        return (sum(o * (p + o / 2) for p, o in self.requests) / sum(o for _, o in self.requests))


@dataclass
class Plan:
    layout: str  # pp_offload | pp | dp
    stages: int
    replicas: int
    stage_layers: tuple[int, ...]
    micro_batches: int
    offload: str
    chunk_tokens: int
    kv_cache_bytes: int  # each GPU's KV pool
    host_kv_bytes: int  # the node's host KV pool (offload)
    max_num_seqs: int
    max_num_batched_tokens: int
    prefetch_bytes_per_s: float  # what offload=auto's budget counts on (0 without offload)
    batch_per_micro_batch: float  # the steady state's sequences per step
    estimated_generated_tokens_per_s: float
    kv_storage: str  # the KV pools' dtype (core/kv_dtype.py): the model's ("bfloat16", ...) or "fp8_e4m3" / "fp8_e5m2"
    staging_chunks: int = 0  # S: one slot of each stage's staging ring, as the engine will size it
    staging_bytes: int = 0  # one slot on the stage with the largest chunks
    simulation: dict = field(default_factory=dict)  # filled by simulate_plan

    @property
    def kv_cache_dtype(self) -> str:
        """The engine's kv_cache_dtype that stores KV as this plan counts it (non-fp8 storage is the model's dtype)."""
        return self.kv_storage if is_fp8(self.kv_storage) else "auto"

    def engine_options(self) -> dict:
        """EngineConfig fields (the profile's `plan` section, each overridable by its flag). The
        engine sizes the staging ring itself, from prefetch_gbs and its step costs."""
        return {"pipeline_parallel": self.stages, "data_parallel": self.replicas,
                "kv_cache_dtype": self.kv_cache_dtype,
                "stage_layers": list(self.stage_layers) if self.stages > 1 else None,
                "micro_batches": self.micro_batches, "offload": self.offload, "chunk_tokens": self.chunk_tokens,
                "kv_cache_gib": round(self.kv_cache_bytes / 2**30, 3),
                "host_memory_gib": round(self.host_kv_bytes / 2**30, 3) if self.offload != "off" else None,
                "max_num_seqs": self.max_num_seqs, "max_num_batched_tokens": self.max_num_batched_tokens,
                "prefetch_gbs": round(self.prefetch_bytes_per_s / 1e9, 3) if self.offload != "off" else None}

    def describe(self, facts: ServerFacts) -> str:
        """The plan in plain words."""
        if self.stages > 1:
            counts = sorted(set(self.stage_layers))
            layers = (f"{self.stages} stages of {counts[0]} layers" if len(counts) == 1 else
                      f"{self.stages} stages of {'/'.join(map(str, self.stage_layers))} layers")
        else:
            layers = "1 stage (the whole model on each GPU)"
        words = [layers + (f", {self.replicas} replicas" if self.replicas > 1 else ""),
                 f"{self.micro_batches} micro-batch{'es' if self.micro_batches > 1 else ''} of up to "
                 f"{self.max_num_seqs:,} sequences",
                 f"{self.kv_cache_bytes / 2**30:.1f} GiB of {self.kv_storage} KV per GPU in {self.chunk_tokens}-token "
                 "chunks"]
        simulated = self.simulation
        if self.offload != "off":
            resident = simulated.get("host_resident_requests")
            words.append(f"offload {self.offload}: a staging ring of 2 x {self.staging_chunks:,} chunks "
                         f"({self.staging_bytes / 1e9:.2f} GB a slot), {self.host_kv_bytes / 2**30:.0f} GiB host pool"
                         + (f", up to {resident:,} requests host-resident" if resident is not None else ""))
            if "prefetch_gbs" in simulated:
                words.append(f"{simulated['prefetch_gbs']:.1f} GB/s of the {facts.pcie_bytes_per_s / 1e9:.3g} GB/s "
                             "PCIe budget used (host to GPU, each GPU)")
        elif self.layout == "pp_offload":
            ring = simulated.get("ring_generated_tokens_per_s")
            if simulated.get("ring_host_resident_requests") == 0:
                words.append("KV stays on the GPUs: a staging ring would keep no request on the host here")
            else:
                words.append("KV stays on the GPUs: a staging ring would not pay here"
                             + (f" (simulated {ring:,.0f} generated tokens/s)" if ring is not None else ""))
        else:
            words.append("KV stays on the GPUs")
        return ", ".join(words)


@dataclass(frozen=True)
class _Pipeline:
    """What the steady state knows of one replica of a layout on the server."""
    num_chunks: int  # N: each stage's GPU pool (one count for every stage, the tightest decides)
    chunk_tokens: int
    stage_chunk_bytes: tuple[int, ...]  # one chunk of each stage's layers
    host_chunks: int  # the host pool, in chunks of every stage's layers (their ids are shared)
    context: float  # mean KV length of a running sequence
    stage_costs: tuple[StageCosts, ...]
    max_model_len: int
    activation_bytes: int  # a token's hidden state, handed from stage to stage
    link_bytes_per_s: float
    workload: Workload

    @property
    def chunk_bytes(self) -> int:
        """One chunk on the stage with the most layers: what the prefetch budget counts in."""
        return max(self.stage_chunk_bytes)

    def batch(self, chunks: float, micro_batches: int) -> float:
        """Sequences per micro-batch when `chunks` of each stage's pool hold every micro-batch's KV
        (and the workload has that many requests)."""
        return min(float(MAX_SEQS_PER_STEP), len(self.workload.requests) / micro_batches,
                   chunks * self.chunk_tokens / (micro_batches * self.context))

    def slowest(self, batch: float) -> StageCosts:
        return max(self.stage_costs, key=lambda c: c.seconds(batch, batch * self.context))

    def decode_seconds(self, batch: float) -> float:
        """The slowest stage's decode step: what one step's prefetch hides behind."""
        return self.slowest(batch).seconds(batch, batch * self.context)

    def budget_rate(self, pcie_bytes_per_s: float, batch: float) -> float:
        """The copy rate offload=auto's budget may count on. The budget is the rate times the
        slowest stage's predicted step, but each stage hides its own chunks behind its own step,
        which on the other stages is shorter: count on what the tightest stage can hide."""
        steps = [costs.seconds(batch, batch * self.context) for costs in self.stage_costs]
        tightest = min(step / chunk for step, chunk in zip(steps, self.stage_chunk_bytes))
        return pcie_bytes_per_s * min(1.0, tightest * self.chunk_bytes / max(steps))

    def generated_per_s(self, micro_batches: int, batch: float) -> float:
        """Steady-state generated tokens/s of one replica: a cycle of the pipeline (each
        micro-batch one step) lasts max(M T_slowest, the sum of the stages' T plus the activations'
        transfers); prefill tokens cost alpha on every stage."""
        decode = [costs.seconds(batch, batch * self.context) for costs in self.stage_costs]
        stages = len(self.stage_costs)
        link = batch * self.activation_bytes / self.link_bytes_per_s if stages > 1 else 0.0
        cycle = max(micro_batches * max(decode), sum(decode) + link * (stages - 1))
        outputs, prompt = self.workload.mean_output, self.workload.mean_input
        # Prefill: the prompt's tokens on every stage, attention over half the prompt on average;
        # pipelined like the decodes when there are enough micro-batches.
        prefill = max(c.alpha * prompt + c.beta * prompt ** 2 / 2 for c in self.stage_costs)
        prefill *= max(1.0, stages / micro_batches)
        seconds_per_request = outputs * cycle / (micro_batches * batch) + prefill
        return outputs / seconds_per_request


@dataclass(frozen=True)
class _SteadyState:
    micro_batches: int
    batch: float  # sequences per micro-batch
    max_num_seqs: int  # the per-step limit this batch asks for
    generated_per_s: float  # one replica
    staging_chunks: int = 0  # S, as the engine sizes it with these settings
    prefetch_bytes_per_s: float = 0.0  # offload=auto's budget rate


def _seqs_limit(batch: float) -> int:
    return min(MAX_SEQS_PER_STEP, max(8, 8 * math.ceil(batch / 8)))


def _engine_step_seconds(pipe: _Pipeline, max_num_seqs: int) -> float:
    """The step the engine sizes its staging ring by (LLMEngine._step_budget_chunks): max_num_seqs
    sequences at a context of min(the pool, half the model's length each), as the cost model the
    plan seeds (the slowest stage's) predicts it."""
    context = min(pipe.num_chunks * pipe.chunk_tokens, max_num_seqs * pipe.max_model_len // 2)
    return pipe.slowest(max_num_seqs).seconds(max_num_seqs, context)


def _engine_staging_chunks(pipe: _Pipeline, micro_batches: int, max_num_seqs: int, bytes_per_s: float) -> int:
    """S as the engine will size it with these settings: what one step's prefetch brings back
    behind that step (staging_slot_chunks bounds it)."""
    budget = int(bytes_per_s * _engine_step_seconds(pipe, max_num_seqs) // pipe.chunk_bytes)
    # (prefix caching, on by default in the engine, changes only offload=force's ring)
    return staging_slot_chunks("auto", pipe.num_chunks, micro_batches, True, budget)


def _without_ring(pipe: _Pipeline, micro_batches: int) -> _SteadyState:
    batch = pipe.batch(pipe.num_chunks, micro_batches)
    return _SteadyState(micro_batches, batch, _seqs_limit(batch), pipe.generated_per_s(micro_batches, batch))


def _with_ring(pipe: _Pipeline, micro_batches: int, pcie_bytes_per_s: float) -> _SteadyState:
    """offload=auto's steady state: each stage's pool is an owned region of N - 2 S chunks and a
    staging ring of two slots of S; every step stages what its prefetch brings back while the
    step before it computes (one step: PCIe x its time), at most S and its share of the host pool.
    So the micro-batches together hold KV for N - 2 S + M x staged chunks per stage. The batch and
    the step's time feed each other (a longer step stages more): a few rounds settle them. Chunk
    counts are not rounded here (the engine's whole S is the plan's), so that the prediction
    moves smoothly with the bandwidth and memory."""
    host_share = pipe.host_chunks / micro_batches  # every micro-batch's host-resident KV is on the host at once
    # Step n is planned when step n - M comes back from the last stage; by then the first stage
    # has M - P steps left before n (none with M = P: it would wait for the whole prefetch).
    window = min(1, micro_batches - len(pipe.stage_costs))
    batch = pipe.batch(pipe.num_chunks, micro_batches)
    for _ in range(RING_ROUNDS + 1):
        max_seqs = _seqs_limit(batch)
        step = pipe.decode_seconds(batch)
        rate = pipe.budget_rate(pcie_bytes_per_s, batch)
        if host_share < pipe.num_chunks / 4:
            # A faster budget than the host pool can take would only grow the ring, whose slots
            # come out of the owned region: count on no more than fills the host pool.
            rate = min(rate, host_share * pipe.chunk_bytes / step)
        ring = min(pipe.num_chunks / 4, rate * _engine_step_seconds(pipe, max_seqs) / pipe.chunk_bytes)
        staged = min(ring, rate * step * window / pipe.chunk_bytes, host_share)
        batch = pipe.batch(pipe.num_chunks - 2 * ring + micro_batches * staged, micro_batches)
    batch = min(batch, float(max_seqs))  # (the last round sized the ring for max_seqs: the engine's limit)
    return _SteadyState(micro_batches, batch, max_seqs, pipe.generated_per_s(micro_batches, batch),
                        _engine_staging_chunks(pipe, micro_batches, max_seqs, rate), rate)


def choose_plan(facts: ServerFacts, config: ModelConfig, dtype: torch.dtype, workload: Workload,
                layout: str, kv_cache_dtype: str = "auto") -> Plan:
    """The best settings for a layout by the steady-state model: pp (a stage per GPU), pp_offload
    (the same, with offload=auto and the host pool), dp (the whole model on each GPU, a replica
    per GPU). Each gets the per-step limits (max_num_seqs, max_num_batched_tokens) its own batch
    asks for; pp_offload without a ring (none pays, or the engine would size none) is pp's plan.
    The KV pools (GPU and host), the staging ring and the prefetch budget count chunks in the KV
    cache's storage (kv_cache_dtype: "auto" is the model's dtype); the weights and activations
    are in dtype (facts.costs must come from the same KV storage). Raises PlanError when the
    model does not fit."""
    if layout not in ("pp", "pp_offload", "dp"):
        raise ValueError(f"unknown layout {layout!r}")
    stages, replicas = (1, facts.gpus) if layout == "dp" else (facts.gpus, 1)
    try:
        ranges = partition_layers(config, stages)
    except PartitionError as error:
        raise PlanError(f"{layout}: {error}") from None
    element = torch.tensor([], dtype=dtype).element_size()  # (the activations')
    storage = kv_storage(dtype, kv_cache_dtype)
    chunk_bytes = stage_chunk_bytes(config, ranges, facts.chunk_tokens, storage)
    budgets = [kv_budget_bytes(facts.gpu_memory_bytes, config, [r], dtype, MIN_BATCHED_TOKENS * 2,
                               MAX_SEQS_PER_STEP, True) for r in ranges]
    if min(budgets) <= 0:
        worst = budgets.index(min(budgets))
        weights = config.weight_bytes(dtype, *ranges[worst])
        raise PlanError(f"{layout}: {weights / 2**30:.1f} GiB of weights on a GPU of "
                        f"{facts.gpu_memory_bytes / 2**30:.1f} GiB leave no room for a KV cache")
    # One chunk count for every stage (the engine's rule): the tightest stage decides.
    chunks = min(budget // chunk for budget, chunk in zip(budgets, chunk_bytes))
    pipe = _Pipeline(chunks, facts.chunk_tokens, chunk_bytes, facts.host_kv_bytes // sum(chunk_bytes),
                     workload.running_context + facts.chunk_tokens / 2,  # (its last chunk is half full)
                     tuple(facts.costs.stage(end - start, index == stages - 1) for index, (start, end)
                           in enumerate(ranges)),
                     config.max_model_len, config.hidden_size * element, facts.link_bytes_per_s, workload)
    candidates = {"off": [], "auto": []}
    for micro_batches in range(stages, 2 * stages + 1):
        without = _without_ring(pipe, micro_batches)
        if without.batch < 1:
            continue
        candidates["off"].append(without)
        candidates["auto"].append(without)
        if layout != "dp" and micro_batches >= 3:
            candidates["auto"].append(_with_ring(pipe, micro_batches, facts.pcie_bytes_per_s))
    if not candidates["off"]:
        raise PlanError(f"{layout}: the KV pool holds {chunks * facts.chunk_tokens:,} tokens, less than one request "
                        f"of {pipe.context:.0f} tokens per micro-batch")
    # The largest rate (exact ties: the first, fewer micro-batches, no ring). No tolerance: "nearly
    # as fast, fewer micro-batches" would make the choice, and so the prediction, non-monotone.
    best = {mode: max(states, key=lambda s: s.generated_per_s) for mode, states in candidates.items()}
    chosen = best["auto"] if layout == "pp_offload" else best["off"]
    if not chosen.staging_chunks:
        # No ring pays, or the engine would size none with these settings (the steady state's
        # staged chunks would then be host-resident KV that nothing brings back): the batch is
        # what the GPU pool holds, as pp's.
        chosen = best["off"]
    offload = "auto" if chosen.staging_chunks else "off"
    return Plan(layout, stages, replicas, tuple(end - start for start, end in ranges), chosen.micro_batches, offload,
                facts.chunk_tokens, chunks * pipe.chunk_bytes, facts.host_kv_bytes if offload != "off" else 0,
                chosen.max_num_seqs, _batched_tokens(pipe, chosen), chosen.prefetch_bytes_per_s,
                chosen.batch, chosen.generated_per_s * replicas, storage, chosen.staging_chunks,
                chosen.staging_chunks * pipe.chunk_bytes)


def _batched_tokens(pipe: _Pipeline, state: _SteadyState) -> int:
    """max_num_batched_tokens: the decodes, and prefill tokens per step as many as the workload's
    prompts need to keep the batch full (its prompt tokens per output token, for each sequence),
    or as half a decode step's time computes if that is more. A step much longer than the others
    stalls every stage behind it (simulated, a 70B shape on 8 stages, 4,000 ShareGPT-like
    requests, 80 sequences a step: 128 tokens a step 2,012 tokens/s, 256 2,035, 384 1,762, 2,048
    about 1,100), and one too short starves prefill-heavy work (LongBench-like, 18 sequences a
    step: 128 tokens 225 tokens/s, 512 283)."""
    slowest = pipe.slowest(state.batch)
    demand = state.batch * pipe.workload.mean_input / pipe.workload.mean_output
    half_step = pipe.decode_seconds(state.batch) / slowest.alpha / 2 if slowest.alpha else MIN_BATCHED_TOKENS
    return 128 * math.ceil((state.max_num_seqs + min(max(demand, half_step), MIN_BATCHED_TOKENS)) / 128)


def simulate_plan(plan: Plan, facts: ServerFacts, config: ModelConfig, dtype: torch.dtype,
                  workload: Workload, without_ring: Plan | None = None) -> dict:
    """Replays the real scheduler with the plan's settings on the workload (one replica's share for
    dp) and times it on the server's model; the figures `pipemax plan` prints. A pp_offload plan
    whose staging ring the simulation finds slower than the same server without it (the pp plan,
    simulated here unless `without_ring` is given, simulated), or that keeps no request on the
    host, becomes that plan: offload=auto never loses to off, the closed form's steady state can
    be wrong for a workload not much larger than what the pipeline holds at once, and a ring that
    stages nothing differs from pp only by the micro-batch count and the GPU pool its slots take.
    Its ring's figures stay in the simulation's record."""
    simulation = _simulate(plan, facts, config, dtype, workload)
    if plan.layout == "pp_offload" and plan.offload != "off":
        try:
            if without_ring is None:
                without_ring = choose_plan(facts, config, dtype, workload, "pp", plan.kv_cache_dtype)
            if not without_ring.simulation:
                without_ring.simulation = _simulate(without_ring, facts, config, dtype, workload)
        except PlanError:  # (no pool without the ring holds the workload: the ring stays)
            without_ring = None
        if without_ring and (simulation["host_resident_requests"] == 0 or without_ring.simulation[
                "generated_tokens_per_s"] > simulation["generated_tokens_per_s"]):
            ring = {f"ring_{name}": simulation[name] for name in ("generated_tokens_per_s", "host_resident_requests")}
            for name in (f.name for f in fields(Plan) if f.name != "layout"):
                setattr(plan, name, getattr(without_ring, name))
            simulation = {**without_ring.simulation, **ring}
    plan.simulation = simulation
    return simulation


def _simulate(plan: Plan, facts: ServerFacts, config: ModelConfig, dtype: torch.dtype, workload: Workload) -> dict:
    element = torch.tensor([], dtype=dtype).element_size()  # (the activations')
    ranges = partition_layers(config, plan.stages, list(plan.stage_layers))
    chunk_bytes = stage_chunk_bytes(config, ranges, plan.chunk_tokens, plan.kv_storage)
    costs = [facts.costs.stage(end - start, index == plan.stages - 1) for index, (start, end) in enumerate(ranges)]
    # The cost model the engine's scheduler predicts with: the slowest stage's (as the plan sized S with).
    context = workload.running_context + plan.chunk_tokens / 2
    slowest = max(costs, key=lambda c: c.seconds(plan.max_num_seqs, plan.max_num_seqs * context))
    num_gpu_chunks = plan.kv_cache_bytes // max(chunk_bytes)
    num_host_chunks = plan.host_kv_bytes // sum(chunk_bytes) if plan.offload != "off" else 0
    requests = list(workload.requests[::plan.replicas])  # a replica's share (round-robin, as the job splits)
    settings = ScheduleSettings(num_gpu_chunks, num_host_chunks, plan.chunk_tokens, plan.max_num_seqs,
                                plan.max_num_batched_tokens, plan.micro_batches, plan.offload,
                                step_cost=(slowest.alpha, slowest.beta, slowest.delta),
                                bytes_per_second=plan.prefetch_bytes_per_s, chunk_bytes=max(chunk_bytes),
                                staging_chunks=plan.staging_chunks)
    # Rounds: about a step per output token of the largest batch, far fewer than this bound.
    bound = 10 * (sum(o for _, o in requests) + len(requests)) + 1000
    try:
        schedule = plan_schedule(requests, settings, max_rounds=bound)
    except RuntimeError as error:  # e.g. a request that no KV pool of this plan can hold
        raise PlanError(f"{plan.layout}: {error}") from None
    server = SimulatedServer(tuple(costs), facts.pcie_bytes_per_s, facts.link_bytes_per_s, chunk_bytes,
                             config.hidden_size * element)
    result = simulate(schedule, server, plan.chunk_tokens)
    total = sum(p + o for p, o in requests)
    return {
        "generated_tokens_per_s": result.generated_tokens_per_s * plan.replicas,
        "steady_generated_tokens_per_s": result.steady_generated_tokens_per_s * plan.replicas,
        "total_tokens_per_s": total / result.seconds * plan.replicas if result.seconds else 0.0,
        "stage_utilisation": result.stage_utilisation,
        "pcie_gbs": result.pcie_gbs,
        "prefetch_gbs": result.prefetch_gbs,
        "exposed_copy_fraction": result.exposed_copy_fraction,
        "host_resident_requests": schedule.host_resident_requests * plan.replicas,
        "preemptions": schedule.preemptions * plan.replicas,
        "steps": len(schedule.steps),
        "mean_sequences_per_step": sum(len(s.computes) for s in schedule.steps) / max(1, len(schedule.steps)),
        "seconds": result.seconds,
        "requests": len(requests) * plan.replicas,
    }


def best_layout(plans: dict[str, Plan]) -> str:
    """The simulated fastest layout; pp_offload only when it beats pp by OFFLOAD_MARGIN."""
    rate = {name: plan.simulation["generated_tokens_per_s"] for name, plan in plans.items()}
    best = max(rate, key=rate.get)
    if best == "pp_offload" and "pp" in rate and rate[best] < OFFLOAD_MARGIN * rate["pp"]:
        best = "pp"
    return best


def fit_to_model(workload: Workload, max_model_len: int) -> tuple[Workload, int, int]:
    """The requests the engine would run: a prompt of max_model_len tokens or more is refused
    (dropped here), an output that would pass max_model_len stops there (clipped). Returns the
    workload and how many were dropped and clipped."""
    kept, dropped, clipped = [], 0, 0
    for prompt, output in workload.requests:
        if prompt >= max_model_len:
            dropped += 1
            continue
        if prompt + output > max_model_len:
            clipped += 1
            output = max_model_len - prompt
        kept.append((prompt, output))
    return Workload(tuple(kept)), dropped, clipped
