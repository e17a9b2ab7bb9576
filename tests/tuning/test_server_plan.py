"""The planner: its choices are monotone (more GPU memory, host memory or bandwidth never predicts
less, in the closed form and in offload's simulated figures, each varied alone too), pp owes
nothing to host memory or PCIe, pp_offload holds no more KV than PCIe brings back and is pp where
it keeps nothing on the host, it says plainly when a model does not fit, and its simulated figures
come from the real scheduler. An fp8 KV cache is counted in fp8 chunks (scales included)
everywhere KV bytes appear: the pools, the ring, the copies and attention's read of the context."""

import dataclasses

import pytest
import torch
import transformers
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pipemax.core.kv_dtype import kv_chunk_bytes, kv_token_bytes
from pipemax.models import model_config_from_hf
from pipemax.parallel.partition import partition_layers
from pipemax.tuning.server_plan import (
    ComputeCosts,
    PlanError,
    ServerFacts,
    Workload,
    choose_plan,
    roofline_costs,
    simulate_plan,
)
from pipemax.tuning.simulator import StageCosts
from pipemax.tuning.workloads import synthetic_lengths
from tests.helpers import examples

# A small Llama shape: 8 layers, 1 GiB-scale weights would be too big for quick tests, so memory
# is sized in MiB here.
CONFIG = model_config_from_hf(transformers.LlamaConfig(
    hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
    vocab_size=1000, max_position_embeddings=4096))
DTYPE = torch.bfloat16
COSTS = roofline_costs(CONFIG, DTYPE, hbm_bytes_per_s=1e12, flops_per_s=1e14)
WORKLOAD = Workload(tuple(synthetic_lengths("sharegpt", 400, seed=1)))
MiB = 2**20


# Weights-bound steps (a millisecond a layer, as on a large model) and short decode-heavy requests
# that overflow a KV pool of a few MiB: there the staging ring pays, and a simulation of 48 of
# them takes well under a second.
WEIGHTS_BOUND = ComputeCosts(StageCosts(2e-6, 2e-9, 1e-3), StageCosts(0.0, 0.0, 1e-4))
# Attention-bound steps (a context token costs 100 times as much): the step the engine sizes its
# staging ring by (max_num_seqs at a full pool's context) is then much longer than a decode step.
ATTENTION_BOUND = ComputeCosts(StageCosts(2e-6, 2e-7, 1e-3), StageCosts(0.0, 0.0, 1e-4))
DECODE_HEAVY = Workload(tuple((max(1, p // 16), max(1, o // 16)) for p, o in synthetic_lengths("decode-heavy", 400)))
SHORT_DECODE_HEAVY = Workload(DECODE_HEAVY.requests[:48])
TIGHT_MEMORY = st.integers(1594, 1606)  # MiB: on 4 GPUs, KV pools of 200 to 1,700 chunks beside the rest


def facts(memory_mib=2000, pcie=25e9, link=25e9, gpus=4, host_mib=4096, costs=COSTS):
    return ServerFacts(gpus, memory_mib * MiB, pcie, link, host_mib * MiB, costs, chunk_tokens=16)


# (costs, workload, GPU memory MiB, PCIe B/s, host memory MiB): a roomy server and ShareGPT-like
# work, where KV rarely binds, or a tight one and decode-heavy work, where the staging ring mostly
# pays, and the host pool sometimes binds (weights- or attention-bound steps; PCIe from 1 MB/s, where
# a step brings back less than a chunk, to 10 GB/s, as many examples in each decade).
SERVERS = st.one_of(
    st.tuples(st.just(COSTS), st.just(WORKLOAD), st.integers(1200, 8000), st.floats(1e7, 1e11), st.integers(1, 8192)),
    st.tuples(st.sampled_from([WEIGHTS_BOUND, ATTENTION_BOUND]), st.just(DECODE_HEAVY), TIGHT_MEMORY,
              st.floats(6.0, 10.0).map(lambda exponent: 10**exponent), st.integers(1, 256)))


def test_roofline_costs_from_the_model_shape():
    layer, head = COSTS.layer, COSTS.head
    per_layer = 256 * (256 + 2 * 64) + 256 * 256 + 3 * 256 * 512 + 2 * 256  # q/k/v, o, gate/up/down, norms
    assert layer.alpha == pytest.approx(2 * per_layer / 1e14)
    assert layer.beta == pytest.approx(2 * 64 * 2 / 1e12)  # K and V of one token, bf16
    assert layer.delta > per_layer * 2 / 1e12  # the weights' read, plus the kernels' gaps
    stage = COSTS.stage(3, last=True)
    assert stage.alpha == pytest.approx(3 * layer.alpha + head.alpha)
    assert COSTS.stage(3, last=False).delta == pytest.approx(3 * layer.delta)
    assert ComputeCosts.from_dict(COSTS.to_dict()) == COSTS


@settings(max_examples=examples(60), deadline=None)
@given(server=SERVERS, more=st.integers(1, 100), gpus=st.integers(1, 8),
       layout=st.sampled_from(["pp", "pp_offload", "dp"]))
def test_more_memory_never_predicts_less(server, more, gpus, layout):
    costs, workload, memory, pcie, host = server
    try:
        small = choose_plan(facts(memory, pcie, gpus=gpus, host_mib=host, costs=costs), CONFIG, DTYPE, workload, layout)
    except PlanError:
        return  # does not fit with less memory: nothing to compare
    large = choose_plan(facts(memory + more, pcie, gpus=gpus, host_mib=host, costs=costs), CONFIG, DTYPE, workload,
                        layout)
    assert large.estimated_generated_tokens_per_s >= small.estimated_generated_tokens_per_s
    assert large.kv_cache_bytes >= small.kv_cache_bytes


@settings(max_examples=examples(60), deadline=None)
# The host pool binds (19 MiB: 608 chunks, 76 a micro-batch): a faster link would only grow the ring.
@example(server=(WEIGHTS_BOUND, DECODE_HEAVY, 1597, 3.58e8, 19), link=25e9, link_factor=1.0, pcie_factor=4.0, gpus=7,
         more_host=0)
@given(server=SERVERS, link=st.floats(1e8, 1e11), link_factor=st.floats(1.0, 100.0),
       pcie_factor=st.floats(1.0, 100.0), gpus=st.integers(2, 8), more_host=st.integers(0, 256))
def test_more_bandwidth_or_host_memory_never_predicts_less(server, link, link_factor, pcie_factor, gpus, more_host):
    costs, workload, memory, pcie, host = server
    base = facts(memory, pcie=pcie, link=link, gpus=gpus, host_mib=host, costs=costs)
    better = dataclasses.replace(base, pcie_bytes_per_s=pcie * pcie_factor, link_bytes_per_s=link * link_factor,
                                 host_kv_bytes=(host + more_host) * MiB)
    for layout in ("pp", "pp_offload"):
        try:
            slow = choose_plan(base, CONFIG, DTYPE, workload, layout)
        except PlanError:
            return
        fast = choose_plan(better, CONFIG, DTYPE, workload, layout)
        assert fast.estimated_generated_tokens_per_s >= slow.estimated_generated_tokens_per_s
        assert fast.max_num_seqs >= slow.max_num_seqs  # offload may admit more, never fewer


@settings(max_examples=examples(60), deadline=None)
# 3 MB/s: a step brings back less than a chunk, so the engine sizes no ring (S = 0), though the
# steady state's fraction of a chunk staged per step would grow the batch a little.
@example(server=(WEIGHTS_BOUND, DECODE_HEAVY, 1600, 3e6, 64), gpus=4, pcie_factor=1.0, more_host=0)
@given(server=SERVERS, gpus=st.integers(1, 8), pcie_factor=st.floats(1.0, 1000.0), more_host=st.integers(0, 4096))
def test_pp_owes_nothing_to_offload_and_pp_offload_without_a_ring_is_pp(server, gpus, pcie_factor, more_host):
    # pp's plan does not move with host memory or PCIe; pp_offload's batch (and its limits) pass
    # pp's only with a ring the engine will size, else pp_offload is pp's plan.
    costs, workload, memory, pcie, host = server
    base = facts(memory, pcie=pcie, gpus=gpus, host_mib=host, costs=costs)
    other = dataclasses.replace(base, pcie_bytes_per_s=pcie * pcie_factor, host_kv_bytes=(host + more_host) * MiB)
    try:
        plain = choose_plan(base, CONFIG, DTYPE, workload, "pp")
    except PlanError:
        return
    assert choose_plan(other, CONFIG, DTYPE, workload, "pp") == plain and plain.offload == "off"
    offload = choose_plan(base, CONFIG, DTYPE, workload, "pp_offload")
    assert offload.kv_cache_bytes == plain.kv_cache_bytes
    if offload.offload == "auto":  # the ring pays: offload's batch is the larger, and its limits follow it
        assert offload.staging_chunks > 0 and offload.host_kv_bytes == base.host_kv_bytes
        assert offload.batch_per_micro_batch * offload.micro_batches > plain.batch_per_micro_batch * plain.micro_batches
        assert offload.max_num_seqs >= offload.batch_per_micro_batch and offload.max_num_seqs >= plain.max_num_seqs
    else:
        assert offload.engine_options() == plain.engine_options()
        assert offload.batch_per_micro_batch == plain.batch_per_micro_batch


def test_a_ring_the_engine_would_not_size_is_no_ring(monkeypatch):
    # Where one step's prefetch brings back less than a chunk the engine sizes S = 0, yet the
    # steady state counts a fraction of a chunk staged per step: that batch would be KV left on
    # the host. (Not reached by the servers above, where a fraction of a chunk never pays for the
    # ring's two slots; the engine's S forced to 0 here.)
    import pipemax.tuning.server_plan as server_plan

    server = facts(1600, pcie=5e9, gpus=4, host_mib=64, costs=WEIGHTS_BOUND)
    plain = choose_plan(server, CONFIG, DTYPE, DECODE_HEAVY, "pp")
    assert choose_plan(server, CONFIG, DTYPE, DECODE_HEAVY, "pp_offload").offload == "auto"
    monkeypatch.setattr(server_plan, "_engine_staging_chunks", lambda *args: 0)
    offload = choose_plan(server, CONFIG, DTYPE, DECODE_HEAVY, "pp_offload")
    assert offload.offload == "off" and offload.engine_options() == plain.engine_options()
    assert offload.batch_per_micro_batch == plain.batch_per_micro_batch


def test_a_step_has_room_for_the_prompt_tokens_that_keep_its_batch_full():
    # LongBench-like work (27 prompt tokens per output token) on the 70B shape: 18 sequences a step
    # need ~480 prompt tokens a step; half a decode step's time would compute ~60.
    config = model_config_from_hf(transformers.LlamaConfig(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
        vocab_size=32000, max_position_embeddings=4096))
    server = ServerFacts(8, 32 * 2**30, 55e9, 55e9, 256 * 2**30, roofline_costs(config, DTYPE, 1.8e12, 2e14))
    longbench = Workload(tuple(synthetic_lengths("longbench", 1000)))
    for layout in ("pp", "pp_offload"):
        plan = choose_plan(server, config, DTYPE, longbench, layout)
        prompts_per_step = plan.batch_per_micro_batch * longbench.mean_input / longbench.mean_output
        assert plan.max_num_batched_tokens >= plan.batch_per_micro_batch + prompts_per_step > 400


def test_a_model_that_does_not_fit_is_refused_in_one_line():
    with pytest.raises(PlanError, match=r"^dp: .* GiB of weights on a GPU of 0.1 GiB leave no room for a KV cache$"):
        choose_plan(facts(100), CONFIG, DTYPE, WORKLOAD, "dp")
    with pytest.raises(PlanError, match="9 pipeline stages for a model of 8 layers"):
        choose_plan(facts(gpus=9), CONFIG, DTYPE, WORKLOAD, "pp")


def test_pipeline_splits_the_layers_and_plans_a_micro_batch_per_stage_at_least():
    plan = choose_plan(facts(gpus=4), CONFIG, DTYPE, WORKLOAD, "pp")
    assert plan.stages == 4 and plan.replicas == 1 and sum(plan.stage_layers) == 8
    assert 4 <= plan.micro_batches <= 8 and plan.offload == "off" and plan.host_kv_bytes == 0
    options = plan.engine_options()
    assert options["pipeline_parallel"] == 4 and options["stage_layers"] == list(plan.stage_layers)
    assert options["max_num_batched_tokens"] >= options["max_num_seqs"]
    dp = choose_plan(facts(gpus=4), CONFIG, DTYPE, WORKLOAD, "dp")
    assert (dp.stages, dp.replicas, dp.engine_options()["stage_layers"]) == (1, 4, None)


def test_the_simulation_runs_the_real_scheduler_with_the_plan():
    server = facts(gpus=2)
    plan = choose_plan(server, CONFIG, DTYPE, WORKLOAD, "pp")
    simulated = simulate_plan(plan, server, CONFIG, DTYPE, WORKLOAD)
    assert simulated["requests"] == 400 and simulated["generated_tokens_per_s"] > 0
    assert len(simulated["stage_utilisation"]) == 2 and all(0 < u <= 1 for u in simulated["stage_utilisation"])
    assert simulated["mean_sequences_per_step"] <= plan.max_num_seqs
    assert simulated["pcie_gbs"] == 0 and simulated["host_resident_requests"] == 0  # offload off
    offload = choose_plan(server, CONFIG, DTYPE, WORKLOAD, "pp_offload")
    simulate_plan(offload, server, CONFIG, DTYPE, WORKLOAD)
    assert offload.max_num_seqs >= plan.max_num_seqs
    # dp: one replica's share, scaled by the replicas
    dp = choose_plan(server, CONFIG, DTYPE, WORKLOAD, "dp")
    assert simulate_plan(dp, server, CONFIG, DTYPE, WORKLOAD)["requests"] == 400


def test_a_slower_gpu_predicts_less():
    slow = dataclasses.replace(facts(gpus=2), costs=ComputeCosts(
        StageCosts(COSTS.layer.alpha * 4, COSTS.layer.beta * 4, COSTS.layer.delta * 4), COSTS.head))
    fast = facts(gpus=2)
    rates = [simulate_plan(choose_plan(f, CONFIG, DTYPE, WORKLOAD, "pp"), f, CONFIG, DTYPE, WORKLOAD)
             ["generated_tokens_per_s"] for f in (slow, fast)]
    assert rates[1] > rates[0]


def test_a_request_no_pool_of_the_plan_holds_is_a_plan_error():
    server = facts(1600, gpus=1)  # a KV pool of 352 tokens
    workload = Workload(((100, 10),) * 20 + ((3000, 10),))
    plan = choose_plan(server, CONFIG, DTYPE, workload, "pp")  # the mean request fits...
    with pytest.raises(PlanError, match="^pp: "):  # ...the long one never does
        simulate_plan(plan, server, CONFIG, DTYPE, workload)


def test_the_activation_reserve_counts_expert_buffers():
    from pipemax.worker.memory_budget import activation_bytes

    mixtral = model_config_from_hf(transformers.MixtralConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=8,
        num_local_experts=8, num_experts_per_tok=2))
    dense = model_config_from_hf(transformers.LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=8))
    tokens = 8192
    extra = activation_bytes(mixtral, torch.bfloat16, tokens, 1, False) - activation_bytes(dense, torch.bfloat16,
                                                                                           tokens, 1, False)
    # Per token: k (3 I + H) + H + the router's float32 rows, against a dense MLP's 3 I.
    per_token = 2 * (3 * 14336 + 4096) + 4096 + 2 * 8 * 4 // 2 - 3 * 14336
    assert extra == tokens * per_token * 2 + 1 * (mixtral.vocab_size - dense.vocab_size) * 8



def simulated_offload(server, workload):
    """The pp_offload plan, simulated beside the pp plan it falls back to, and that pp plan."""
    plain = choose_plan(server, CONFIG, DTYPE, workload, "pp")
    offload = choose_plan(server, CONFIG, DTYPE, workload, "pp_offload")
    simulate_plan(offload, server, CONFIG, DTYPE, workload, plain)
    return offload, plain


@settings(max_examples=examples(15), deadline=None)
@given(memory=TIGHT_MEMORY, pcie=st.floats(7.0, 10.0).map(lambda exponent: 10**exponent),
       pcie_factor=st.floats(1.0, 30.0), host=st.integers(1, 32), more_host=st.integers(1, 32),
       vary=st.sampled_from(["pcie", "host", "both"]))
def test_the_simulated_offload_figures_never_drop_with_more_bandwidth_or_host_memory(memory, pcie, pcie_factor, host,
                                                                                     more_host, vary):
    # PCIe alone, host memory alone, or both. (pp's figure cannot move: its plan does not.)
    base = facts(memory, pcie=pcie, gpus=4, host_mib=host, costs=WEIGHTS_BOUND)
    better = dataclasses.replace(base, pcie_bytes_per_s=pcie * pcie_factor if vary != "host" else pcie,
                                 host_kv_bytes=(host + more_host) * MiB if vary != "pcie" else base.host_kv_bytes)
    (slow, slow_plain), (fast, fast_plain) = (simulated_offload(f, SHORT_DECODE_HEAVY) for f in (base, better))
    assert fast.simulation["generated_tokens_per_s"] >= slow.simulation["generated_tokens_per_s"]
    for offload, plain in ((slow, slow_plain), (fast, fast_plain)):
        # Either requests are host-resident, or pp_offload is pp: no larger batch on the same KV.
        if offload.simulation["host_resident_requests"] == 0:
            assert offload.engine_options() == plain.engine_options()
            assert offload.batch_per_micro_batch == plain.batch_per_micro_batch


def test_a_ring_that_keeps_no_request_on_the_host_is_dropped():
    # A ring planned for 400 decode-heavy requests, simulated on 16 that the GPU pool holds: no
    # request goes to the host and the two run alike; pp_offload is then pp, not a layout beside it.
    server = facts(1600, pcie=5e9, gpus=4, host_mib=64, costs=WEIGHTS_BOUND)
    plain = choose_plan(server, CONFIG, DTYPE, DECODE_HEAVY, "pp")
    offload = choose_plan(server, CONFIG, DTYPE, DECODE_HEAVY, "pp_offload")
    assert offload.offload == "auto" and offload.micro_batches > plain.micro_batches
    simulated = simulate_plan(offload, server, CONFIG, DTYPE, Workload(DECODE_HEAVY.requests[:16]), plain)
    assert simulated["ring_host_resident_requests"] == 0 and simulated["host_resident_requests"] == 0
    assert offload.offload == "off" and offload.engine_options() == plain.engine_options()
    assert "keep no request on the host" in offload.describe(server)


def test_a_ring_the_simulation_finds_slower_is_dropped():
    # 48 short requests over 200 chunks: the closed form's steady state sees a ring pay (one more
    # micro-batch, a bigger batch), the simulation of so small a job does not.
    server = facts(1594, pcie=8e7, gpus=4, host_mib=3, costs=WEIGHTS_BOUND)
    plan = choose_plan(server, CONFIG, DTYPE, SHORT_DECODE_HEAVY, "pp_offload")
    assert plan.offload == "auto" and plan.staging_chunks > 0
    simulated = simulate_plan(plan, server, CONFIG, DTYPE, SHORT_DECODE_HEAVY)
    plain = choose_plan(server, CONFIG, DTYPE, SHORT_DECODE_HEAVY, "pp")
    simulate_plan(plain, server, CONFIG, DTYPE, SHORT_DECODE_HEAVY)
    assert plan.layout == "pp_offload" and plan.offload == "off" and plan.staging_chunks == 0
    assert plan.engine_options() == plain.engine_options()
    assert simulated["generated_tokens_per_s"] == plain.simulation["generated_tokens_per_s"]
    assert simulated["ring_generated_tokens_per_s"] < simulated["generated_tokens_per_s"]
    assert "a staging ring would not pay here" in plan.describe(server)


def _kv_held_and_limits(plan, server, workload):
    """(chunks of each stage's pool the plan's micro-batches hold, its GPU pool N, what PCIe brings
    back to a stage in one decode step of the plan's batch, in chunks, the host pool in chunks)."""
    element = torch.tensor([], dtype=DTYPE).element_size()
    ranges = partition_layers(CONFIG, plan.stages, list(plan.stage_layers))
    token_bytes = [2 * CONFIG.kv_size * element * (end - start) for start, end in ranges]
    chunk_bytes = max(token_bytes) * server.chunk_tokens
    context = workload.running_context + server.chunk_tokens / 2
    batch = plan.batch_per_micro_batch
    step = max(server.costs.stage(end - start, index == plan.stages - 1).seconds(batch, batch * context)
               for index, (start, end) in enumerate(ranges))
    held = plan.micro_batches * batch * context / server.chunk_tokens
    return (held, plan.kv_cache_bytes // chunk_bytes, server.pcie_bytes_per_s * step / chunk_bytes,
            server.host_kv_bytes // (sum(token_bytes) * server.chunk_tokens))


@settings(max_examples=examples(60), deadline=None)
# 43 MB/s brings back 19 chunks in a decode step; the engine's ring, sized by a step at a full
# pool's context, is larger: a step stages no more than the former.
@example(server=(ATTENTION_BOUND, DECODE_HEAVY, 1603, 4.33e7, 19), gpus=6)
@given(server=SERVERS, gpus=st.integers(2, 8))
def test_offload_holds_no_more_kv_than_pcie_brings_back_and_the_host_pool_holds(server, gpus):
    # Each micro-batch's step can compute, beyond the GPU pool, only what one step's prefetch
    # brought back into its slot; and only what the host pool holds can be host-resident.
    costs, workload, memory, pcie, host = server
    server = facts(memory, pcie=pcie, gpus=gpus, host_mib=host, costs=costs)
    try:
        plan = choose_plan(server, CONFIG, DTYPE, workload, "pp_offload")
    except PlanError:
        return
    held, gpu_pool, per_step, host_pool = _kv_held_and_limits(plan, server, workload)
    assert held <= gpu_pool + plan.micro_batches * per_step + 1e-6
    assert held <= gpu_pool + host_pool + 1e-6


@settings(max_examples=examples(60), deadline=None)
@given(server=SERVERS, pcie_factor=st.floats(1.0, 1000.0), gpus=st.integers(2, 8))
def test_at_lower_pcie_alone_offload_plans_no_larger_batch(server, pcie_factor, gpus):
    # PCIe alone (the links and the host pool as they are): at the lower rate, pp_offload's batch
    # and its per-step limit are no larger, and its prediction no higher.
    costs, workload, memory, pcie, host = server
    low = facts(memory, pcie=pcie / pcie_factor, gpus=gpus, host_mib=host, costs=costs)
    high = dataclasses.replace(low, pcie_bytes_per_s=pcie)
    try:
        slow = choose_plan(low, CONFIG, DTYPE, workload, "pp_offload")
    except PlanError:
        return
    fast = choose_plan(high, CONFIG, DTYPE, workload, "pp_offload")
    assert slow.max_num_seqs <= fast.max_num_seqs
    assert slow.estimated_generated_tokens_per_s <= fast.estimated_generated_tokens_per_s
    assert slow.batch_per_micro_batch * slow.micro_batches <= fast.batch_per_micro_batch * fast.micro_batches + 1e-6


def test_the_roofline_reads_the_context_in_the_kv_caches_dtype():
    # fp8: a byte an element and a float32 scale per token, layer, K/V and KV head (2 KV heads of
    # 32: 2 x 64 + 2 x 2 x 4 = 144 bytes a token and layer, against bf16's 256). The weights and
    # the matmuls stay in the model's dtype.
    fp8 = roofline_costs(CONFIG, DTYPE, hbm_bytes_per_s=1e12, flops_per_s=1e14, kv_cache_dtype="fp8")
    assert fp8.layer.beta == pytest.approx(144 / 1e12) and COSTS.layer.beta == pytest.approx(256 / 1e12)
    assert fp8.layer.beta == pytest.approx(kv_token_bytes(1, 2, 32, "fp8_e4m3") / 1e12)
    assert (fp8.layer.alpha, fp8.layer.delta, fp8.head) == (COSTS.layer.alpha, COSTS.layer.delta, COSTS.head)
    assert roofline_costs(CONFIG, DTYPE, 1e12, 1e14, "fp8_e5m2") == fp8


def test_an_fp8_plan_holds_nearly_twice_the_tokens_in_the_same_memory():
    server = facts(gpus=4)
    plain = choose_plan(server, CONFIG, DTYPE, WORKLOAD, "pp")
    fp8 = choose_plan(server, CONFIG, DTYPE, WORKLOAD, "pp", kv_cache_dtype="fp8")
    assert (plain.kv_storage, fp8.kv_storage) == ("bfloat16", "fp8_e4m3")
    assert plain.engine_options()["kv_cache_dtype"] == "auto" and fp8.engine_options()["kv_cache_dtype"] == "fp8_e4m3"
    assert fp8.stage_layers == plain.stage_layers == (2, 2, 2, 2)
    # The same KV budget (weights and activations in bf16 either way), in chunks of 2 layers.
    # (this head_dim of 32 makes the scales 1/8 of the data: 4 / head_dim)
    fp8_chunk, bf16_chunk = kv_chunk_bytes(2, 2, 32, 16, "fp8_e4m3"), kv_chunk_bytes(2, 2, 32, 16, "bfloat16")
    assert fp8_chunk == 2 * 2 * 16 * 2 * 32 + 2 * 2 * 16 * 2 * 4 and bf16_chunk == 2 * 2 * 16 * 2 * 32 * 2
    assert plain.kv_cache_bytes % bf16_chunk == 0 and fp8.kv_cache_bytes % fp8_chunk == 0
    assert abs(fp8.kv_cache_bytes - plain.kv_cache_bytes) < bf16_chunk  # (each the budget's whole chunks)
    assert fp8.kv_cache_bytes // fp8_chunk >= 1.75 * (plain.kv_cache_bytes // bf16_chunk)  # 256 / 144 bytes a token
    # "fp8" is e4m3; e5m2 has the same bytes; "auto" is the model's dtype.
    assert choose_plan(server, CONFIG, DTYPE, WORKLOAD, "pp", "fp8_e4m3") == fp8
    e5m2 = choose_plan(server, CONFIG, DTYPE, WORKLOAD, "pp", "fp8_e5m2")
    assert dataclasses.replace(e5m2, kv_storage="fp8_e4m3") == fp8
    assert choose_plan(server, CONFIG, torch.float16, WORKLOAD, "pp").kv_storage == "float16"
    assert "GiB of fp8_e4m3 KV per GPU" in fp8.describe(server) and "GiB of bfloat16 KV" in plain.describe(server)


def test_the_simulation_counts_pools_copies_and_the_ring_in_fp8_chunks(monkeypatch):
    # Every KV byte the simulated server moves, and every pool the real scheduler fills, is in
    # fp8 chunks (scales included); the activations between stages stay bf16.
    import pipemax.tuning.server_plan as server_plan

    seen = {}
    real_schedule, real_simulate = server_plan.plan_schedule, server_plan.simulate

    def schedule(requests, settings, **options):
        seen["settings"] = settings
        return real_schedule(requests, settings, **options)

    def simulate(schedule, server, chunk_tokens):
        seen["server"] = server
        return real_simulate(schedule, server, chunk_tokens)

    monkeypatch.setattr(server_plan, "plan_schedule", schedule)
    monkeypatch.setattr(server_plan, "simulate", simulate)
    server = facts(1596, pcie=5e9, gpus=4, host_mib=64, costs=WEIGHTS_BOUND)
    plan = choose_plan(server, CONFIG, DTYPE, DECODE_HEAVY, "pp_offload", "fp8")
    assert plan.offload == "auto" and plan.staging_chunks > 0
    server_plan._simulate(plan, server, CONFIG, DTYPE, SHORT_DECODE_HEAVY)  # (its schedule's settings are the plan's)
    chunks = tuple(kv_chunk_bytes(layers, 2, 32, 16, "fp8_e4m3") for layers in plan.stage_layers)
    settings, simulated = seen["settings"], seen["server"]
    assert simulated.chunk_bytes == chunks and simulated.activation_bytes_per_token == 256 * 2
    assert settings.chunk_bytes == max(chunks) and plan.staging_bytes == plan.staging_chunks * max(chunks)
    assert settings.num_gpu_chunks == plan.kv_cache_bytes // max(chunks)
    assert settings.num_host_chunks == 64 * MiB // sum(chunks)
    # The ring holds what a step's prefetch brings back: about as many bytes as bf16's, twice the chunks.
    bf16 = choose_plan(server, CONFIG, DTYPE, DECODE_HEAVY, "pp_offload")
    assert plan.staging_chunks > 1.5 * bf16.staging_chunks and plan.batch_per_micro_batch > bf16.batch_per_micro_batch
