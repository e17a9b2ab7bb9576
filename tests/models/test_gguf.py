"""Weights from a GGUF file (through transformers' GGUF support): the bundled SmolLM2 file loads
into the same weights as the converted default-model folder (which is bfloat16)."""

import pytest
import torch

from pipemax.models import load_model
from pipemax.models.default_model import bundled_gguf, default_model_path


def test_gguf_file_loads_the_same_weights_as_the_converted_folder():
    folder_model = load_model(default_model_path(), layer_start=28, dtype=torch.bfloat16)
    gguf_model = load_model(bundled_gguf(), layer_start=28, dtype=torch.float32)
    assert gguf_model.config.num_layers == 30 and gguf_model.config.num_kv_heads == 3
    folder_weights = dict(folder_model.named_parameters())
    for name, param in gguf_model.named_parameters():
        assert torch.equal(param.to(torch.bfloat16), folder_weights[name]), name


def write_moe_gguf(hf, path, arch):
    """A float32 GGUF of a transformers Qwen2-MoE or Qwen3-MoE model, named and laid out as
    llama.cpp's converter writes it (experts stacked per projection, the shared expert's gate a
    vector)."""
    import gguf

    config = hf.config
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    if arch == gguf.MODEL_ARCH.QWEN3MOE:
        writer.add_key_length(config.head_dim)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_expert_count(config.num_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(config.vocab_size)])
    writer.add_token_types([1] * config.vocab_size)
    writer.add_token_merges([])
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for name, tensor in hf.state_dict().items():
        base, _, kind = name.rpartition(".")
        if name.endswith("experts.gate_up_proj"):
            for part, half in zip(("gate_proj", "up_proj"), tensor.chunk(2, dim=1)):
                writer.add_tensor(names.get_name(name.replace("gate_up_proj", part)) + ".weight",
                                  half.contiguous().numpy())
        elif name.endswith("experts.down_proj"):
            writer.add_tensor(names.get_name(name) + ".weight", tensor.contiguous().numpy())
        else:
            if name.endswith("shared_expert_gate.weight"):
                tensor = tensor.reshape(-1)
            writer.add_tensor(f"{names.get_name(base)}.{kind}", tensor.contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("family, architecture, sizes", [
    ("qwen2-moe", "Qwen2MoeForCausalLM", dict(moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
                                                mlp_only_layers=[])),
    ("qwen3-moe", "Qwen3MoeForCausalLM", dict(moe_intermediate_size=768, norm_topk_prob=False)),
])
def test_a_moe_gguf_loads_the_weights_of_its_checkpoint(tmp_path, family, architecture, sizes):
    """transformers reads Qwen2-MoE and Qwen3-MoE GGUF files (with the expert sizes of the
    released models, which its GGUF reader assumes; Mixtral and OPT it does not read): the
    experts, the router, q/k norms and the shared expert land where the safetensors checkpoint
    puts them."""
    import gguf

    from pipemax.models import LlamaFamilyModel, load_weights, model_config_at, model_config_from_hf
    from tests.tiny_models import tiny_hf_model

    hf = tiny_hf_model(family, **sizes)
    file = tmp_path / f"tiny-{family}.gguf"
    write_moe_gguf(hf, file, gguf.MODEL_ARCH.QWEN2MOE if family == "qwen2-moe" else gguf.MODEL_ARCH.QWEN3MOE)
    config = model_config_at(file)
    assert config.architecture == architecture and config.moe_layers == (0, 1, 2)
    from_gguf = dict(load_model(file).named_parameters())
    reference = LlamaFamilyModel(model_config_from_hf(hf.config))
    with torch.no_grad():
        load_weights(reference, hf.state_dict().items())
    expected = dict(reference.named_parameters())
    assert from_gguf.keys() == expected.keys()
    for name, param in from_gguf.items():
        assert torch.equal(param, expected[name]), name


def test_processes_starting_together_convert_the_default_model_once(tmp_path, monkeypatch):
    """Two jobs (or test workers) on a fresh machine: one converts, the other waits and reads its
    folder (flock excludes separate opens of the lock file, threads included)."""
    import threading
    import time

    from pipemax.models import default_model

    monkeypatch.setenv("PIPEMAX_CACHE", str(tmp_path))
    monkeypatch.setattr(default_model, "bundled_gguf", lambda: tmp_path / "model.gguf")
    conversions = []

    def slow_convert(gguf_path, target):
        conversions.append(target)
        time.sleep(0.3)  # long enough for the other caller to arrive while this one converts
        target.mkdir(parents=True)
        (target / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(default_model, "convert_gguf", slow_convert)
    paths = []
    callers = [threading.Thread(target=lambda: paths.append(default_model.default_model_path())) for _ in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert len(conversions) == 1 and len(paths) == 2 and all((p / "model.safetensors").exists() for p in paths)
