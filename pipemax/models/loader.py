"""Build a model (or one stage of it) and load its weights.

Sources: a local HF folder with safetensors (one file, or shards listed in
model.safetensors.index.json), a GGUF file read through transformers' GGUF support, or any
iterable of (name, tensor) pairs in transformers' naming (tests pass a reference model's
state_dict). Only the tensors of the stage's layers are read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from .config import ModelConfig, load_model_config
from .llama import LlamaFamilyModel
from .opt import OPTModel

LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Checkpoint weights that go into one fused parameter: (fused name, part index, parts).
FUSED_PARTS = {
    "self_attn.q_proj": ("qkv_proj", 0, 3),
    "self_attn.k_proj": ("qkv_proj", 1, 3),
    "self_attn.v_proj": ("qkv_proj", 2, 3),
    "mlp.gate_proj": ("gate_up_proj", 0, 2),
    "mlp.up_proj": ("gate_up_proj", 1, 2),
}
RENAMED = {
    "self_attn.o_proj": "o_proj",
    "mlp.down_proj": "down_proj",
    "self_attn.q_norm": "q_norm",
    "self_attn.k_norm": "k_norm",
    "input_layernorm": "input_layernorm",
    "post_attention_layernorm": "post_attention_layernorm",
}
# Mixture of experts: the router, each expert's projections (into the fused [experts, ...]
# parameters), Qwen2-MoE's shared expert and its gate.
EXPERT_NAME = re.compile(r"^(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
EXPERT_PARTS = {"w1": ("experts_gate_up", 0), "gate_proj": ("experts_gate_up", 0), "w3": ("experts_gate_up", 1),
                "up_proj": ("experts_gate_up", 1), "w2": ("experts_down", None), "down_proj": ("experts_down", None)}
# transformers' own (in-memory, state_dict) form: every expert in one [experts, ...] tensor.
FUSED_EXPERTS = re.compile(r"^(?:block_sparse_moe|mlp)\.experts\.(gate_up_proj|down_proj)$")
FUSED_PARTS.update({"mlp.shared_expert.gate_proj": ("moe.shared_gate_up_proj", 0, 2),
                    "mlp.shared_expert.up_proj": ("moe.shared_gate_up_proj", 1, 2)})
RENAMED.update({"block_sparse_moe.gate": "moe.router", "mlp.gate": "moe.router",
                "mlp.shared_expert.down_proj": "moe.shared_down_proj", "mlp.shared_expert_gate": "moe.shared_expert_gate"})
# OPT: its decoder's names, and its modules (q/k/v fuse as above).
RENAMED.update({"self_attn.out_proj": "o_proj", "self_attn_layer_norm": "self_attn_layer_norm",
                "final_layer_norm": "final_layer_norm", "fc1": "fc1", "fc2": "fc2"})
OPT_TOP_LEVEL = {"model.decoder.final_layer_norm.": "model.norm.", "model.decoder.": "model.",
                 # the facebook/opt-* checkpoints on the Hub name their tensors decoder.* (no model.)
                 "decoder.final_layer_norm.": "model.norm.", "decoder.": "model."}
IGNORED = re.compile(r"rotary_emb\.inv_freq$")
# An fp8 checkpoint's KV-cache scales (dequantised value = fp8 value x scale), as vLLM reads them:
# (K, V) entries each sets. Kept as each layer's kv_scale buffer; only an fp8 KV cache uses them.
KV_SCALE_NAMES = {"self_attn.k_scale": (0,), "self_attn.v_scale": (1,), "self_attn.attn.k_scale": (0,),
                  "self_attn.attn.v_scale": (1,), "self_attn.kv_scale": (0, 1)}


def canonical_name(name: str) -> str:
    """OPT's model.decoder.* names in the Llama family's form (model.layers.N..., model.norm...)."""
    for prefix, replacement in OPT_TOP_LEVEL.items():
        if name.startswith(prefix):
            return replacement + name[len(prefix):]
    return name


def build_model(config: ModelConfig, layer_start: int = 0, layer_end: int | None = None, device=None,
                dtype: torch.dtype = torch.float32):
    """The model class of config's family, for layers [layer_start, layer_end), weights unset."""
    family = OPTModel if config.is_opt else LlamaFamilyModel
    return family(config, layer_start, layer_end, device=device, dtype=dtype)


class WeightLoadError(RuntimeError):
    pass


MODEL_FORMS = "PipeMax loads local model folders (config.json + safetensors) and .gguf files only"


def find_weights(model_path: Path) -> tuple[str, Path | list[Path]]:
    """('safetensors', [files]) or ('gguf', file) for a folder or a file path."""
    if not model_path.exists():
        raise WeightLoadError(f"model path {model_path} does not exist ({MODEL_FORMS})")
    if model_path.is_file():
        if model_path.suffix == ".gguf":
            return "gguf", model_path
        raise WeightLoadError(f"model path {model_path} is a file but not a .gguf file ({MODEL_FORMS})")
    index = model_path / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as error:
            raise WeightLoadError(f"{index} is not a valid safetensors index ({error}): re-download the model") from None
        return "safetensors", [model_path / shard for shard in shards]
    files = sorted(model_path.glob("*.safetensors"))
    if files:
        return "safetensors", files
    ggufs = sorted(model_path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    raise WeightLoadError(f"no safetensors or single GGUF file found in {model_path} ({MODEL_FORMS})")


def check_model_path(model_path: Path) -> None:
    """Everything about the model's files that can be checked without reading the weights: the
    path, config.json, and each safetensors file's header. WeightLoadError names the file at fault."""
    kind, source = find_weights(model_path)
    if kind == "gguf":
        check_gguf(source)
        return
    config = model_path / "config.json"
    if not config.is_file():
        raise WeightLoadError(f"{model_path} has no config.json ({MODEL_FORMS})")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, OSError) as error:
        raise WeightLoadError(f"{config} is not valid JSON ({error}): re-download the model") from None
    from safetensors import safe_open

    for file in source:
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except Exception as error:  # SafetensorError, OSError: a missing, truncated or corrupt file
            raise WeightLoadError(f"{file} is not a readable safetensors file ({error}): re-download or "
                                  "re-convert the model") from None


def check_gguf(file: Path) -> None:
    """Parse the GGUF file's header and tensor table (no tensor data): a cut-short or foreign file fails here."""
    try:
        with open(file, "rb") as handle:
            magic = handle.read(4)
    except OSError as error:
        raise WeightLoadError(f"cannot read {file} ({error.strerror})") from None
    if magic != b"GGUF":
        raise WeightLoadError(f"{file} is not a GGUF file (it does not start with 'GGUF'): re-download it")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise WeightLoadError("reading .gguf files needs the gguf package: pip install gguf accelerate") from None
    try:
        GGUFReader(str(file))
    except Exception as error:  # ValueError, struct errors: a truncated or damaged file
        raise WeightLoadError(f"{file} is not a readable GGUF file ({error}): re-download it") from None


def iter_safetensors(files: list[Path], wanted) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    if wanted(name):
                        yield name, handle.get_tensor(name)
        except WeightLoadError:
            raise
        except Exception as error:  # the header was fine but the data is not (truncated, bad offsets)
            raise WeightLoadError(f"{file} could not be read ({error}): re-download or re-convert the model") from None


def iter_gguf(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32)
    yield from reference.state_dict().items()


def stage_wants(config: ModelConfig, layer_start: int, layer_end: int):
    """Predicate: does this stage need the checkpoint tensor of that name?"""
    first, last = layer_start == 0, layer_end == config.num_layers

    def wanted(name: str) -> bool:
        name = canonical_name(name)
        match = LAYER_NAME.match(name)
        if match:
            return layer_start <= int(match.group(1)) < layer_end
        if name == "model.embed_tokens.weight":
            return first or (last and config.tie_word_embeddings)
        if name in ("model.embed_positions.weight", "model.project_in.weight"):
            return first
        if name in ("model.norm.weight", "model.norm.bias", "lm_head.weight", "model.project_out.weight"):
            return last
        return False

    return wanted


def load_weights(model: LlamaFamilyModel, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy checkpoint tensors (transformers names) into the model; every parameter must be set."""
    config = model.config
    params = dict(model.named_parameters())
    pending = set(params)
    fused_sizes = {
        "qkv_proj": [config.q_size, config.kv_size, config.kv_size],
        "gate_up_proj": [config.intermediate_size, config.intermediate_size],
        "moe.shared_gate_up_proj": [config.shared_expert_intermediate_size] * 2,
    }
    wanted = stage_wants(config, model.layer_start, model.layer_end)

    def assign(target: str, tensor: torch.Tensor, part: int | None = None, fused: str | None = None):
        if target not in params:
            raise WeightLoadError(f"checkpoint tensor maps to {target}, which this model does not have")
        param = params[target]
        destination = param.data
        if part is not None:
            sizes = fused_sizes[fused]
            destination = destination.narrow(0, sum(sizes[:part]), sizes[part])
        if tuple(destination.shape) != tuple(tensor.shape):
            raise WeightLoadError(f"{target}: checkpoint shape {tuple(tensor.shape)} != {tuple(destination.shape)}")
        destination.copy_(tensor)
        pending.discard(f"{target}#{part}" if part is not None else target)

    def assign_expert(target: str, tensor: torch.Tensor, expert: int, part: int | None):
        """One expert's projection into the fused [experts, ...] parameter (gate, up: halves)."""
        if target not in params or expert >= params[target].shape[0]:
            raise WeightLoadError(f"checkpoint expert tensor maps to {target}[{expert}], which this model does not have")
        destination = params[target].data[expert]
        if part is not None:
            half = destination.shape[0] // 2
            destination = destination.narrow(0, part * half, half)
        if tuple(destination.shape) != tuple(tensor.shape):
            raise WeightLoadError(f"{target}[{expert}]: checkpoint shape {tuple(tensor.shape)} != "
                                  f"{tuple(destination.shape)}")
        destination.copy_(tensor)
        pending.discard(f"{target}#{expert}" + (f"#{part}" if part is not None else ""))

    # Fused parameters are complete only when all their parts arrived.
    for name, param in list(params.items()):
        if name.endswith(("qkv_proj.weight", "qkv_proj.bias", "gate_up_proj.weight", "gate_up_proj.bias")):
            pending.discard(name)
            parts = 3 if "qkv_proj" in name else 2
            pending.update(f"{name}#{part}" for part in range(parts))
        elif name.endswith(("moe.experts_gate_up", "moe.experts_down")):
            pending.discard(name)
            halves = (0, 1) if name.endswith("gate_up") else (None,)
            pending.update(f"{name}#{expert}" + (f"#{part}" if part is not None else "")
                           for expert in range(param.shape[0]) for part in halves)

    for name, tensor in named_tensors:
        if IGNORED.search(name) or not wanted(name):
            continue
        name = canonical_name(name)
        match = LAYER_NAME.match(name)
        if match:
            layer = int(match.group(1)) - model.layer_start
            module, _, kind = match.group(2).rpartition(".")  # kind: weight or bias
            expert, every_expert = EXPERT_NAME.match(match.group(2)), FUSED_EXPERTS.match(match.group(2))
            if match.group(2) in KV_SCALE_NAMES:
                values = tensor.float()
                if values.numel() == 0 or not bool(torch.isfinite(values).all()) or bool((values <= 0).any()):
                    raise WeightLoadError(f"{name} is {values.flatten()[:4].tolist()}: a KV scale must be a positive "
                                          "number")
                value = float(values.max())  # a scalar (per-tensor); finer scales: their largest
                for index in KV_SCALE_NAMES[match.group(2)]:
                    model.layers[layer].kv_scale[index] = value
            elif every_expert:
                target = "experts_gate_up" if every_expert.group(1) == "gate_up_proj" else "experts_down"
                for index in range(tensor.shape[0]):
                    if target == "experts_down":
                        assign_expert(f"layers.{layer}.moe.{target}", tensor[index], index, None)
                    else:
                        for part, half in enumerate(tensor[index].chunk(2, dim=0)):
                            assign_expert(f"layers.{layer}.moe.{target}", half, index, part)
            elif expert:
                target, part = EXPERT_PARTS[expert.group(2)]
                assign_expert(f"layers.{layer}.moe.{target}", tensor, int(expert.group(1)), part)
            elif module in FUSED_PARTS:
                fused, part, _ = FUSED_PARTS[module]
                assign(f"layers.{layer}.{fused}.{kind}", tensor, part, fused)
            elif module in RENAMED:
                assign(f"layers.{layer}.{RENAMED[module]}.{kind}", tensor)
            else:
                raise WeightLoadError(f"unexpected checkpoint tensor {name}")
        elif name == "model.embed_tokens.weight":
            if model.is_first:
                assign("embed_tokens.weight", tensor)
            if model.is_last and config.tie_word_embeddings and "lm_head.weight" in params:
                assign("lm_head.weight", tensor)  # a last stage without the embedding: a copy
        elif name in ("model.norm.weight", "model.norm.bias"):
            assign(name.removeprefix("model."), tensor)
        elif name in ("model.embed_positions.weight", "model.project_in.weight", "model.project_out.weight"):
            assign(name.removeprefix("model."), tensor)
        elif name == "lm_head.weight" and "lm_head.weight" in params:
            assign("lm_head.weight", tensor)
    if pending:
        missing = sorted(pending)
        raise WeightLoadError(f"{len(missing)} parameter(s) not found in the checkpoint, e.g. {missing[:4]}")


def model_config_at(model_path: str | Path) -> ModelConfig:
    """The ModelConfig of a model folder or GGUF file (its config.json, or the GGUF header)."""
    model_path = Path(model_path)
    kind, source = find_weights(model_path)
    return load_model_config(source.parent, gguf_file=source.name) if kind == "gguf" else load_model_config(model_path)


def load_model(model_path: str | Path, layer_start: int = 0, layer_end: int | None = None,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               config: ModelConfig | None = None) -> LlamaFamilyModel:
    """The model (or the stage [layer_start, layer_end)) from a local folder or GGUF file."""
    model_path = Path(model_path)
    kind, source = find_weights(model_path)
    if config is None:
        config = model_config_at(model_path)
    layer_end = config.num_layers if layer_end is None else layer_end
    model = build_model(config, layer_start, layer_end, device=device, dtype=dtype)
    wanted = stage_wants(config, layer_start, layer_end)
    tensors = iter_gguf(source) if kind == "gguf" else iter_safetensors(source, wanted)
    with torch.no_grad():
        load_weights(model, tensors)
    model.eval()
    return model
