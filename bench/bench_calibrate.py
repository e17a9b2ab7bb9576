"""Does the simulator predict what the engine does? `pipemax autotune` measures this GPU, then the
engine runs a workload and the simulator predicts it from the profile alone, in the same run:

  - the P = 1 engine (target: within 10%),
  - the in-process P-stage emulation, every stage time-sharing this one GPU (target: within 15%).

    python bench/bench_calibrate.py                      (a lent GPU: Llama-3.2-1B shapes, ShareGPT-like)
    python bench/bench_calibrate.py --smoke              (tiny, CPU: checks the script)

The in-process emulation runs its stages one after the other on one device, so it is simulated as
one stage holding every layer with M micro-batches (what the device sees), from the same profile.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_throughput import MODEL_SHAPES, hf_config, make_workload  # noqa: E402
from pipemax.cli import main as pipemax_main  # noqa: E402
from pipemax.core.offload_schedule import ScheduleSettings, plan_schedule  # noqa: E402
from pipemax.core.sampling_params import SamplingParams  # noqa: E402
from pipemax.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from pipemax.models import LlamaFamilyModel, model_config_from_hf  # noqa: E402
from pipemax.tuning.server_plan import ComputeCosts  # noqa: E402
from pipemax.tuning.server_profile import load_profile  # noqa: E402
from pipemax.tuning.simulator import SimulatedServer, simulate  # noqa: E402

TARGETS = {1: 0.10}  # P = 1; every emulated pipeline: 0.15


def run_engine(config, device, dtype, workload, stages: int, micro_batches: int, args) -> tuple[float, int, int]:
    """(generated tokens/s, generated tokens, GPU KV chunks) of the engine on the workload."""
    torch.manual_seed(0)
    model = LlamaFamilyModel(config, device=device, dtype=dtype)
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.02)
    engine = LLMEngine(EngineConfig(
        model="random:calibration", dtype=str(dtype).removeprefix("torch."), device=str(device),
        max_num_seqs=args.max_batch, max_num_batched_tokens=args.max_batched_tokens, chunk_tokens=args.chunk_tokens,
        kv_cache_gib=args.kv_cache_gib, pipeline_parallel=stages, micro_batches=micro_batches,
        pipeline_transport="inprocess"), model=model)
    engine.add_request(workload[0][0][:32], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    for _ in engine.run():  # warm-up: kernels compile, graphs capture
        pass
    for prompt, outputs in workload:
        engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=outputs, ignore_eos=True))
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    generated = sum(len(done.output_token_ids) for done in engine.run())
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    chunks = engine.kv.gpu.num_chunks
    del engine, model
    return generated / seconds, generated, chunks


def predict(costs: ComputeCosts, config, dtype, workload, chunks: int, micro_batches: int, args) -> float:
    """Generated tokens/s the simulator predicts: one stage holding every layer (and the head)."""
    stage = costs.stage(config.num_layers, last=True)
    element = torch.tensor([], dtype=dtype).element_size()
    chunk_bytes = 2 * config.kv_size * element * config.num_layers * args.chunk_tokens
    requests = [(len(prompt), outputs) for prompt, outputs in workload]
    schedule = plan_schedule(requests, ScheduleSettings(
        chunks, 0, args.chunk_tokens, args.max_batch, args.max_batched_tokens, micro_batches,
        step_cost=(stage.alpha, stage.beta, stage.delta)))
    server = SimulatedServer((stage,), 1e12, 1e12, (chunk_bytes,), config.hidden_size * element)
    return simulate(schedule, server, args.chunk_tokens).generated_tokens_per_s


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3.2-1b", choices=sorted(MODEL_SHAPES))
    parser.add_argument("--workload", default="sharegpt", choices=["sharegpt", "longbench"])
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--stages", type=int, default=2, help="stages of the in-process emulation")
    parser.add_argument("--max-batch", type=int, default=128)
    parser.add_argument("--max-batched-tokens", type=int, default=512)
    parser.add_argument("--chunk-tokens", type=int, default=16)
    parser.add_argument("--kv-cache-gib", type=float, default=4.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.num_prompts, args.max_batch, args.max_batched_tokens = "tiny", 12, 8, 64
        args.kv_cache_gib = 1 / 64
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hf = hf_config(args.model)
    config = model_config_from_hf(hf)
    workload = make_workload(args.workload, args.num_prompts, 0, 0, config.vocab_size, seed=0)
    if args.smoke:
        workload = [(prompt[:48], min(outputs, 8)) for prompt, outputs in workload]

    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        profile_path = Path(folder) / "profile.json"
        tune = ["autotune", "--model", folder, "--gpus", "1", "-o", str(profile_path), "--no-progress",
                "--num-prompts", "50", "--dtype", str(dtype).removeprefix("torch.")]
        started = time.perf_counter()
        # (--smoke checks the script on a CPU that other jobs share: keep a noisy profile anyway)
        if pipemax_main(tune + (["--quick", "--force"] if args.smoke else [])) != 0:
            print("autotune failed", file=sys.stderr)
            return 1
        tuned_seconds = time.perf_counter() - started
        profile = load_profile(profile_path)
    costs = ComputeCosts.from_dict(profile.measurements["costs"])

    rows = []
    for stages, micro_batches in ((1, 1), (args.stages, args.stages)):
        measured, generated, chunks = run_engine(config, device, dtype, workload, stages, micro_batches, args)
        predicted = predict(costs, config, dtype, workload, chunks, micro_batches, args)
        error = predicted / measured - 1
        target = TARGETS.get(stages, 0.15)
        rows.append({"engine": f"P={stages}, M={micro_batches}" + (" (in process)" if stages > 1 else ""),
                     "measured_tokens_per_s": measured, "predicted_tokens_per_s": predicted, "error": error,
                     "target": target, "within_target": abs(error) <= target, "generated_tokens": generated,
                     "gpu_chunks": chunks})
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke)" if args.smoke else "CPU"
    print(f"device: {name}; model {args.model}, {args.workload} x {len(workload)}; autotune took {tuned_seconds:.0f} s")
    print(f"{'engine':<22} {'measured tok/s':>14} {'predicted tok/s':>15} {'error':>7} {'target':>7}")
    for row in rows:
        print(f"{row['engine']:<22} {row['measured_tokens_per_s']:>14,.0f} {row['predicted_tokens_per_s']:>15,.0f} "
              f"{row['error']:>+7.0%} {'ok' if row['within_target'] else 'MISSED':>7}")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "model": args.model, "rows": rows,
                                         "costs": profile.measurements["costs"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
