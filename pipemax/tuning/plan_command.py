"""`pipemax plan`: what a server would do with a model and a workload, for servers not at hand.

    pipemax plan --gpus 8 --gpu-memory-gib 32 --pcie-gbs 55 --hbm-tbs 1.8 --tflops 200 \\
        --model CONFIG_OR_FOLDER --workload sharegpt|longbench|decode-heavy|FILE.jsonl [--json]

It compares three layouts on the same server: a pipeline stage per GPU with offload=auto
(pp_offload: each stage's staging ring, sized as the engine will) and without (pp, with the same
per-step limits), and the whole model on each GPU, a replica per GPU (dp). For each it chooses the
settings (server_plan.choose_plan), then replays the real scheduler on the workload and times it
with the server's model (server_plan.simulate_plan); a ring that the simulation finds slower than
pp is dropped. The table gives the whole run's generated tokens/s and the steady state's (while
requests wait to start, as in a long job), a slot of the ring in GB and the share of the run a
stage waited on its copies. Compute comes from a roofline of the given peaks, or from the step costs an
autotune profile measured (--profile); every flag given overrides the profile.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LAYOUTS = ("pp_offload", "pp", "dp")
DTYPE_NAMES = ("bfloat16", "float16", "float32")


def add_plan_parser(commands) -> None:
    plan = commands.add_parser(
        "plan", help="predict a server's throughput for a model and workload (pipeline with and without offload, "
                     "data parallel), without the server",
        description="Simulates the engine's own scheduler on a modelled server. Compute comes from the peak "
                    "figures (--hbm-tbs, --tflops) or from an autotune profile (--profile).")
    plan.add_argument("--model", required=True, help="a model folder, its config.json, or a .gguf file (no weights "
                                                     "are read)")
    plan.add_argument("--workload", default="sharegpt",
                      help="sharegpt, longbench, decode-heavy (synthetic lengths) or a .jsonl file of requests "
                           "(default sharegpt)")
    plan.add_argument("--num-prompts", type=int, default=2000, help="requests of a synthetic workload (default 2000)")
    plan.add_argument("--profile", type=Path, help="an autotune profile: its measured costs, bandwidths and memory")
    plan.add_argument("--gpus", type=int, help="GPUs in the server (default: the profile's, else 1)")
    plan.add_argument("--gpu-memory-gib", type=float, help="memory PipeMax may use on each GPU")
    plan.add_argument("--pcie-gbs", type=float, help="host <-> GPU bandwidth of each GPU, one direction, GB/s")
    plan.add_argument("--link-gbs", type=float, help="GPU <-> GPU bandwidth for activations, GB/s (default: "
                                                      "--pcie-gbs: no NVLink)")
    plan.add_argument("--hbm-tbs", type=float, help="each GPU's memory bandwidth, TB/s (roofline costs)")
    plan.add_argument("--tflops", type=float, help="each GPU's dense matmul rate in the dtype, TFLOP/s "
                                                   "(roofline costs)")
    plan.add_argument("--host-memory-gib", type=float, default=None,
                      help="host memory for offloaded KV, the whole server (default: the profile's, else 256)")
    plan.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES)
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


def server_facts(args, config, dtype):
    """The server's facts: the profile's measurements, each overridden by a flag given."""
    from .server_plan import ComputeCosts, ServerFacts, roofline_costs
    from .server_profile import ProfileError, load_profile

    measured = {}
    gpus = args.gpus
    if args.profile is not None:
        try:
            profile = load_profile(args.profile)
        except ProfileError as error:
            raise PlanInputError(f"--profile: {error}") from None
        measured = profile.measurements
        if args.gpus is None:
            gpus = profile.key.get("gpus")
    if gpus is None:
        gpus = 1

    def pick(flag_value, scale, name, flag):
        if flag_value is not None:
            if flag_value <= 0:
                raise PlanInputError(f"{flag} must be positive, got {flag_value:g}")
            return flag_value * scale
        if measured.get(name) is not None:
            return measured[name]
        raise PlanInputError(f"{flag} is needed (or --profile from `pipemax autotune`)")

    for value, flag in ((args.link_gbs, "--link-gbs"), (args.host_memory_gib, "--host-memory-gib")):
        if value is not None and not value > 0:
            raise PlanInputError(f"{flag} must be positive, got {value:g}")
    if args.chunk_tokens is not None and (args.chunk_tokens & (args.chunk_tokens - 1) or not 8 <= args.chunk_tokens <= 256):
        raise PlanInputError(f"--chunk-tokens must be a power of two from 8 to 256, got {args.chunk_tokens}")
    memory = pick(args.gpu_memory_gib, 2**30, "gpu_memory_bytes", "--gpu-memory-gib")
    pcie = pick(args.pcie_gbs, 1e9, "pcie_bytes_per_s", "--pcie-gbs")
    link = args.link_gbs * 1e9 if args.link_gbs is not None else measured.get("link_bytes_per_s") or pcie
    if args.hbm_tbs is not None or args.tflops is not None or "costs" not in measured:
        hbm = pick(args.hbm_tbs, 1e12, "hbm_bytes_per_s", "--hbm-tbs")
        flops = pick(args.tflops, 1e12, "flops_per_s", "--tflops")
        costs = roofline_costs(config, dtype, hbm, flops)
    else:
        try:
            costs = ComputeCosts.from_dict(measured["costs"])
        except (KeyError, TypeError):
            raise PlanInputError(f"--profile: {args.profile} has no step costs: run `pipemax autotune` again") from None
    host = (args.host_memory_gib * 2**30 if args.host_memory_gib is not None
            else measured.get("host_kv_bytes") or 256 * 2**30)
    chunk_tokens = args.chunk_tokens or measured.get("chunk_tokens") or 16
    if not isinstance(gpus, int) or gpus < 1:
        raise PlanInputError(f"--gpus must be at least 1, got {gpus}")
    return ServerFacts(gpus, int(memory), pcie, link, int(host), costs, int(chunk_tokens))


def compare_layouts(facts, config, dtype, workload) -> dict:
    """{layout: Plan (with its simulation) or PlanError}, in LAYOUTS order. pp is simulated first:
    pp_offload's staging ring is kept only where it beats it (server_plan.simulate_plan)."""
    from .server_plan import PlanError, choose_plan, simulate_plan

    results = {}
    for layout in ("pp", "pp_offload", "dp"):
        try:
            plan = choose_plan(facts, config, dtype, workload, layout)
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
        out[layout] = {"fits": True, **{key: simulated[key] for key in (
            "generated_tokens_per_s", "steady_generated_tokens_per_s", "total_tokens_per_s", "stage_utilisation",
            "pcie_gbs", "prefetch_gbs", "exposed_copy_fraction", "host_resident_requests", "preemptions",
            "mean_sequences_per_step", "requests")},
            "bubble_fraction": 1 - sum(simulated["stage_utilisation"]) / len(simulated["stage_utilisation"]),
            "steady_state_estimate_tokens_per_s": result.estimated_generated_tokens_per_s,
            "batch_per_micro_batch": result.batch_per_micro_batch,
            "staging_chunks": result.staging_chunks, "staging_gb": result.staging_bytes / 1e9,
            "settings": result.engine_options()}
    return out


def format_table(results: dict, facts) -> list[str]:
    """A row per layout: the whole run's generated tokens/s and the steady state's (while requests
    wait to start), one slot of the staging ring (GB, each GPU) and the share of the run the busiest
    stage's computes waited on copies."""
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
                     f"{result.max_num_seqs:>6} {s['generated_tokens_per_s']:>10,.0f} "
                     f"{s['steady_generated_tokens_per_s']:>8,.0f} {s['total_tokens_per_s']:>12,.0f} "
                     f"{sum(busy) / len(busy):>10.0%} {s['pcie_gbs']:>9.1f} {result.staging_bytes / 1e9:>7.2f} "
                     f"{s['exposed_copy_fraction']:>7.1%} {s['host_resident_requests']:>13,}")
    from .server_plan import best_layout

    fitting = {k: v for k, v in results.items() if not isinstance(v, Exception)}
    if fitting:
        best = best_layout(fitting)
        lines.append(f"best: {best}: {fitting[best].describe(facts)}")
    return lines


def run_plan(args: argparse.Namespace) -> int:
    import torch

    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    config = model_config_for_plan(Path(args.model))
    facts = server_facts(args, config, dtype)
    workload, notes = load_workload(args, Path(args.model), config.max_model_len)
    results = compare_layouts(facts, config, dtype, workload)
    if args.json:
        print(json.dumps(layouts_json(results), indent=1))
        return 0
    print(f"server: {facts.gpus} GPUs of {facts.gpu_memory_bytes / 2**30:.0f} GiB, PCIe {facts.pcie_bytes_per_s / 1e9:.0f} "
          f"GB/s, GPU links {facts.link_bytes_per_s / 1e9:.0f} GB/s, {facts.host_kv_bytes / 2**30:.0f} GiB host KV; "
          f"model {config.architecture}, {config.num_layers} layers, hidden {config.hidden_size}, {args.dtype}")
    print(f"workload: {len(workload.requests):,} requests, mean {workload.mean_input:.0f} tokens in, "
          f"{workload.mean_output:.0f} out" + "".join(f"; {note}" for note in notes))
    print("\n".join(format_table(results, facts)))
    return 0
