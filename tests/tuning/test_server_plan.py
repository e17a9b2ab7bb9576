"""The planner: its choices are monotone (more GPU memory or bandwidth never predicts less), it
says plainly when a model does not fit, and its simulated figures come from the real scheduler."""

import dataclasses

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from pipemax.models import model_config_from_hf
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


def facts(memory_mib=2000, pcie=25e9, link=25e9, gpus=4, host_mib=4096):
    return ServerFacts(gpus, memory_mib * MiB, pcie, link, host_mib * MiB, COSTS, chunk_tokens=16)


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
@given(memory=st.integers(1200, 8000), more=st.integers(1, 4000), gpus=st.integers(1, 8),
       layout=st.sampled_from(["pp", "pp_offload", "dp"]))
def test_more_memory_never_predicts_less(memory, more, gpus, layout):
    try:
        small = choose_plan(facts(memory, gpus=gpus), CONFIG, DTYPE, WORKLOAD, layout)
    except PlanError:
        return  # does not fit with less memory: nothing to compare
    large = choose_plan(facts(memory + more, gpus=gpus), CONFIG, DTYPE, WORKLOAD, layout)
    assert large.estimated_generated_tokens_per_s >= small.estimated_generated_tokens_per_s
    assert large.kv_cache_bytes >= small.kv_cache_bytes
    assert large.batch_per_micro_batch * large.micro_batches >= small.batch_per_micro_batch * small.micro_batches


@settings(max_examples=examples(60), deadline=None)
@given(link=st.floats(1e8, 1e11), factor=st.floats(1.0, 100.0), pcie=st.floats(1e8, 1e11),
       gpus=st.integers(2, 8), memory=st.integers(1800, 8000))
def test_more_bandwidth_never_predicts_less(link, factor, pcie, gpus, memory):
    base = facts(memory, pcie=pcie, link=link, gpus=gpus)
    faster = dataclasses.replace(base, pcie_bytes_per_s=pcie * factor, link_bytes_per_s=link * factor)
    for layout in ("pp", "pp_offload"):
        slow, fast = (choose_plan(f, CONFIG, DTYPE, WORKLOAD, layout) for f in (base, faster))
        assert fast.estimated_generated_tokens_per_s >= slow.estimated_generated_tokens_per_s
        assert fast.max_num_seqs >= slow.max_num_seqs  # offload may admit more, never fewer


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
