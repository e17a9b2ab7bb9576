"""Model wrappers per HF family, weight loading, layer ranges (stages).

Place in the stack: worker -> models -> kernels. May import kernels, torch, transformers,
safetensors, gguf; never core, worker or anything above. Models call kernels through
`attention.ChunkedAttention` and hold no KV bookkeeping; a model object can be built for any
contiguous layer range, so a pipeline stage loads only its own layers.

    config.py         ModelConfig: what PipeMax needs of a model, read through transformers' configs;
                      model_shape, the key of step-cost and server profiles
    llama.py          the Llama family (Llama, Mistral, Qwen2/3, and their MoE variants)
    opt.py            OPT
    attention.py      the attention interface between the models and the kernels
    rope.py           rotary frequencies from transformers' own rope functions
    loader.py         building a model (or one stage of it) and loading safetensors / GGUF weights
    default_model.py  the bundled SmolLM2-135M-Instruct, converted once into a cached HF folder
"""

from .attention import AttentionMetadata, ChunkedAttention
from .config import SUPPORTED_ARCHITECTURES, ModelConfig, UnsupportedModelError, load_model_config, model_config_from_hf
from .llama import LlamaFamilyModel
from .loader import WeightLoadError, build_model, load_model, load_weights, model_config_at
from .opt import OPTModel

__all__ = [
    "AttentionMetadata",
    "ChunkedAttention",
    "LlamaFamilyModel",
    "ModelConfig",
    "OPTModel",
    "SUPPORTED_ARCHITECTURES",
    "UnsupportedModelError",
    "WeightLoadError",
    "build_model",
    "load_model",
    "load_model_config",
    "load_weights",
    "model_config_at",
    "model_config_from_hf",
]
