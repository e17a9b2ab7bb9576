"""Model wrappers per HF family, weight loading, layer ranges (stages).

Place in the stack: runtime -> models -> kernels. Models call kernels through
`attention.ChunkedAttention` and hold no KV bookkeeping; a model object can be built for any
contiguous layer range, so a pipeline stage loads only its own layers.
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
