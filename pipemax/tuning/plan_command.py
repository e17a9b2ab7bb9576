"""`pipemax plan`: what a server would do with a model and a workload, for servers not at hand.

    pipemax plan --gpus 8 --gpu-memory-gib 32 --pcie-gbs 55 --hbm-tbs 1.8 --tflops 200 \\
        --model CONFIG_OR_FOLDER --workload sharegpt|longbench|decode-heavy|FILE.jsonl \\
        [--kv-cache-dtype auto|fp8|fp8_e4m3|fp8_e5m2] [--json]

It compares three layouts on the same server: a pipeline stage per GPU with offload=auto
(pp_offload: each stage's staging ring, sized as the engine will) and without (pp), and the whole
model on each GPU, a replica per GPU (dp). For each it chooses the settings
(server_plan.choose_plan), then replays the real scheduler on the workload and times it with the
server's model (server_plan.simulate_plan); a ring that the simulation finds slower than pp, or
that keeps no request on the host, is dropped (pp_offload is then pp). The table gives the whole
run's generated tokens/s and the steady state's (while requests wait to start, as in a long job), a
slot of the ring in GB and the share of the run a stage waited on its copies. No layout is named
best unless it predicts some throughput: where none does, one line says why (exit status 1).
Compute comes from a roofline of the given peaks, or from the step costs an autotune profile
measured (--profile, refused unless made for this model, dtype and KV cache dtype); every flag
given overrides the profile. --kv-cache-dtype fp8 counts the KV cache at a byte an element (plus
its scales): in each GPU's pool, over PCIe and in attention's read of the context.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from pipemax.core.kv_dtype import KV_CACHE_DTYPES

LAYOUTS = ("pp_offload", "pp", "dp")
DTYPE_NAMES = ("bfloat16", "float16", "float32")
KV_CACHE_DTYPE_HELP = ("the KV cache's dtype: auto (the model's), fp8 (= fp8_e4m3) or fp8_e5m2. fp8 halves the KV's "
                       "bytes in VRAM, over PCIe and through attention (a float32 scale per token, layer and KV head "
                       "beside them); it needs sm_89+ GPUs (Ada, Hopper, Blackwell)")
SERVER_FLAGS = ("--gpu-memory-gib", "--pcie-gbs", "--hbm-tbs", "--tflops")  # what a server without a profile needs


def add_plan_parser(commands) -> None:
    plan = commands.add_parser(
        "plan", help="predict a server's throughput for a model and workload (pipeline with and without offload, "
                     "data parallel), without the server",
        description="Simulates the engine's own scheduler on a modelled server. Without --profile, "
                    f"{', '.join(SERVER_FLAGS[:-1])} and {SERVER_FLAGS[-1]} are all needed; with an autotune "
                    "profile (--profile) each overrides what it measured.")
    plan.add_argument("--model", required=True, help="a model folder, its config.json, or a .gguf file (no weights "
                                                     "are read)")
    plan.add_argument("--workload", default="sharegpt",
                      help="sharegpt, longbench, decode-heavy (synthetic lengths) or a .jsonl file of requests "
                           "(default sharegpt)")
    plan.add_argument("--num-prompts", type=int, default=2000, help="requests of a synthetic workload (default 2000)")
    plan.add_argument("--profile", type=Path, help="an autotune profile: its measured costs, bandwidths and memory")
    plan.add_argument("--gpus", type=int, help="GPUs in the server (default: the profile's, else 1)")
    plan.add_argument("--gpu-memory-gib", type=float, help="memory PipeMax may use on each GPU, GiB (needed without "
                                                            "--profile)")
    plan.add_argument("--pcie-gbs", type=float, help="host <-> GPU bandwidth of each GPU, one direction, GB/s "
                                                     "(needed without --profile)")
    plan.add_argument("--link-gbs", type=float, help="GPU <-> GPU bandwidth for activations, GB/s (default: "
                                                      "the profile's, else --pcie-gbs: no NVLink)")
    plan.add_argument("--hbm-tbs", type=float, help="each GPU's memory bandwidth, TB/s (roofline costs: needed "
                                                    "without --profile, and with --tflops)")
    plan.add_argument("--tflops", type=float, help="each GPU's dense matmul rate in the dtype, TFLOP/s (roofline "
                                                   "costs: needed without --profile, and with --hbm-tbs)")
    plan.add_argument("--host-memory-gib", type=float, default=None,
                      help="host memory for offloaded KV, the whole server (default: the profile's, else 256)")
    plan.add_argument("--dtype", choices=DTYPE_NAMES,
                      help="the weights' and activations' dtype, and the KV cache's with --kv-cache-dtype auto "
                           "(default: the profile's, else bfloat16)")
    plan.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES,
                      help=KV_CACHE_DTYPE_HELP + " (default: the profile's, else auto)")
    plan.add_argument("--chunk-tokens", type=int, help="tokens per KV chunk (default: the profile's, else 16)")
    plan.add_argument("--seed", type=int, default=0, help="seed of the synthetic workload")
    plan.add_argument("--json", action="store_true", help="print one JSON object, a key per layout")


class PlanInputError(ValueError):
    """A flag or file the plan cannot use: one line, exit status 2."""


def model_config_for_plan(path: Path):
    """A model's config from a folder, its config.json, or a .gguf file; no weights needed."""
    from pipemax.models import (
        UnsupportedModelError,
        WeightLoadError,
        load_model_config,
        model_config_at,
        model_config_from_hf,
    )

    path = Path(path)
    if not path.exists():
        raise PlanInputError(f"--model: {path} does not exist")
    try:
        if path.is_file() and path.suffix == ".json":
            from transformers import AutoConfig

            return model_config_from_hf(AutoConfig.from_pretrained(str(path)))
        if path.is_dir() and (path / "config.json").exists():
            return load_model_config(path)
        return model_config_at(path)
    except (UnsupportedModelError, WeightLoadError, OSError, ValueError) as error:
        raise PlanInputError(f"--model: {error}") from None


def load_workload(args, model_path: Path, max_model_len: int):
    """The workload's requests as the engine would run them (see server_plan.fit_to_model), and
    notes on what was counted or changed."""
    from .server_plan import Workload, fit_to_model
    from .workloads import SYNTHETIC, WorkloadError, lengths_from_jsonl, synthetic_lengths

    notes = []
    try:
        if args.workload in SYNTHETIC:
            if args.num_prompts < 1:
                raise PlanInputError(f"--num-prompts must be at least 1, got {args.num_prompts}")
            shapes = synthetic_lengths(args.workload, args.num_prompts, getattr(args, "seed", 0))
        else:
            if not args.workload.endswith(".jsonl") and not Path(args.workload).exists():
                raise PlanInputError(f"--workload: use {', '.join(SYNTHETIC)} or a .jsonl file, got {args.workload!r}")
            tokenizer = _tokenizer_of(model_path)
            shapes, defaulted = lengths_from_jsonl(Path(args.workload), tokenizer)
            if tokenizer is None:
                notes.append("prompts counted at 4 characters a token (the model folder has no tokenizer)")
            if defaulted:
                notes.append(f"{defaulted} requests name no max_tokens: counted as 256 output tokens")
    except WorkloadError as error:
        raise PlanInputError(f"--workload: {error}") from None
    workload, dropped, clipped = fit_to_model(Workload(tuple(shapes)), max_model_len)
    if dropped:
        notes.append(f"{dropped} prompts of {max_model_len:,} tokens or more left out (the model's limit)")
    if clipped:
        notes.append(f"{clipped} outputs stopped at the model's {max_model_len:,} tokens")
    if not workload.requests:
        raise PlanInputError(f"--workload: every prompt is at least the model's {max_model_len:,} tokens")
    return workload, notes


def _tokenizer_of(model_path: Path):
    folder = model_path if model_path.is_dir() else model_path.parent
    if not any((folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError):
        return None


def load_plan_profile(args, config):
    """(the autotune profile --profile names, or None; the dtype the plan uses; its KV cache
    dtype). The profile is refused, by serve-offline's check, unless it was made for this model,
    dtype and KV cache dtype: its costs are a layer of that shape reading KV of that dtype, its
    chunk size was chosen by copies of such chunks. Its GPU and GPU count may differ (a server not
    at hand)."""
    from .server_profile import ProfileError, kv_cache_dtype_of, load_profile, profile_key

    if args.profile is None:
        return None, args.dtype or "bfloat16", args.kv_cache_dtype or "auto"
    try:
        profile = load_profile(args.profile)
        dtype = args.dtype or profile.key.get("dtype")
        if dtype not in DTYPE_NAMES:
            raise PlanInputError(f"--profile: {args.profile} was made for the dtype {dtype!r}, which plan does not "
                                 f"model: give --dtype ({', '.join(DTYPE_NAMES)})")
        kv_cache_dtype = args.kv_cache_dtype or kv_cache_dtype_of(profile.key)
        load_profile(args.profile, profile_key(profile.key.get("gpu"), profile.key.get("gpus"), config, dtype,
                                               kv_cache_dtype))
    except ProfileError as error:
        raise PlanInputError(f"--profile: {error}") from None
    return profile, dtype, kv_cache_dtype


def server_facts(args, config, dtype, profile=None, kv_cache_dtype="auto"):
    """The server's facts: the profile's measurements, each overridden by a flag given (a
    roofline's attention cost reads KV in kv_cache_dtype's storage)."""
    from .server_plan import ServerFacts, roofline_costs

    measured = profile.measurements if profile is not None else {}
    for value, flag in ((args.gpu_memory_gib, "--gpu-memory-gib"), (args.pcie_gbs, "--pcie-gbs"),
                        (args.link_gbs, "--link-gbs"), (args.hbm_tbs, "--hbm-tbs"), (args.tflops, "--tflops"),
                        (args.host_memory_gib, "--host-memory-gib")):
        if value is not None and not value > 0:
            raise PlanInputError(f"{flag} must be positive, got {value:g}")
    if args.chunk_tokens is not None and (args.chunk_tokens & (args.chunk_tokens - 1) or not 8 <= args.chunk_tokens <= 256):
        raise PlanInputError(f"--chunk-tokens must be a power of two from 8 to 256, got {args.chunk_tokens}")
    gpus = args.gpus if args.gpus is not None else (profile.key.get("gpus") if profile is not None else 1)
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
        raise PlanInputError(f"--gpus must be at least 1, got {gpus}")
    # A roofline of the peak figures, unless the profile measured the step costs (and no peak is given).
    roofline = args.hbm_tbs is not None or args.tflops is not None or "costs" not in measured
    if profile is not None and roofline and "costs" in measured and (args.hbm_tbs is None or args.tflops is None):
        raise PlanInputError("--hbm-tbs and --tflops go together: their roofline replaces the profile's measured costs")
    needed = [("--gpu-memory-gib", args.gpu_memory_gib, "gpu_memory_bytes"),
              ("--pcie-gbs", args.pcie_gbs, "pcie_bytes_per_s")]
    if roofline:
        needed += [("--hbm-tbs", args.hbm_tbs, None), ("--tflops", args.tflops, None)]
    missing = [flag for flag, value, name in needed if value is None and measured.get(name) is None]
    if missing:  # all of them in one line, not one run each
        names = missing[0] if len(missing) == 1 else f"{', '.join(missing[:-1])} and {missing[-1]}"
        raise PlanInputError(f"{names} {'is' if len(missing) == 1 else 'are'} needed "
                             + ("(or --profile from `pipemax autotune`)" if profile is None
                                else f"(the profile {args.profile} has no such measurement)"))

    def pick(flag_value, scale, name, default=None):
        """The flag's value, else the profile's measurement, else the default."""
        if flag_value is not None:
            return flag_value * scale
        return _measured(measured, name, args.profile) if measured.get(name) is not None else default

    memory = pick(args.gpu_memory_gib, 2**30, "gpu_memory_bytes")
    pcie = pick(args.pcie_gbs, 1e9, "pcie_bytes_per_s")
    link = pick(args.link_gbs, 1e9, "link_bytes_per_s", default=pcie)  # (no NVLink: activations cross PCIe)
    if roofline:
        costs = roofline_costs(config, dtype, args.hbm_tbs * 1e12, args.tflops * 1e12, kv_cache_dtype)
    else:
        costs = _measured_costs(measured["costs"], args.profile)
    host = pick(args.host_memory_gib, 2**30, "host_kv_bytes", default=256 * 2**30)
    chunk_tokens = args.chunk_tokens or measured.get("chunk_tokens") or 16
    if not isinstance(chunk_tokens, int) or chunk_tokens & (chunk_tokens - 1) or not 8 <= chunk_tokens <= 256:
        raise PlanInputError(f"--profile: {args.profile}'s chunk_tokens must be a power of two from 8 to 256, got "
                             f"{chunk_tokens!r}: run `pipemax autotune` again")
    return ServerFacts(gpus, int(memory), pcie, link, int(host), costs, chunk_tokens)


def _measured(measured: dict, name: str, path) -> float:
    """A measurement of the profile, which must be a positive number."""
    value = measured[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise PlanInputError(f"--profile: {path}'s measurement {name} must be a positive number, got {value!r}: "
                             "run `pipemax autotune` again")
    return value


def _measured_costs(record, path):
    """The profile's step costs: numbers of at least zero, and a layer that costs something (a
    step of no time would predict no throughput, or divide by it)."""
    from .server_plan import ComputeCosts

    try:
        costs = ComputeCosts.from_dict(record)
        values = [getattr(part, name) for part in (costs.layer, costs.head) for name in ("alpha", "beta", "delta")]
        usable = (all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                      for v in values) and costs.layer.alpha + costs.layer.delta > 0)
    except (KeyError, TypeError, AttributeError):
        usable = False
    if not usable:
        raise PlanInputError(f"--profile: {path} has no usable step costs (a layer must cost some time, got "
                             f"{record!r}): run `pipemax autotune` again")
    return costs


def compare_layouts(facts, config, dtype, workload, kv_cache_dtype="auto") -> dict:
    """{layout: Plan (with its simulation) or PlanError}, in LAYOUTS order. pp is simulated first:
    pp_offload's staging ring is kept only where it beats it (server_plan.simulate_plan)."""
    from .server_plan import PlanError, choose_plan, simulate_plan

    results = {}
    for layout in ("pp", "pp_offload", "dp"):
        try:
            plan = choose_plan(facts, config, dtype, workload, layout, kv_cache_dtype)
            plain = results.get("pp") if layout == "pp_offload" else None
            simulate_plan(plan, facts, config, dtype, workload, None if isinstance(plain, PlanError) else plain)
        except PlanError as error:
            results[layout] = error
            continue
        results[layout] = plan
    return {layout: results[layout] for layout in LAYOUTS}


def layouts_json(results: dict) -> dict:
    out = {}
    for layout, result in results.items():
        if isinstance(result, Exception):
            out[layout] = {"fits": False, "error": str(result), "generated_tokens_per_s": None,
                           "total_tokens_per_s": None, "stage_utilisation": None, "pcie_gbs": None}
            continue
        simulated = result.simulation
        out[layout] = {"fits": True, "kv_storage": result.kv_storage, **{key: simulated[key] for key in (
            "generated_tokens_per_s", "steady_generated_tokens_per_s", "total_tokens_per_s", "stage_utilisation",
            "pcie_gbs", "prefetch_gbs", "exposed_copy_fraction", "host_resident_requests", "preemptions",
            "mean_sequences_per_step", "requests")},
            "bubble_fraction": 1 - sum(simulated["stage_utilisation"]) / len(simulated["stage_utilisation"]),
            "steady_state_estimate_tokens_per_s": result.estimated_generated_tokens_per_s,
            "batch_per_micro_batch": result.batch_per_micro_batch,
            "staging_chunks": result.staging_chunks, "staging_gb": result.staging_bytes / 1e9,
            "settings": result.engine_options()}
    return out


def runnable(results: dict) -> dict:
    """The layouts that fit and predict some throughput: only these may be named best."""
    return {layout: result for layout, result in results.items()
            if not isinstance(result, Exception) and result.simulation["generated_tokens_per_s"] > 0}


def why_nothing_runs(results: dict) -> str:
    """One line: each layout's reason."""
    reasons = [str(result) if isinstance(result, Exception) else f"{layout}: predicts no generated tokens"
               for layout, result in results.items()]
    return "no layout runs this workload on this server: " + "; ".join(reasons)


def _rate(tokens_per_s: float, width: int) -> str:
    """Tokens/s, whole above 10 (a slow server's 0.4 is not 0)."""
    return f"{tokens_per_s:>{width},.0f}" if tokens_per_s >= 10 or tokens_per_s == 0 else f"{tokens_per_s:>{width}.2g}"


def format_table(results: dict, facts) -> list[str]:
    """A row per layout: the whole run's generated tokens/s and the steady state's (while requests
    wait to start), one slot of the staging ring (GB, each GPU) and the share of the run the busiest
    stage's computes waited on copies; then the best layout, where one predicts any throughput."""
    lines = [f"{'layout':<11} {'stages x replicas':>17} {'M':>3} {'batch':>6} {'gen tok/s':>10} {'steady':>8} "
             f"{'total tok/s':>12} {'stage busy':>10} {'PCIe GB/s':>9} {'slot GB':>7} {'exposed':>7} "
             f"{'host-resident':>13}"]
    for layout, result in results.items():
        if isinstance(result, Exception):
            lines.append(f"{layout:<11} does not fit: {str(result).removeprefix(layout + ': ')}")
            continue
        s = result.simulation
        busy = s["stage_utilisation"]
        lines.append(f"{layout:<11} {f'{result.stages} x {result.replicas}':>17} {result.micro_batches:>3} "
                     f"{result.max_num_seqs:>6} {_rate(s['generated_tokens_per_s'], 10)} "
                     f"{_rate(s['steady_generated_tokens_per_s'], 8)} {_rate(s['total_tokens_per_s'], 12)} "
                     f"{sum(busy) / len(busy):>10.0%} {s['pcie_gbs']:>9.1f} {result.staging_bytes / 1e9:>7.2f} "
                     f"{s['exposed_copy_fraction']:>7.1%} {s['host_resident_requests']:>13,}")
    from .server_plan import best_layout

    candidates = runnable(results)
    if candidates:
        best = best_layout(candidates)
        lines.append(f"best: {best}: {candidates[best].describe(facts)}")
    return lines


def run_plan(args: argparse.Namespace) -> int:
    """Prints the table (or JSON); exit status 1, with one line saying why, when no layout runs."""
    import torch

    from .server_plan import kv_storage

    config = model_config_for_plan(Path(args.model))
    profile, dtype_name, kv_cache_dtype = load_plan_profile(args, config)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype_name]
    facts = server_facts(args, config, dtype, profile, kv_cache_dtype)
    workload, notes = load_workload(args, Path(args.model), config.max_model_len)
    results = compare_layouts(facts, config, dtype, workload, kv_cache_dtype)
    if args.json:
        print(json.dumps(layouts_json(results), indent=1))
    else:
        print(f"server: {facts.gpus} GPUs of {facts.gpu_memory_bytes / 2**30:.0f} GiB, PCIe "
              f"{facts.pcie_bytes_per_s / 1e9:.0f} GB/s, GPU links {facts.link_bytes_per_s / 1e9:.0f} GB/s, "
              f"{facts.host_kv_bytes / 2**30:.0f} GiB host KV; model {config.architecture}, {config.num_layers} "
              f"layers, hidden {config.hidden_size}, {dtype_name}, {kv_storage(dtype, kv_cache_dtype)} KV")
        print(f"workload: {len(workload.requests):,} requests, mean {workload.mean_input:.0f} tokens in, "
              f"{workload.mean_output:.0f} out" + "".join(f"; {note}" for note in notes))
        print("\n".join(format_table(results, facts)))
    if not runnable(results):
        print(f"pipemax: {why_nothing_runs(results)}", file=sys.stderr)
        return 1
    return 0
