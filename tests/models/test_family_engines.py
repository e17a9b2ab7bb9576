"""Mixture-of-experts and OPT families end to end: greedy ids equal transformers' generate with
one stage, with two pipeline stages (experts stay with the stage that owns their layer), and with
every request's KV offloaded between its steps; the stage split counts the experts' weights."""

import pytest
import torch
import transformers

from pipemax import LLM, SamplingParams
from pipemax.models import model_config_from_hf
from pipemax.parallel.partition import partition_layers
from tests.engine.test_engine import hf_greedy
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


def test_opt_with_its_gpt2_tokenizer_from_text_equals_transformers(tmp_path):
    """An OPT folder with OPT's kind of tokenizer (byte-level BPE, GPT2Tokenizer, </s> as BOS
    prepended): text prompts through LLM give transformers' greedy ids on the same encoding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>"]  # OPT's ids 0-3
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    text = ["the quick brown fox jumps over the lazy dog", "pipelines of stages move the cache to the host"] * 20
    bpe.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", add_bos_token=True)
    hf = save_tiny_model("opt", tmp_path, vocab_size=len(tokenizer))
    tokenizer.save_pretrained(tmp_path)
    prompts = ["the lazy fox", "move the cache to the host"]
    with LLM(model=str(tmp_path), chunk_tokens=8) as llm:
        outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
                               use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        ids = tokenizer(prompt)["input_ids"]
        assert ids[0] == tokenizer.convert_tokens_to_ids("</s>") == 2  # OPT's BOS, from its tokenizer
        assert output.prompt_token_ids == ids
        assert output.token_ids == hf_greedy(hf, ids, MAX_TOKENS)
