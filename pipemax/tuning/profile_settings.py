"""serve-offline's settings: a flag the user typed, else the server profile `pipemax autotune`
saved for this GPU, GPU count, model, dtype and KV cache dtype, else the built-in default.

The profile is found by its key (profiles folder) or named with --profile; --no-profile ignores
it. A profile made for another GPU or model is refused in one line. Under torchrun, profiles are
only used when named: nodes that found different files would run different settings.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

# EngineConfig field -> (the args attribute of its flag, the built-in default)
PROFILE_FIELDS = {
    "pipeline_parallel": ("pipeline_parallel", 1), "data_parallel": ("data_parallel", 1),
    "stage_layers": ("stage_layers", None), "micro_batches": ("micro_batches", None),
    "chunk_tokens": ("chunk_tokens", 16), "max_num_seqs": ("max_batch", 256),
    "max_num_batched_tokens": ("max_batched_tokens", 2048), "kv_cache_gib": ("kv_cache_gib", None),
    "offload": ("offload", "off"), "host_memory_gib": ("host_memory_gib", None),
    "prefetch_gbs": ("prefetch_gbs", None),
}
LAYOUT_FIELDS = ("stage_layers", "micro_batches", "kv_cache_gib")  # belong to the profile's stage split
OFFLOAD_FIELDS = ("host_memory_gib", "prefetch_gbs")


class ProfileSettingsError(ValueError):
    pass


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server profile")
    group.add_argument("--profile", type=Path, help="the autotune profile to run with (default: the one "
                                                    "`pipemax autotune` saved for this GPU, GPU count and model)")
    group.add_argument("--no-profile", action="store_true", help="ignore server profiles: flags and defaults only")


def profile_lookup_key(args: argparse.Namespace) -> dict:
    """The key of the profile this job would use: this device, the GPUs it uses, the model, dtype
    and KV cache dtype (an fp8 KV cache runs with a profile made for it: its pools, copies and
    step costs count half the KV bytes)."""
    import torch

    from pipemax.models import model_config_at
    from pipemax.models.default_model import default_model_path

    from .server_profile import profile_key, this_device_name

    wants_cuda = torch.cuda.is_available() and (args.device == "auto" or str(args.device).startswith("cuda"))
    device = torch.device(args.device if str(args.device).startswith("cuda") else "cuda") if wants_cuda \
        else torch.device("cpu")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    if args.pipeline_parallel is not None or args.data_parallel is not None:
        gpus = (args.pipeline_parallel or 1) * (args.data_parallel or 1)
    else:
        gpus = torch.cuda.device_count() if device.type == "cuda" else 1
    config = model_config_at(Path(args.model) if args.model is not None else default_model_path())
    # (serve-offline's --kv-cache-dtype; the engine's default where a parser has no such flag)
    kv_cache_dtype = getattr(args, "kv_cache_dtype", None) or "auto"
    return profile_key(this_device_name(device), gpus, config, dtype, kv_cache_dtype)


def apply_server_profile(args: argparse.Namespace, under_torchrun: bool = False) -> list[str]:
    """Fills every profile field the user did not type, from the profile or the defaults, in
    args; returns the lines to print (which profile, the settings the job runs with). A model
    that cannot be read gets no profile here: the job's own checks then say what is wrong."""
    from pipemax.models import UnsupportedModelError, WeightLoadError

    from .server_profile import ProfileError, default_profile_path, describe_key, load_profile

    try:
        key = None if args.no_profile or (under_torchrun and args.profile is None) else profile_lookup_key(args)
    except (WeightLoadError, UnsupportedModelError, OSError, ValueError, RuntimeError, AssertionError):
        return fill_defaults(args)  # (a model or device that cannot be read: the job's checks say why)
    typed = {field for field, (attribute, _) in PROFILE_FIELDS.items() if getattr(args, attribute) is not None}
    lines, plan = [], {}
    if args.no_profile:
        lines.append("server profile: not used (--no-profile)")
    elif under_torchrun and args.profile is None:
        lines.append("server profile: not looked up under torchrun (name one with --profile on every node)")
    else:
        path = args.profile if args.profile is not None else default_profile_path(key)
        if args.profile is not None and args.pipeline_parallel is None and args.data_parallel is None:
            key = _with_profiles_gpu_count(key, path)
        if args.profile is None and not Path(path).exists():
            lines.append(f"server profile: none for {describe_key(key)}; running with flags and defaults "
                         f"(`pipemax autotune{' --model ' + str(args.model) if args.model else ''}` makes one)")
        else:
            try:
                profile = load_profile(path, key)
            except ProfileError as error:
                raise ProfileSettingsError(f"--profile: {error}") from None
            check_profile_plan(profile, path)
            plan = profile.plan
            lines.append(f"server profile: {path}")
    chosen = {field: plan[field] for field in PROFILE_FIELDS if field not in typed and plan.get(field) is not None}
    layout_typed = [field for field in ("pipeline_parallel", "data_parallel") if field in typed
                    and getattr(args, PROFILE_FIELDS[field][0]) != plan.get(field, PROFILE_FIELDS[field][1])]
    if plan and layout_typed:  # another layout: none of the profile's layout applies, either axis
        for field in (*LAYOUT_FIELDS, "pipeline_parallel", "data_parallel"):
            chosen.pop(field, None)
        lines.append(f"  the profile plans {plan.get('pipeline_parallel', 1)} stage(s) x {plan.get('data_parallel', 1)} "
                     f"replica(s); with your layout its stages, replicas, micro-batches and KV budget are not used")
    if "kv_cache_gib" in chosen and _memory_typed(args, plan):
        chosen.pop("kv_cache_gib")  # the engine sizes the KV cache from what you gave it
        lines.append("  the profile's KV budget is not used: --gpu-memory-gib, --pipeline-transport inprocess or a "
                     "larger batch than it planned for changes what the GPU holds")
    for field, (attribute, default) in PROFILE_FIELDS.items():
        if field in chosen:
            setattr(args, attribute, chosen[field])
        elif getattr(args, attribute) is None:
            setattr(args, attribute, default)
    # The profile's offload budgets mean nothing without offload; its prefetch rate only to auto.
    for field in OFFLOAD_FIELDS:
        unused = args.offload == "off" or (field == "prefetch_gbs" and args.offload != "auto")
        if unused and field not in typed:
            setattr(args, PROFILE_FIELDS[field][0], None)
            chosen.pop(field, None)
    args.profile_fields = set(chosen)  # an invalid value from the profile is named as the profile's
    lines.append("settings: " + describe_settings(args, typed, set(chosen)))
    return lines


INTEGER_FIELDS = ("pipeline_parallel", "data_parallel", "micro_batches", "chunk_tokens", "max_num_seqs",
                  "max_num_batched_tokens")
NUMBER_FIELDS = {"kv_cache_gib": "GiB", "host_memory_gib": "GiB", "prefetch_gbs": "GB/s"}


def check_profile_plan(profile, path) -> None:
    """Each of the profile's settings is of its kind, and its layout is one of the GPUs and the
    model it was made for: else one line naming the field at fault (a damaged or hand-edited
    profile), before any field is compared with a flag or checked against another (a stage count
    beyond the GPUs would be reported as the micro-batch count's range). Values within their kind
    are the engine's to check (named as the profile's then: args.profile_fields)."""
    from pipemax.engine.config import OFFLOAD_MODES

    plan = profile.plan

    def refuse(field: str, problem: str):
        raise ProfileSettingsError(f"--profile: the server profile's {field} {problem} ({path}): run `pipemax "
                                   "autotune` again")

    for field in INTEGER_FIELDS:
        value = plan.get(field)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            refuse(field, f"must be a positive integer, got {value!r}")
    for field, unit in NUMBER_FIELDS.items():
        value = plan.get(field)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                  or not math.isfinite(value) or value <= 0):
            refuse(field, f"must be a positive number of {unit}, got {value!r}")
    if plan.get("offload") is not None and plan["offload"] not in OFFLOAD_MODES:
        refuse("offload", f"must be one of {', '.join(OFFLOAD_MODES)}, got {plan['offload']!r}")
    layers = plan.get("stage_layers")
    if layers is not None and not (isinstance(layers, list) and all(
            isinstance(count, int) and not isinstance(count, bool) and count >= 1 for count in layers)):
        refuse("stage_layers", f"must be a list of layer counts, got {layers!r}")
    stages, replicas = plan.get("pipeline_parallel", 1), plan.get("data_parallel", 1)
    gpus, model_layers = profile.key.get("gpus"), profile.key.get("model", {}).get("num_layers")
    if isinstance(gpus, int) and stages * replicas != gpus:
        refuse("pipeline_parallel", f"of {stages} x data_parallel {replicas} is not the {gpus} GPU(s) it was made for")
    if isinstance(model_layers, int) and stages > model_layers:
        refuse("pipeline_parallel", f"of {stages} is more stages than the model's {model_layers} layers")


def _with_profiles_gpu_count(key: dict, path) -> dict:
    """A profile named by hand may plan for fewer GPUs than are visible (`autotune --gpus N`)."""
    from .server_profile import ProfileError, load_profile

    try:
        made_for = load_profile(path).key.get("gpus")
    except ProfileError:
        return key  # the load that follows says what is wrong with it
    if isinstance(made_for, int) and 1 <= made_for <= key["gpus"]:
        return {**key, "gpus": made_for}
    return key


def _memory_typed(args: argparse.Namespace, plan: dict) -> bool:
    """What the user typed changes the memory the profile's KV budget was planned within."""
    from .server_plan import MAX_SEQS_PER_STEP, MIN_BATCHED_TOKENS

    return (getattr(args, "gpu_memory_gib", None) is not None
            or getattr(args, "pipeline_transport", "distributed") == "inprocess"
            and (args.pipeline_parallel or plan.get("pipeline_parallel", 1)) > 1
            or (args.max_batch or 0) > max(plan.get("max_num_seqs", 0), MAX_SEQS_PER_STEP)
            or (args.max_batched_tokens or 0) > 2 * MIN_BATCHED_TOKENS)


def fill_defaults(args: argparse.Namespace) -> list[str]:
    args.profile_fields = set()
    for attribute, default in PROFILE_FIELDS.values():
        if getattr(args, attribute) is None:
            setattr(args, attribute, default)
    return []


def describe_settings(args: argparse.Namespace, typed: set[str], from_profile: set[str]) -> str:
    parts = []
    for field, (attribute, _) in PROFILE_FIELDS.items():
        value = getattr(args, attribute)
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        source = " (flag)" if field in typed else " (profile)" if field in from_profile else ""
        parts.append(f"{field}={value}{source}")
    return ", ".join(parts)
