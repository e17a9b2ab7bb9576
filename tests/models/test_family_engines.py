"""Mixture-of-experts and OPT families end to end: greedy ids equal transformers' generate with
one stage, with two pipeline stages (experts stay with the stage that owns their layer), and with
every request's KV offloaded between its steps; the stage split counts the experts' weights."""

import pytest
import torch

from pipemax import LLM, SamplingParams
import transformers

from pipemax.models import model_config_from_hf
from pipemax.runtime.partition import partition_layers
from tests.runtime.test_engine import hf_greedy
from tests.tiny_models import COMMON, save_tiny_model

FAMILIES = ["mixtral", "qwen2-moe", "qwen3-moe", "opt", "opt-350m"]
PROMPT_LENGTHS = [5, 13, 9]
MAX_TOKENS = 8


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = save_tiny_model(request.param, folder)
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, hf.config.vocab_size, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]
    return folder, hf, prompts


def greedy_ids(folder, prompts, **options):
    with LLM(model=str(folder), chunk_tokens=8, **options) as llm:
        outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
                               use_tqdm=False)
        return [o.token_ids for o in outputs], llm.last_run_stats


@pytest.mark.parametrize("options", [
    dict(),
    dict(pipeline_parallel=2, pipeline_transport="inprocess"),
    dict(offload="force", micro_batches=2, kv_cache_gib=12 * 8 * 3 * 2 * 4 * 16 * 4 / 2**30, host_memory_gib=0.01),
], ids=["one-stage", "two-stages", "offload-forced"])
def test_greedy_equals_transformers(family_model, options):
    folder, hf, prompts = family_model
    ids, stats = greedy_ids(folder, prompts, **options)
    assert ids == [hf_greedy(hf, prompt, MAX_TOKENS) for prompt in prompts]
    if options.get("offload") == "force":
        assert stats["offload"]["host_resident_requests"] == len(prompts)


def test_the_stage_split_weighs_expert_layers_more():
    config = model_config_from_hf(transformers.Qwen2MoeConfig(
        **{**COMMON, "num_hidden_layers": 4}, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
        shared_expert_intermediate_size=80, mlp_only_layers=[0, 1]))
    assert config.moe_layers == (2, 3) and config.num_experts == 4
    assert config.layer_weight_elements(2) > config.layer_weight_elements(0)
    # Two dense layers weigh less than one expert layer: the split puts more layers before the experts.
    (first_start, first_end), _ = partition_layers(config, 2)
    assert first_end - first_start == 3
