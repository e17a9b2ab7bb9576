"""Every family's logits match transformers on tiny random float32 configs, in prefill and decode,
with the torch reference kernels and the Triton kernels."""

import pytest
import torch

from pipemax.core.kv_manager import KVManager
from pipemax.core.sampling_params import SamplingParams
from pipemax.core.scheduler import ScheduledSequence, StepPlan
from pipemax.core.sequence import Sequence
from pipemax.core.step_plan import StagePlan
from pipemax.models import (
    LlamaFamilyModel,
    UnsupportedModelError,
    WeightLoadError,
    build_model,
    load_model,
    load_weights,
    model_config_from_hf,
)
from pipemax.worker.kv_pool import KVPool, KVPoolSpec
from pipemax.worker.model_runner import ModelRunner
from tests.helpers import assert_close
from tests.tiny_models import FAMILIES, save_tiny_model, tiny_hf_model


def build(hf_model, backend, chunk_tokens=8, layer_range=(0, None)):
    config = model_config_from_hf(hf_model.config)
    model = build_model(config, *layer_range)
    with torch.no_grad():
        load_weights(model, hf_model.state_dict().items())
    spec = KVPoolSpec(model.num_stage_layers, config.num_kv_heads, config.head_dim, chunk_tokens, torch.float32)
    pool = KVPool(spec, 64, 0, "cpu", backend)
    kv = KVManager(64, 0, chunk_tokens)
    return model, ModelRunner(model, pool, kv, backend), kv


def run_all_logits(runner, kv, entries):
    """Logits at every scheduled position (not only the sampled ones)."""
    plan = StepPlan([e for e in entries if e.num_tokens == 1 and e.start > 0], [e for e in entries if not (e.num_tokens == 1 and e.start > 0)])
    for entry in plan.scheduled:
        if entry.seq.seq_id not in kv.sequences:
            kv.allocate(entry.seq.seq_id, entry.num_tokens)
        else:
            kv.append(entry.seq.seq_id, entry.num_tokens)
    entries = plan.scheduled
    stage_plan = StagePlan(0, [], [e.seq.seq_id for e in entries], [e.start for e in entries],
                           [e.num_tokens for e in entries], len(plan.decode), [False] * len(entries),
                           [t for e in entries for t in e.seq.token_ids[e.start:e.end]])
    input_ids, positions, meta, _ = runner.build_batch(stage_plan)
    with torch.inference_mode():
        hidden = runner.model(input_ids, positions, runner.attention, meta)
        return plan, runner.model.compute_logits(hidden)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers_prefill_then_decode(family, backend):
    hf = tiny_hf_model(family)
    model, runner, kv = build(hf, backend)
    generator = torch.Generator().manual_seed(1)
    lengths = [5, 19, 12]  # crossing 8-token chunks, ending mid-chunk
    prompts = [torch.randint(0, hf.config.vocab_size, (n,), generator=generator).tolist() for n in lengths]
    seqs = [Sequence(i, p, SamplingParams()) for i, p in enumerate(prompts)]
    # Prefill all but the last 2 tokens (sequence 1 in two pieces: a chunked prefill), then decode 2.
    first = [ScheduledSequence(seqs[0], 0, 3), ScheduledSequence(seqs[1], 0, 9), ScheduledSequence(seqs[2], 0, 10)]
    second = [ScheduledSequence(seqs[1], 9, 8)]
    third = [ScheduledSequence(seqs[0], 3, 1), ScheduledSequence(seqs[1], 17, 1), ScheduledSequence(seqs[2], 10, 1)]
    fourth = [ScheduledSequence(seqs[0], 4, 1), ScheduledSequence(seqs[1], 18, 1), ScheduledSequence(seqs[2], 11, 1)]
    ours = {i: {} for i in range(3)}
    for step in (first, second, third, fourth):
        plan, logits = run_all_logits(runner, kv, step)
        row = 0
        for entry in plan.scheduled:
            for position in range(entry.start, entry.end):
                ours[entry.seq.seq_id][position] = logits[row]
                row += 1
    with torch.no_grad():
        for seq_id, prompt in enumerate(prompts):
            expected = hf(torch.tensor([prompt])).logits[0]
            actual = torch.stack([ours[seq_id][p] for p in range(len(prompt))])
            assert_close(actual, expected, torch.float16)  # float32 compute; tolerance of the summed logits


def test_stage_layer_range_chains_to_the_full_model():
    hf = tiny_hf_model("qwen2")
    config = model_config_from_hf(hf.config)
    full = LlamaFamilyModel(config)
    first, second = LlamaFamilyModel(config, 0, 2), LlamaFamilyModel(config, 2, 3)
    for model in (full, first, second):
        with torch.no_grad():
            load_weights(model, hf.state_dict().items())
    assert not hasattr(second, "embed_tokens") and not hasattr(first, "lm_head")
    assert sum(p.numel() for p in first.parameters()) + sum(p.numel() for p in second.parameters()) == \
        sum(p.numel() for p in full.parameters())


def test_loads_sharded_safetensors_and_tied_embeddings(tmp_path):
    hf = save_tiny_model("qwen3", tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model = load_model(tmp_path)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert torch.equal(model.embed_tokens.weight, hf.model.embed_tokens.weight)
    q, k, v = (hf.model.layers[1].self_attn.q_proj.weight, hf.model.layers[1].self_attn.k_proj.weight,
               hf.model.layers[1].self_attn.v_proj.weight)
    assert torch.equal(model.layers[1].qkv_proj.weight, torch.cat([q, k, v]))


def test_last_stage_of_tied_model_gets_its_own_head(tmp_path):
    hf = save_tiny_model("llama-bias", tmp_path)
    stage = load_model(tmp_path, layer_start=2)
    assert torch.equal(stage.lm_head.weight, hf.model.embed_tokens.weight)


def test_unsupported_architecture_names_the_supported_ones():
    import transformers

    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2)
    config.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        model_config_from_hf(config)


def test_missing_weight_is_reported(tmp_path):
    hf = tiny_hf_model("llama3")
    config = model_config_from_hf(hf.config)
    model = LlamaFamilyModel(config)
    partial = [(n, t) for n, t in hf.state_dict().items() if "layers.1.mlp.up_proj" not in n]
    with pytest.raises(WeightLoadError, match="not found in the checkpoint"):
        with torch.no_grad():
            load_weights(model, partial)


def test_opt_checkpoints_named_as_on_the_hub_load():
    """facebook/opt-* checkpoints name their tensors decoder.* (no model. prefix)."""
    hf = tiny_hf_model("opt")
    hub_names = [(name.removeprefix("model."), tensor) for name, tensor in hf.state_dict().items()]
    assert any(name.startswith("decoder.layers.") for name, _ in hub_names)
    config = model_config_from_hf(hf.config)
    model, reference = build_model(config), build_model(config)
    with torch.no_grad():
        load_weights(model, hub_names)
        load_weights(reference, hf.state_dict().items())
    expected = dict(reference.named_parameters())
    assert all(torch.equal(param, expected[name]) for name, param in model.named_parameters())


@pytest.mark.parametrize("family, change, words", [
    ("mixtral", dict(hidden_act="gelu"), "activation 'gelu'"),
    ("opt", dict(_remove_final_layer_norm=True), "_remove_final_layer_norm"),
])
def test_settings_pipemax_does_not_run_are_refused(family, change, words):
    hf = tiny_hf_model(family)
    for name, value in change.items():
        setattr(hf.config, name, value)
    with pytest.raises(UnsupportedModelError, match=words):
        model_config_from_hf(hf.config)


def test_bias_flags_follow_the_config():
    hf = tiny_hf_model("qwen2-moe", qkv_bias=False)
    assert not model_config_from_hf(hf.config).qkv_bias
    model = build_model(model_config_from_hf(hf.config))
    with torch.no_grad():
        load_weights(model, hf.state_dict().items())  # no q/k/v biases in the checkpoint, none expected
    biased = tiny_hf_model("qwen3-moe", attention_bias=True)
    config = model_config_from_hf(biased.config)
    assert config.qkv_bias and config.o_bias
