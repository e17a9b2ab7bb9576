"""Choosing the engine's settings for a server, and predicting what they give.

Inputs are plain facts: each GPU's memory, PCIe and inter-GPU bandwidth, the host memory for KV,
and step costs per layer (measured by `pipemax autotune`, or a roofline from peak figures for a
server not at hand). Two models work together:

  - a closed-form steady state chooses the micro-batch count M and the batch size. A decode step
    of b sequences of mean context c on a stage of k layers takes T = k (a b + beta b c + d) (+ the
    LM head on the last stage). Every micro-batch's KV must be on the GPU while its step is in
    flight, and the engine keeps every micro-batch in flight, so M b c tokens fit the stage's KV
    pool. A cycle of the pipeline (each micro-batch one step) lasts max(M T_slowest, the sum of
    the stages' T plus the activations' transfers); prefill tokens cost a per token on every
    stage. Throughput only grows with b (the fixed cost d is shared by more sequences), so more
    memory or bandwidth never predicts less: the tests check it.
  - the discrete-event simulator (simulator.py) replays the real scheduler on a workload with the
    chosen settings, offload on and off (plan_schedule), for the figures `pipemax plan` prints.

Offload gives the engine no extra batch in this model: a host-resident sequence is prefetched
into staging chunks when its micro-batch's step is launched and keeps them until the step comes
back, and every micro-batch is in flight in the steady state. The simulator, running the real
scheduler, shows what offload=auto does with a workload.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from pipemax.core.offload_schedule import ScheduleSettings, plan_schedule
from pipemax.models import ModelConfig
from pipemax.parallel.partition import PartitionError, layer_costs, partition_layers
from pipemax.worker.memory_budget import kv_budget_bytes

from .simulator import SimulatedServer, StageCosts, simulate

MAX_SEQS_PER_STEP = 1024  # largest batch a plan gives a micro-batch (CUDA graphs are captured up to it)
MIN_BATCHED_TOKENS = 2048  # the most prefill tokens a plan puts in one step (and the activations sized for it)
KERNEL_GAP_S = 2.5e-6  # between the ~9 kernels of a layer replayed from a CUDA graph (roofline costs)
STEP_OVERHEAD_S = 150e-6  # a step's host planning, sampling and the hand-over to the next stage (roofline)
OFFLOAD_MARGIN = 1.02  # offload must beat keeping the KV on the GPUs by 2% to be chosen (it costs host memory)


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


def roofline_costs(config: ModelConfig, dtype: torch.dtype, hbm_bytes_per_s: float, flops_per_s: float) -> ComputeCosts:
    """Step costs from peak figures: per token, the matmuls' FLOPs at flops_per_s; per context
    token, its K and V read at HBM bandwidth; per step, the weights read at HBM bandwidth and the
    kernels' gaps. The sum of the compute and memory times, not their maximum: a step near the
    ridge point gets neither for free."""
    element = torch.tensor([], dtype=dtype).element_size()
    layers, head = layer_costs(config)  # weight elements: a step reads them all (every expert, at scale)
    per_layer = sum(layers) / len(layers)  # (MoE models may mix dense and expert layers)
    # A token multiplies only by its own experts' weights.
    active = sum(config.layer_active_elements(layer) for layer in range(config.num_layers)) / config.num_layers
    layer = StageCosts(alpha=2 * active / flops_per_s, beta=2 * config.kv_size * element / hbm_bytes_per_s,
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
    simulation: dict = field(default_factory=dict)  # filled by simulate_plan

    def engine_options(self) -> dict:
        """EngineConfig fields (the profile's `plan` section, each overridable by its flag)."""
        return {"pipeline_parallel": self.stages, "data_parallel": self.replicas,
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
                 f"{self.max_num_seqs:,} sequences", f"{self.kv_cache_bytes / 2**30:.1f} GiB of KV per GPU in "
                 f"{self.chunk_tokens}-token chunks"]
        simulated = self.simulation
        if self.offload != "off":
            resident = simulated.get("host_resident_requests")
            words.append(f"offload {self.offload}: {self.host_kv_bytes / 2**30:.0f} GiB host pool"
                         + (f", up to {resident:,} requests host-resident" if resident is not None else ""))
            if "prefetch_gbs" in simulated:
                words.append(f"{simulated['prefetch_gbs']:.0f} GB/s of the {facts.pcie_bytes_per_s / 1e9:.0f} GB/s "
                             "PCIe budget used (host to GPU, each GPU)")
        else:
            words.append("KV stays on the GPUs")
        return ", ".join(words)


def choose_plan(facts: ServerFacts, config: ModelConfig, dtype: torch.dtype, workload: Workload,
                layout: str) -> Plan:
    """The best settings for a layout by the steady-state model: pp (a stage per GPU), pp_offload
    (the same, with offload=auto and the host pool), dp (the whole model on each GPU, a replica
    per GPU). Raises PlanError when the model does not fit."""
    if layout not in ("pp", "pp_offload", "dp"):
        raise ValueError(f"unknown layout {layout!r}")
    stages, replicas = (1, facts.gpus) if layout == "dp" else (facts.gpus, 1)
    try:
        ranges = partition_layers(config, stages)
    except PartitionError as error:
        raise PlanError(f"{layout}: {error}") from None
    element = torch.tensor([], dtype=dtype).element_size()
    kv_token_bytes = [2 * config.kv_size * element * (end - start) for start, end in ranges]
    budgets = [kv_budget_bytes(facts.gpu_memory_bytes, config, [r], dtype, MIN_BATCHED_TOKENS * 2,
                               MAX_SEQS_PER_STEP, True) for r in ranges]
    if min(budgets) <= 0:
        worst = budgets.index(min(budgets))
        weights = config.weight_bytes(dtype, *ranges[worst])
        raise PlanError(f"{layout}: {weights / 2**30:.1f} GiB of weights on a GPU of "
                        f"{facts.gpu_memory_bytes / 2**30:.1f} GiB leave no room for a KV cache")
    # One chunk count for every stage (the engine's rule): the tightest stage decides.
    chunks = min(budget // (tokens * facts.chunk_tokens) for budget, tokens in zip(budgets, kv_token_bytes))
    gpu_tokens = chunks * facts.chunk_tokens
    context = workload.running_context + facts.chunk_tokens / 2  # (its last chunk is half full)
    stage_costs = [facts.costs.stage(end - start, index == stages - 1) for index, (start, end) in enumerate(ranges)]
    activation_bytes = config.hidden_size * element
    best = None
    for micro_batches in range(stages, 2 * stages + 1):
        batch = min(float(MAX_SEQS_PER_STEP), gpu_tokens / (micro_batches * context))
        if batch < 1:
            continue
        rate = _generated_per_s(stage_costs, micro_batches, batch, context, workload, activation_bytes,
                                facts.link_bytes_per_s) * replicas
        # The largest rate (exact ties: fewer micro-batches). No tolerance: "nearly as fast, fewer
        # micro-batches" would make the choice, and so the prediction, non-monotone.
        if best is None or rate > best[0]:
            best = (rate, micro_batches, batch)
    if best is None:
        raise PlanError(f"{layout}: the KV pool holds {gpu_tokens:,} tokens, less than one request of "
                        f"{context:.0f} tokens per micro-batch")
    rate, micro_batches, batch = best
    offload = layout == "pp_offload"
    # Offload may admit more sequences than the GPU pool holds: as many as the host pool holds
    # and each step's prefetch can bring back behind the other micro-batches' steps. (Their
    # staging chunks are held while their step is in flight, so the estimate above counts no
    # gain; the simulator, running the real scheduler, shows what they bring.)
    host_batch = 0.0
    if offload and micro_batches > 1:
        host_tokens = facts.host_kv_bytes / sum(kv_token_bytes)
        decode_time = min(c.seconds(batch, batch * context) for c in stage_costs)
        prefetch_tokens = facts.pcie_bytes_per_s * (micro_batches - 1) * decode_time / max(kv_token_bytes)
        host_batch = min(host_tokens / micro_batches, prefetch_tokens) / context
    max_seqs = min(MAX_SEQS_PER_STEP, max(8, 8 * math.ceil((batch + host_batch) / 8)))
    # Prefill tokens per step: as many as half a decode step's time computes. A step much longer
    # than the others stalls every stage behind it (simulated, a 70B shape on 8 stages, 4,000
    # ShareGPT-like requests, 80 sequences a step: 128 tokens a step 2,012 tokens/s, 256 2,035,
    # 384 1,762, 2,048 about 1,100).
    slowest = max(stage_costs, key=lambda c: c.seconds(batch, batch * context))
    prefill_tokens = (slowest.seconds(batch, batch * context) / slowest.alpha / 2 if slowest.alpha
                      else MIN_BATCHED_TOKENS)
    batched_tokens = 128 * math.ceil((max_seqs + min(prefill_tokens, MIN_BATCHED_TOKENS)) / 128)
    offload = layout == "pp_offload"
    return Plan(layout, stages, replicas, tuple(end - start for start, end in ranges), micro_batches,
                "auto" if offload else "off", facts.chunk_tokens, chunks * facts.chunk_tokens * max(kv_token_bytes),
                facts.host_kv_bytes if offload else 0, max_seqs, batched_tokens,
                facts.pcie_bytes_per_s if offload else 0.0, batch, rate)


def _generated_per_s(stage_costs: list[StageCosts], micro_batches: int, batch: float, context: float,
                     workload: Workload, activation_bytes: int, link_bytes_per_s: float) -> float:
    """Steady-state generated tokens/s of one replica (see the module's docstring)."""
    decode = [costs.seconds(batch, batch * context) for costs in stage_costs]
    link = batch * activation_bytes / link_bytes_per_s if len(stage_costs) > 1 else 0.0
    cycle = max(micro_batches * max(decode), sum(decode) + link * (len(stage_costs) - 1))
    outputs = workload.mean_output
    # Prefill: the prompt's tokens on every stage, attention over half the prompt on average;
    # pipelined like the decodes when there are enough micro-batches.
    prefill = max(c.alpha * workload.mean_input + c.beta * workload.mean_input ** 2 / 2 for c in stage_costs)
    prefill *= max(1.0, len(stage_costs) / micro_batches)
    seconds_per_request = outputs * cycle / (micro_batches * batch) + prefill
    return outputs / seconds_per_request


def simulate_plan(plan: Plan, facts: ServerFacts, config: ModelConfig, dtype: torch.dtype,
                  workload: Workload) -> dict:
    """Replays the real scheduler with the plan's settings on the workload (one replica's share for
    dp) and times it on the server's model; the figures `pipemax plan` prints."""
    element = torch.tensor([], dtype=dtype).element_size()
    ranges = partition_layers(config, plan.stages, list(plan.stage_layers))
    chunk_bytes = tuple(2 * config.kv_size * element * (end - start) * plan.chunk_tokens for start, end in ranges)
    costs = [facts.costs.stage(end - start, index == plan.stages - 1) for index, (start, end) in enumerate(ranges)]
    slowest = max(costs, key=lambda c: c.seconds(plan.max_num_seqs, plan.max_num_seqs * 512))
    num_gpu_chunks = plan.kv_cache_bytes // max(chunk_bytes)
    num_host_chunks = plan.host_kv_bytes // sum(chunk_bytes) if plan.offload != "off" else 0
    requests = list(workload.requests[::plan.replicas])  # a replica's share (round-robin, as the job splits)
    settings = ScheduleSettings(num_gpu_chunks, num_host_chunks, plan.chunk_tokens, plan.max_num_seqs,
                                plan.max_num_batched_tokens, plan.micro_batches, plan.offload,
                                step_cost=(slowest.alpha, slowest.beta, slowest.delta),
                                bytes_per_second=plan.prefetch_bytes_per_s, chunk_bytes=max(chunk_bytes))
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
    plan.simulation = {
        "generated_tokens_per_s": result.generated_tokens_per_s * plan.replicas,
        "total_tokens_per_s": total / result.seconds * plan.replicas if result.seconds else 0.0,
        "stage_utilisation": result.stage_utilisation,
        "pcie_gbs": result.pcie_gbs,
        "prefetch_gbs": result.prefetch_gbs,
        "host_resident_requests": schedule.host_resident_requests * plan.replicas,
        "preemptions": schedule.preemptions * plan.replicas,
        "steps": len(schedule.steps),
        "mean_sequences_per_step": sum(len(s.computes) for s in schedule.steps) / max(1, len(schedule.steps)),
        "seconds": result.seconds,
        "requests": len(requests) * plan.replicas,
    }
    return plan.simulation


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
