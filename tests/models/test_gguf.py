"""Weights from a GGUF file (through transformers' GGUF support): the bundled SmolLM2 file loads
into the same weights as the converted default-model folder (which is bfloat16)."""

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
