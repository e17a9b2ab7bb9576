"""Per-server profiles: what `pipemax autotune` measured on a server for a model, and the plan it
chose, as one JSON file keyed by the GPU model, the GPU count, the model's shape, its dtype and
the KV cache's storage dtype, in $PIPEMAX_PROFILES (default ~/.cache/pipemax/profiles) unless a
path is given.

A profile made on another GPU, GPU count, model or KV dtype is refused with one line saying what
it was made for, what this server is, and how to make the right one: a plan tuned for other
hardware would silently mislead, and one for another KV dtype counts every KV byte (pool, PCIe,
attention's step cost) twice or half as large. Profiles written before the key named the KV
dtype held their KV in the model's dtype: they are read as such, and keep their file name.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipemax.core.kv_dtype import is_fp8, kv_storage_name
from pipemax.engine.step_costs import profiles_dir
from pipemax.models.config import model_shape

PROFILE_FORMAT = "pipemax server profile"
PROFILE_VERSION = 2  # 2: the model's shape includes its experts and OPT's layout


class ProfileError(ValueError):
    pass


@dataclass
class ServerProfile:
    key: dict  # {"gpu": name, "gpus": count, "model": shape, "dtype": name, "kv_cache_dtype": KV storage name}
    hardware: dict = field(default_factory=dict)  # hardware.Hardware.to_dict() at autotune time
    measurements: dict = field(default_factory=dict)  # bandwidths, step-cost fits, ...
    plan: dict = field(default_factory=dict)  # the settings chosen: chunk_tokens, micro_batches, ...


def profile_key(gpu_name: str, gpu_count: int, model_config, dtype: str, kv_cache_dtype: str = "auto") -> dict:
    """The key of a profile for this server and model; its KV dtype is the storage name
    ("bfloat16" for auto with a bfloat16 model, "fp8_e4m3" for fp8), so that auto and the model's
    dtype, or fp8 and fp8_e4m3, name the same profile."""
    return {"gpu": gpu_name, "gpus": gpu_count, "dtype": dtype,
            "kv_cache_dtype": kv_storage_name(kv_cache_dtype, dtype), "model": model_shape(model_config)}


def kv_cache_dtype_of(key: dict) -> str:
    """The kv_cache_dtype setting that stores KV as the key's profile was made for: its fp8
    storage, else auto (a KV dtype that is not fp8 is the model's)."""
    storage = key.get("kv_cache_dtype")
    return storage if is_fp8(storage) else "auto"


def this_device_name(device) -> str:
    """The name a profile is keyed by: the CUDA device's (as the driver names it), or "cpu"."""
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def default_profile_path(key: dict) -> Path:
    if key.get("kv_cache_dtype") == key.get("dtype"):  # the name it had before the key named the KV dtype
        key = {name: value for name, value in key.items() if name != "kv_cache_dtype"}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return profiles_dir() / f"server-{digest}.json"


def save_profile(profile: ServerProfile, path: Path | None = None) -> Path:
    """Writes the profile atomically (a reader never sees half a file); returns its path."""
    path = Path(path) if path is not None else default_profile_path(profile.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"format": PROFILE_FORMAT, "version": PROFILE_VERSION, **asdict(profile)}
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(temporary, path)
    return path


def describe_key(key: dict) -> str:
    model = key.get("model", {})
    return (f"{key.get('gpus')} x {key.get('gpu')}, {model.get('architecture')} "
            f"({model.get('num_layers')} layers, hidden {model.get('hidden_size')}), {key.get('dtype')}, "
            f"{key.get('kv_cache_dtype')} KV")


def load_profile(path: Path, expected_key: dict | None = None) -> ServerProfile:
    """The profile at path; with expected_key, refused unless it was made for that server and
    model. Raises ProfileError with a one-line reason."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise ProfileError(f"no profile at {path}: run `pipemax autotune` to make one") from None
    except (OSError, ValueError) as error:
        raise ProfileError(f"the profile {path} cannot be read ({error}): run `pipemax autotune` again") from None
    if not isinstance(record, dict) or record.get("format") != PROFILE_FORMAT:
        raise ProfileError(f"{path} is not a PipeMax server profile")
    if record.get("version") != PROFILE_VERSION:
        raise ProfileError(f"the profile {path} has format version {record.get('version')}, this PipeMax reads "
                           f"{PROFILE_VERSION}: run `pipemax autotune` again")
    parts = {name: record.get(name, {}) for name in ("key", "hardware", "measurements", "plan")}
    if "key" not in record or not all(isinstance(part, dict) for part in parts.values()):
        raise ProfileError(f"the profile {path} is damaged (its key, hardware, measurements and plan must be "
                           "objects): run `pipemax autotune` again")
    if "kv_cache_dtype" not in parts["key"]:  # made before the key named the KV dtype: KV was in the model's dtype
        parts["key"] = {**parts["key"], "kv_cache_dtype": parts["key"].get("dtype")}
    profile = ServerProfile(parts["key"], parts["hardware"], parts["measurements"], parts["plan"])
    if expected_key is not None and profile.key != expected_key:
        raise ProfileError(f"the profile {path} was made for {describe_key(profile.key)}; this is "
                           f"{describe_key(expected_key)}: run `pipemax autotune` here for this model")
    return profile
