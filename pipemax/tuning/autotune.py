"""`pipemax autotune`: probe the server, measure it, choose the engine's settings, save a profile.

    pipemax autotune [--model M] [--gpus N] [--kv-cache-dtype auto|fp8|fp8_e4m3|fp8_e5m2] [-o profile.json]

1. Probe (tuning/hardware.py): GPUs, their memory and PCIe links, NVLink, the driver, host memory
   and cores, through NVML. Without a driver the probe says so and the CPU is measured instead.
2. Measure (tuning/microbench.py), with a progress bar: KV copies by chunk size (cudaMemcpy and
   the Triton kernel, both directions), both directions at once, a copy beside matmuls, the
   model's step time over a grid of batch tokens x context (two depths, to split a layer's cost
   from the LM head's), and activations between two GPUs.
3. Choose (tuning/server_plan.py): the chunk size (the smallest near the best copy rate), then per
   layout (a stage per GPU with offload and without; a replica per GPU where the model fits one)
   the micro-batches, batch, KV budgets and prefill tokens per step; the real scheduler is
   simulated on the planned workload and the fastest layout wins.
   Every KV byte (copies, pools, attention's step cost) is in the KV cache's dtype
   (--kv-cache-dtype: fp8 measures fp8 chunks and the engine's fp8 attention).
4. Save the profile, keyed by the GPU model, the GPU count, the model's shape, its dtype and the
   KV cache's storage dtype; `pipemax serve-offline` loads it by that key. Not when a measurement
   stayed noisy (its repeats disagreed by more than 2x, taken three times: another job was using
   the machine) or the plan predicts no throughput: that is one line naming it, unless --force.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from pipemax.core.kv_dtype import KV_CACHE_DTYPES, is_fp8, kv_storage_name

from .plan_command import KV_CACHE_DTYPE_HELP

FP8_SM = (8, 9)  # fp8 KV needs Ada (sm_89) or later: its conversions are native from there on


def add_autotune_parser(commands) -> None:
    tune = commands.add_parser(
        "autotune", help="measure this server for a model and save the settings serve-offline runs with",
        description="Probes the GPUs (NVML), measures copies, the model's step time and the links, chooses "
                    "chunk size, micro-batches, KV and prefetch budgets, batch and stage split, and saves them as "
                    "a profile that `pipemax serve-offline` loads.")
    tune.add_argument("--model", help="local HF model folder, its config.json, or a .gguf file (the shape is what "
                                      "counts: weights are random); default: the bundled SmolLM2-135M-Instruct")
    tune.add_argument("--gpus", type=int, help="GPUs the job will use (default: every visible GPU; 1 on the CPU)")
    tune.add_argument("-o", "--output", type=Path, help="where to write the profile (default: the profiles folder, "
                                                        "where serve-offline looks)")
    tune.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                      help="weights' dtype, and the KV cache's with --kv-cache-dtype auto (auto: bfloat16 on CUDA, "
                           "float32 on CPU)")
    tune.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                      help=KV_CACHE_DTYPE_HELP + "; measured so, and the profile is made for it (serve-offline "
                                                 "finds it with the same --kv-cache-dtype). Default auto")
    tune.add_argument("--gpu-memory-gib", type=float, help="memory PipeMax may use on each GPU (default: 90%% of it)")
    tune.add_argument("--host-memory-gib", type=float,
                      help="host memory for offloaded KV, the whole server (default: a quarter of what is available)")
    tune.add_argument("--workload", default="sharegpt",
                      help="the jobs' shape to plan for: sharegpt, longbench or a .jsonl file (default sharegpt)")
    tune.add_argument("--num-prompts", type=int, default=1000, help="requests simulated per layout (default 1000)")
    tune.add_argument("--quick", action="store_true", help="a smaller measurement grid (seconds, rougher costs)")
    tune.add_argument("--no-progress", action="store_true", help="no progress bar")
    tune.add_argument("--force", action="store_true",
                      help="save the profile even when a measurement was noisy (a busy machine) or the plan "
                           "predicts no throughput; a warning says which")


class AutotuneError(ValueError):
    """Printed as one line, exit status 2."""


def grid(device_type: str, quick: bool, max_len: int) -> tuple[list[int], list[tuple[int, int]], int]:
    """(chunk sizes, (batch, prompt) pairs of the step grid, bytes per copy measurement)."""
    if device_type != "cuda" or quick:
        chunks, batches, prompts, copy_bytes, most = [8, 16, 64], [1, 4], [16, 64], 16 * 2**20, 256
    else:
        chunks, batches, prompts, copy_bytes, most = [8, 16, 32, 64, 128, 256], [1, 8, 64, 256], [32, 512, 2048], \
            256 * 2**20, 131072
    prompts = sorted({min(p, max_len - 8) for p in prompts})
    pairs = [(b, p) for b in batches for p in prompts if b * p <= most]
    return chunks, pairs, copy_bytes


def check_arguments(args: argparse.Namespace) -> None:
    """What the arguments alone rule out, before anything is probed or measured."""
    for option, value in (("--gpu-memory-gib", args.gpu_memory_gib), ("--host-memory-gib", args.host_memory_gib)):
        if value is not None and not value > 0:  # (NaN included)
            raise AutotuneError(f"{option} {value:g}: give a size in GiB above 0")


def run_autotune(args: argparse.Namespace) -> int:
    check_arguments(args)
    import torch

    from pipemax.engine.config import DTYPES, available_host_memory_gib
    from pipemax.engine.cpu_threads import use_cpu_threads
    from pipemax.models.default_model import default_model_path
    from pipemax.parallel.partition import PartitionError, partition_layers
    from pipemax.tuning import microbench
    from pipemax.worker.kv_pool import KV_TORCH_DTYPES, KVPoolSpec
    from pipemax.worker.memory_budget import kv_budget_bytes

    from .hardware import probe
    from .plan_command import PlanInputError, load_workload, model_config_for_plan
    from .server_plan import PlanError, ServerFacts, best_layout, choose_plan, simulate_plan
    from .server_profile import ServerProfile, default_profile_path, profile_key, save_profile, this_device_name

    hardware = probe()
    for line in hardware.describe():
        print(line)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        threads = use_cpu_threads()  # what serve-offline's engine runs with: measured alike
        print("no CUDA GPU: measuring the CPU (host-memory copies, CPU steps); the profile describes this machine's "
              f"CPU at {threads} torch thread(s)")
    dtype = torch.float32 if args.dtype == "auto" and device.type == "cpu" else DTYPES.get(args.dtype, torch.bfloat16)
    dtype_name = str(dtype).removeprefix("torch.")
    kv_storage = kv_storage_name(args.kv_cache_dtype, dtype_name)
    if is_fp8(kv_storage) and device.type == "cuda" and torch.cuda.get_device_capability(device) < FP8_SM:
        major, minor = torch.cuda.get_device_capability(device)
        raise AutotuneError(f"--kv-cache-dtype {args.kv_cache_dtype}: an fp8 KV cache needs an sm_89+ GPU (Ada, "
                            f"Hopper, Blackwell); {this_device_name(device)} is sm_{major}{minor}: use "
                            "--kv-cache-dtype auto")
    kv_dtype = KV_TORCH_DTYPES[kv_storage]  # what the measured pools hold
    model_path = Path(args.model) if args.model else default_model_path()
    try:
        config = model_config_for_plan(model_path)
        workload, notes = load_workload(args, model_path, config.max_model_len)
    except PlanInputError as error:
        raise AutotuneError(str(error)) from None
    visible = torch.cuda.device_count() if device.type == "cuda" else 1
    gpus = args.gpus if args.gpus is not None else visible
    if gpus < 1 or gpus > visible:
        raise AutotuneError(f"--gpus {gpus}: this machine has {visible} {'GPU' if device.type == 'cuda' else 'CPU'} "
                            f"device(s) to measure")
    try:
        ranges = partition_layers(config, gpus)
    except PartitionError as error:
        raise AutotuneError(f"--gpus: {error}") from None
    stage_layers = max(end - start for start, end in ranges)
    if args.gpu_memory_gib is not None:
        memory = int(args.gpu_memory_gib * 2**30)
    elif device.type == "cuda":
        memory = int(0.9 * torch.cuda.get_device_properties(device).total_memory)
    else:  # the engine's CPU default: a 1 GiB KV pool beside the weights
        memory = 2**30 - kv_budget_bytes(0, config, [(0, config.num_layers)], dtype, 4096, 1024, False)
    widest = max(ranges, key=lambda r: r[1] - r[0])
    if kv_budget_bytes(memory, config, [widest], dtype, 4096, 1024, device.type == "cuda") <= 0:
        remedy = "give more --gpu-memory-gib or use more --gpus" if args.gpu_memory_gib is not None else \
            "use more --gpus"
        raise AutotuneError(f"{config.num_layers} layers over {gpus} GPU(s) of {memory / 2**30:.3g} GiB leave no room "
                            f"for a KV cache: {remedy}")
    host_bytes = int((args.host_memory_gib or (available_host_memory_gib() or 16) / 4) * 2**30)

    chunks, pairs, copy_bytes = grid(device.type, args.quick, config.max_model_len)
    depths = sorted({stage_layers, 1 if stage_layers > 1 else 2})
    total = len(chunks) * 4 + 2 + len(pairs) * len(depths) + 1
    spec_of = lambda tokens: KVPoolSpec(stage_layers, config.num_kv_heads, config.head_dim, tokens, dtype,  # noqa
                                        kv_dtype=kv_dtype)
    noise = microbench.NoiseCheck()
    with _progress(total, args.no_progress) as tick:
        rates = microbench.copy_rates(spec_of, chunks, device, copy_bytes, progress=tick, noise=noise)
        chunk_tokens, prefetch_rate = microbench.best_chunk_tokens(rates)
        # The plan counts on what each GPU's prefetch gets while every stage copies at once.
        everyone = ([torch.device("cuda", index) for index in range(min(gpus, torch.cuda.device_count()))]
                    if device.type == "cuda" else [device])
        concurrent = (microbench.concurrent_prefetch_rate(spec_of(chunk_tokens), everyone, copy_bytes, noise=noise)
                      if len(everyone) > 1 else None)
        if concurrent is not None:
            prefetch_rate = min(prefetch_rate, concurrent)
        both = microbench.both_directions(spec_of(chunk_tokens), device, copy_bytes, noise=noise)
        tick()
        on_gpu = device.type == "cuda"
        beside = microbench.copy_beside_matmul(spec_of(chunk_tokens), device, dtype, copy_bytes,
                                               4096 if on_gpu else 256, 40 if on_gpu else 4, noise)
        tick()
        fits = {layers: microbench.step_costs(config, layers, device, dtype, pairs, chunk_tokens, progress=tick,
                                              noise=noise, kv_cache_dtype=args.kv_cache_dtype)
                for layers in depths}
        link = microbench.activation_link(config.hidden_size, dtype, noise=noise) if gpus > 1 else None
        tick()
    costs = microbench.split_layer_costs({layers: fit[0] for layers, fit in fits.items()})
    facts = ServerFacts(gpus, memory, prefetch_rate, link or prefetch_rate, host_bytes, costs, chunk_tokens,
                        this_device_name(device))
    layouts = ("pp_offload", "pp", "dp") if gpus > 1 else ("pp_offload", "pp")
    plans, refused = {}, []
    for layout in layouts:
        try:
            candidate = choose_plan(facts, config, dtype, workload, layout, args.kv_cache_dtype)
            simulate_plan(candidate, facts, config, dtype, workload)
        except PlanError as error:
            refused.append(str(error))
            continue
        plans[layout] = candidate
    if not plans:
        raise AutotuneError("no layout fits: " + "; ".join(refused))
    rate = {name: plan.simulation["generated_tokens_per_s"] for name, plan in plans.items()}
    best = best_layout(plans)
    plan = plans[best]
    doubts = _doubts(noise, rate[best], best, costs)
    memcpy = max(r["gbs"] for r in rates if r["method"] == "memcpy" and r["direction"] == "h2d"
                 and r["chunk_tokens"] == chunk_tokens)
    kernel, per_chunk = (("the Triton kernel", "cudaMemcpy") if device.type == "cuda" else
                         ("the engine's CPU copy", "a copy"))
    print(f"copies: prefetch {prefetch_rate / 1e9:.1f} GB/s with {kernel} in {chunk_tokens}-token chunks "
          f"({per_chunk} per chunk {memcpy:.1f} GB/s); both directions at once {both['total_gbs']:.1f} GB/s; beside "
          f"matmuls {beside['copy_gbs']:.1f} GB/s, the matmuls {beside['matmul_slowdown']:.2f}x as long"
          + (f"; GPU 0 -> 1 {link / 1e9:.1f} GB/s" if link else ""))
    print(f"step costs per layer: {costs.layer.alpha * 1e6:.2f} us a token, {costs.layer.beta * 1e9:.2f} ns a context "
          f"token ({kv_storage} KV), {costs.layer.delta * 1e6:.0f} us a step; LM head and step overhead "
          f"{costs.head.delta * 1e3:.2f} ms")
    print(f"workload planned for: {len(workload.requests):,} requests, mean {workload.mean_input:.0f} in, "
          f"{workload.mean_output:.0f} out" + "".join(f"; {note}" for note in notes))
    for name, candidate in plans.items():
        print(f"  {name:<10} {_tokens_per_s(rate[name]):>10} generated tokens/s predicted"
              + ("  <- chosen" if name == best else ""))
    print(f"plan: {plan.describe(facts)}")
    if doubts and not args.force:  # (what was measured is printed above: the figures show the noise)
        raise AutotuneError(f"not saving the profile: {doubts}; run autotune again when the machine is idle, or "
                            "pass --force to save it anyway")
    if doubts:
        print(f"warning: saved with --force although {doubts}")
    measurements = {
        "device": device.type, "gpu_memory_bytes": memory, "pcie_bytes_per_s": prefetch_rate,
        "concurrent_prefetch_bytes_per_s": concurrent, "concurrent_prefetch_gpus": len(everyone),
        "link_bytes_per_s": link, "host_kv_bytes": host_bytes, "chunk_tokens": chunk_tokens, "costs": costs.to_dict(),
        "copy_rates": rates, "both_directions": both, "copy_beside_matmul": beside,
        "step_fits": {str(layers): {"coefficients": list(fit[0]), **fit[1]} for layers, fit in fits.items()},
        "noisy": noise.noisy,  # what stayed noisy (saved with --force): its repeats' spread
    }
    key = profile_key(this_device_name(device), gpus, config, dtype_name, args.kv_cache_dtype)
    profile = ServerProfile(key, hardware.to_dict(), measurements, {
        **plan.engine_options(), "layout": best, "dtype": dtype_name,
        "predicted": {name: {k: p.simulation[k] for k in ("generated_tokens_per_s", "total_tokens_per_s",
                                                          "stage_utilisation", "pcie_gbs")}
                      for name, p in plans.items()}})
    try:
        path = save_profile(profile, args.output)
    except OSError as error:
        raise AutotuneError(f"cannot write the profile to {args.output or default_profile_path(key)}: "
                            f"{error.strerror or error}") from None
    found = path == default_profile_path(key) and gpus == visible and args.dtype == "auto"
    print(f"profile: {path}" + ("" if found else "  (serve-offline finds it with --profile)"))
    # (serve-offline looks the profile up by its KV dtype too: the flag goes with it, found or named)
    print(f"next: pipemax serve-offline {'--model ' + str(model_path) + ' ' if args.model else ''}"
          + ("" if found else f"--profile {path} " + (f"--dtype {args.dtype} " if args.dtype != "auto" else ""))
          + (f"--kv-cache-dtype {args.kv_cache_dtype} " if args.kv_cache_dtype != "auto" else "")
          + "-i requests.jsonl -o results.jsonl")
    return 0


def _doubts(noise, best_rate: float, best: str, costs) -> str:
    """Why the measurements cannot be trusted, in words ("" when nothing says so)."""
    reasons = []
    worst = noise.worst()
    if worst is not None:
        what, spread = worst
        others = len(noise.noisy) - 1
        reasons.append(f"the machine is busy: the repeats of the {what} disagreed by {spread:.3g}x, "
                       f"{1 + noise.retries} times"
                       + (f" (and {others} other measurement(s))" if others else ""))
    if not best_rate > 0:
        reasons.append(f"the plan predicts 0 generated tokens/s ({best}; a layer measured "
                       f"{costs.layer.alpha * 1e6:,.0f} us a token)")
    return "; ".join(reasons)


def _tokens_per_s(rate: float) -> str:
    """A throughput in few digits, never a rounded-down 0 for a slow one."""
    return f"{rate:,.0f}" if rate >= 10 else f"{rate:.2g}"


@contextlib.contextmanager
def _progress(total: int, disabled: bool):
    from tqdm import tqdm

    bar = tqdm(total=total, desc="measuring", unit="test", file=sys.stderr, disable=disabled)
    try:
        yield lambda: bar.update(1)
    finally:
        bar.close()
