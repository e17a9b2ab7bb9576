"""End-to-end throughput: PipeMax against transformers `generate`, same shapes, same run.

    python bench/bench_throughput.py --model llama-3-8b --workload fixed --num-prompts 128 \\
        --input-len 512 --output-len 256 --memory-cap-gib 32          (the issue-3 target, on a GPU)
    python bench/bench_throughput.py --model llama-3.2-1b --workload sharegpt --num-prompts 256
    python bench/bench_throughput.py --smoke                                 (tiny, CPU: checks the script)
    python bench/bench_throughput.py --model llama-3-8b --workload fewshot --prefix-caching on,off --skip-peer
        (issue 12: a 1,500-token few-shot prefix before 64 different 100-token questions, 32 out;
         with --workload fixed, the same without any sharing)

Models have random weights of real shapes (no downloads); every request ignores EOS, so both
systems generate exactly the requested lengths. The peer runs batched at the largest batch that
fits the memory cap. Printed: generated and total tokens/s, the ratio to the peer, and a roofline
(weights and KV bytes at the measured HBM bandwidth, FLOPs at the measured matmul rate).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_peaks import measure_peaks  # noqa: E402
from pipemax.core.kv_dtype import kv_storage_name, kv_token_bytes  # noqa: E402
from pipemax.core.sampling_params import SamplingParams  # noqa: E402
from pipemax.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from pipemax.models import build_model, model_config_from_hf  # noqa: E402
from pipemax.tuning.workloads import SYNTHETIC, synthetic_lengths  # noqa: E402

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
MODEL_SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         max_position_embeddings=8192, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192, rope_theta=100000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024),
    # Mixtral-8x7B's layer shape with 2 layers (random weights fit one GPU): the grouped-GEMM path.
    "mixtral-8x7b-2l": dict(mixtral=True, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                            num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                            max_position_embeddings=32768, num_local_experts=8, num_experts_per_tok=2,
                            sliding_window=None),
    # OPT shapes (FlexGen's family): transformers.OPTConfig fields.
    "opt-6.7b": dict(opt=True, hidden_size=4096, ffn_dim=16384, num_hidden_layers=32, num_attention_heads=32,
                     vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=4096),
    "opt-tiny": dict(opt=True, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=512, max_position_embeddings=1024, word_embed_proj_dim=64),
}
WORKLOADS = SYNTHETIC  # (mean input, mean output) tokens; lengths are log-normal around these means


@dataclass
class Result:
    system: str
    seconds: float
    generated_tokens: int
    total_tokens: int
    note: str = ""

    @property
    def generated_per_s(self) -> float:
        return self.generated_tokens / self.seconds

    @property
    def total_per_s(self) -> float:
        return self.total_tokens / self.seconds


def hf_config(name: str):
    import transformers

    shape = dict(MODEL_SHAPES[name])
    if shape.pop("opt", False):
        return transformers.OPTConfig(**shape)
    if shape.pop("mixtral", False):
        return transformers.MixtralConfig(**shape)
    return transformers.LlamaConfig(**shape)


def make_workload(kind: str, num_prompts: int, input_len: int, output_len: int, vocab: int, seed: int,
                  shared_prefix_len: int = 0):
    """[(prompt token ids, output length)], seeded. fewshot: one shared prefix of shared_prefix_len
    tokens, then input_len tokens of each request's own."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "fewshot":
        prefix = torch.randint(0, vocab, (shared_prefix_len,), generator=generator).tolist()
        return [(prefix + torch.randint(0, vocab, (input_len,), generator=generator).tolist(), output_len)
                for _ in range(num_prompts)]
    if kind == "fixed":
        lengths = [(input_len, output_len)] * num_prompts
    else:
        lengths = synthetic_lengths(kind, num_prompts, seed)
    return [(torch.randint(0, vocab, (n_in,), generator=generator).tolist(), n_out) for n_in, n_out in lengths]


def set_memory_cap(device: torch.device, cap_gib: float | None) -> None:
    if device.type == "cuda" and cap_gib:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total), device.index)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_pipemax(args, workload, device, dtype, prefill_mode: str, stages: int = 1, micro_batches: int | None = None,
                offload: str = "off", prefix_caching: bool = False, async_scheduling: bool = True,
                kv_cache_dtype: str = "auto") -> Result:
    config = model_config_from_hf(hf_config(args.model))
    torch.manual_seed(0)
    model = build_model(config, device=device, dtype=dtype)
    for param in model.parameters():  # random weights with a sane scale
        torch.nn.init.normal_(param, std=0.02)
    engine_config = EngineConfig(
        model=f"random:{args.model}", dtype={torch.bfloat16: "bfloat16", torch.float32: "float32",
                                             torch.float16: "float16"}[dtype],
        device=str(device), max_num_seqs=args.max_batch, max_num_batched_tokens=args.max_batched_tokens,
        gpu_memory_gib=args.memory_cap_gib, prefill_mode=prefill_mode, chunk_tokens=args.chunk_tokens,
        kv_cache_gib=args.kv_cache_gib, pipeline_parallel=stages, micro_batches=micro_batches,
        pipeline_transport="inprocess",  # random weights live in this process: stages time-share this device
        offload=offload, host_memory_gib=args.host_memory_gib if offload != "off" else None,
        cuda_graphs=args.cuda_graphs == "on", prefix_caching=prefix_caching, async_scheduling=async_scheduling,
        kv_cache_dtype=kv_cache_dtype,
    )
    engine = LLMEngine(engine_config, model=model)
    warm_up(engine, args, workload)
    for prompt, output_len in workload:
        engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True))
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    generated = sum(len(done.output_token_ids) for done in engine.run())
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    prompt_tokens = sum(len(p) for p, _ in workload)
    stats = engine.last_run_stats
    note = (f"{stats['steps']} steps of {stats['mean_micro_batch_seqs']:.0f} seqs ({stats['steps_launched_ahead']} "
            "launched ahead), "
            f"{stats['mean_in_flight_seqs']:.0f} in flight, {stats['preemptions']} preemptions, "
            f"{engine.kv.num_gpu_chunks} chunks, device waited for host {stats['device_waited_for_host_fraction']:.0%}")
    phases = stats["phase_seconds"]
    note += f", steps with prefill {phases['prefill']:.2f} s, decode steps {phases['decode']:.2f} s"
    if stages > 1:
        note += ", stage busy " + "/".join(f"{1 - b:.0%}" for b in stats["stage_bubble_fraction"])
    if "prefix_cache" in stats:
        cache = stats["prefix_cache"]
        skipped = cache["reused_tokens"] / cache["prompt_tokens"] if cache["prompt_tokens"] else 0.0
        note += f", prefix cache {cache['reused_tokens']} of {cache['prompt_tokens']} prompt tokens ({skipped:.0%})"
    if offload != "off":
        moved = stats["transfers"]
        hidden = stats.get("copy_time_hidden_fraction")
        note += (f", ring 2 x {engine.staging_chunks} chunks, {stats['offload']['host_resident_requests']} host-resident, "
                 f"{moved['bytes_prefetched'] / 1e9:.1f} GB prefetched at {moved['copy_gb_per_s']:.1f} GB/s, "
                 f"{'-' if hidden is None else f'{hidden:.0%}'} of copy time hidden")
    error = stats.get("cost_model", {}).get("mean_relative_error")
    if error is not None:
        note += f", cost model error {error:.0%}"
    if device.type == "cuda":
        note += f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    del engine, model
    free_memory(device)
    name = (f"pipemax ({prefill_mode}" + (f", P={stages}" if stages > 1 else "") + f", M={stats['micro_batches']}"
            + ("" if async_scheduling or stats["micro_batches"] > 1 else ", no async")
            + (f", offload {offload}" if offload != "off" else "")
            + (", prefix cache" if prefix_caching else "")
            + (f", {kv_cache_dtype} KV" if kv_cache_dtype != "auto" else "")
            + (", no CUDA graphs" if args.cuda_graphs == "off" and device.type == "cuda" else "") + ")")
    return Result(name, seconds, generated, generated + prompt_tokens, note)


def warm_up(engine: LLMEngine, args, workload) -> None:
    """Outside the timed region, the kinds of step the run will take, so that no kernel variant is
    compiled inside it. The timed run's prefill ramp puts a few, then more and more decode rows
    beside prompt pieces, and decode attention's split count (a compiled constant of its merge)
    follows those small batches: so the warm-up runs the same ramp, on fresh prompts of the
    workload's first lengths (the prefix cache must not start warm), then a few decode steps."""
    vocab = MODEL_SHAPES[args.model]["vocab_size"]
    generator = torch.Generator().manual_seed(getattr(args, "seed", 0) + 12345)
    lengths = [len(prompt) for prompt, _ in workload[:48]]
    for length in lengths:
        prompt = torch.randint(0, vocab, (max(1, min(length, engine.max_model_len - 4)),), generator=generator)
        engine.add_request(prompt.tolist(), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    for _ in engine.run():
        pass


def run_transformers(args, workload, device, dtype, cache: str = "dynamic") -> Result:
    """transformers generate, batched at the largest batch that fits; cache: dynamic (on the GPU)
    or offloaded (transformers' OffloadedCache: each layer's KV to the CPU between uses)."""
    import transformers

    config = hf_config(args.model)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # generate the full requested length
    model.generation_config.pad_token_id = 0
    order = sorted(range(len(workload)), key=lambda i: len(workload[i][0]))  # similar lengths share a batch
    batch_size = min(args.peer_batch or len(workload), len(workload))
    start = time.perf_counter()
    generated = 0
    while True:
        try:
            generated = 0
            start = time.perf_counter()
            for first in range(0, len(order), batch_size):
                batch = [workload[i] for i in order[first:first + batch_size]]
                width = max(len(p) for p, _ in batch)
                ids = torch.zeros(len(batch), width, dtype=torch.long)
                mask = torch.zeros(len(batch), width, dtype=torch.long)
                for row, (prompt, _) in enumerate(batch):  # left padding
                    ids[row, width - len(prompt):] = torch.tensor(prompt)
                    mask[row, width - len(prompt):] = 1
                new_tokens = max(n for _, n in batch)
                extra = {"cache_implementation": "offloaded"} if cache == "offloaded" else {}
                with torch.no_grad():
                    model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, do_sample=False, **extra)
                generated += sum(n for _, n in batch)  # tokens the requests asked for
            break
        except torch.OutOfMemoryError:
            free_memory(device)
            if batch_size <= 1:
                raise
            batch_size = max(1, batch_size * 3 // 4)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del model
    free_memory(device)
    prompt_tokens = sum(len(p) for p, _ in workload)
    name = "transformers generate" + (", offloaded cache" if cache == "offloaded" else "")
    return Result(name, seconds, generated, generated + prompt_tokens, f"batches of {batch_size}")


def roofline_seconds(args, workload, peaks, dtype, kv_cache_dtype: str = "auto") -> tuple[float, float]:
    """(prefill, decode) seconds at the measured peaks, if every request decoded in one batch, with
    the KV read in kv_cache_dtype (fp8: a byte an element and a float32 scale per row and head)."""
    config = model_config_from_hf(hf_config(args.model))
    element = torch.tensor([], dtype=dtype).element_size()
    weights = config.weight_bytes(dtype)
    layer_params = (weights - 2 * config.vocab_size * config.hidden_size * element) / element
    input_tokens = sum(len(p) for p, _ in workload)
    attention_pairs = sum(len(p) * (len(p) + 1) / 2 for p, _ in workload)
    prefill_flops = 2 * layer_params * input_tokens + 4 * attention_pairs * config.num_layers * config.q_size
    storage = kv_storage_name(kv_cache_dtype, str(dtype).removeprefix("torch."))
    kv_per_token = kv_token_bytes(config.num_layers, config.num_kv_heads, config.head_dim, storage)
    steps = max(n for _, n in workload)
    kv_reads = sum(sum(len(p) + t for t in range(n)) for p, n in workload) * kv_per_token
    decode_bytes = steps * weights + kv_reads
    return prefill_flops / (peaks["matmul_tflops"] * 1e12), decode_bytes / (peaks["hbm_gbps"] * 1e9)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3-8b", choices=sorted(MODEL_SHAPES))
    parser.add_argument("--workload", default="fixed", choices=["fixed", "fewshot", *WORKLOADS])
    parser.add_argument("--shared-prefix-len", type=int, default=1500, help="fewshot: tokens of the shared prefix")
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--input-len", type=int, default=512, help="fixed workload: prompt tokens")
    parser.add_argument("--output-len", type=int, default=256, help="fixed workload: generated tokens")
    parser.add_argument("--memory-cap-gib", type=float, help="emulate a smaller card (GiB), for both systems")
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--max-batched-tokens", type=int, default=4096)
    parser.add_argument("--chunk-tokens", type=int, default=16)
    parser.add_argument("--kv-cache-gib", type=float)
    parser.add_argument("--prefill-mode", default="mixed", choices=["mixed", "separate", "both"])
    parser.add_argument("--pipeline-parallel", default="1",
                        help="pipeline stages, in process on this device; a list such as 1,2,4 runs each")
    parser.add_argument("--micro-batches", default="",
                        help="micro-batches in flight; a list such as 1,2 runs each (default: the engine's)")
    parser.add_argument("--offload", default="off", help="comma-separated offload modes to run: off,auto,force")
    parser.add_argument("--host-memory-gib", type=float, default=64.0, help="host KV pool when offloading")
    parser.add_argument("--prefix-caching", default="off", help="comma-separated: on,off runs each (default off)")
    parser.add_argument("--async-scheduling", default="on",
                        help="comma-separated: on,off runs each (the host one step ahead at M = 1; default on)")
    parser.add_argument("--kv-cache-dtype", default="auto",
                        help="comma-separated KV cache dtypes: auto,fp8 runs each (rows' roofline: their KV bytes)")
    parser.add_argument("--cuda-graphs", default="on", choices=["on", "off"],
                        help="off: every step eager (to measure what the graphs, decode and piecewise, buy)")
    parser.add_argument("--peer-batch", type=int, help="first batch size to try for transformers")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the script, not the speed")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.num_prompts, args.input_len, args.output_len = "tiny", 6, 20, 8
        args.shared_prefix_len = min(args.shared_prefix_len, 40)
        args.kv_cache_gib = args.kv_cache_gib or 0.01
        args.host_memory_gib = min(args.host_memory_gib, 0.05)
    use_cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    set_memory_cap(device, args.memory_cap_gib)
    vocab = MODEL_SHAPES[args.model]["vocab_size"]
    workload = make_workload(args.workload, args.num_prompts, args.input_len, args.output_len, vocab, args.seed,
                             args.shared_prefix_len)
    peaks = measure_peaks(device, dtype, small=args.smoke)

    prefill_s, decode_s = roofline_seconds(args, workload, peaks, dtype)
    roofline = prefill_s + decode_s
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    # The header and each row as soon as it is known: a run cut short still shows what it measured.
    print(f"device: {name}; model {args.model} ({dtype}); workload {args.workload}: {len(workload)} prompts, "
          f"{sum(len(p) for p, _ in workload)} input / {sum(n for _, n in workload)} output tokens; "
          f"memory cap {args.memory_cap_gib or '-'} GiB", flush=True)
    print(f"peaks: HBM {peaks['hbm_gbps']:.0f} GB/s, matmul {peaks['matmul_tflops']:.1f} TFLOP/s; roofline "
          f"{roofline:.2f} s (prefill {prefill_s:.2f} s + decode {decode_s:.2f} s)", flush=True)
    kv_dtypes = args.kv_cache_dtype.split(",")
    rooflines = {kv: sum(roofline_seconds(args, workload, peaks, dtype, kv)) for kv in kv_dtypes}
    for kv in kv_dtypes:
        if kv != "auto":
            print(f"roofline with {kv} KV: {rooflines[kv]:.2f} s", flush=True)
    print(f"{'system':<32} {'seconds':>9} {'gen tok/s':>11} {'total tok/s':>12} {'roofline':>9}  note", flush=True)

    def row(result: Result, kv_cache_dtype: str = "auto") -> Result:
        bound = rooflines.get(kv_cache_dtype, roofline)
        print(f"{result.system:<32} {result.seconds:>9.2f} {result.generated_per_s:>11.1f} "
              f"{result.total_per_s:>12.1f} {bound / result.seconds:>9.0%}  {result.note}", flush=True)
        return result

    results = []
    modes = ["mixed", "separate"] if args.prefill_mode == "both" else [args.prefill_mode]
    stage_counts = [int(n) for n in args.pipeline_parallel.split(",")]
    micro_batch_counts = [int(n) for n in args.micro_batches.split(",")] if args.micro_batches else [None]
    offload_modes = args.offload.split(",")
    caching = [{"on": True, "off": False}[value] for value in args.prefix_caching.split(",")]
    running_ahead = [{"on": True, "off": False}[value] for value in args.async_scheduling.split(",")]
    for mode in modes:
        for stages in stage_counts:
            for micro_batches in micro_batch_counts:
                if micro_batches is not None and micro_batches < stages:
                    continue
                for offload in offload_modes:
                    for prefix_caching in caching:
                        for async_scheduling in running_ahead:
                            for kv in kv_dtypes:
                                results.append(row(run_pipemax(args, workload, device, dtype, mode, stages,
                                                               micro_batches, offload, prefix_caching,
                                                               async_scheduling, kv), kv))
    peer = None if args.skip_peer else row(run_transformers(args, workload, device, dtype))
    if peer:
        results.append(peer)

    lines = []
    if peer:
        lines += [f"vs {peer.system}: {result.system} {result.generated_per_s / peer.generated_per_s:.2f}x generated "
                  "tokens/s" for result in results if result is not peer]
    pairs = {}  # each configuration with and without the prefix cache: the ratio
    for result in results:
        if result.system.startswith("pipemax"):
            pairs.setdefault(result.system.replace(", prefix cache", ""), {})["on" if "prefix cache)" in result.system
                                                                              else "off"] = result
    for system, pair in pairs.items():
        if len(pair) == 2:
            lines.append(f"prefix cache on / off, {system}: {pair['on'].generated_per_s / pair['off'].generated_per_s:.2f}x "
                         f"generated tokens/s")
    for result in results:  # each fp8 row against the same configuration with the model's-dtype KV
        for kv in kv_dtypes:
            suffix = f", {kv} KV)"
            if kv != "auto" and result.system.endswith(suffix):
                base = next((r for r in results if r.system == result.system.replace(suffix, ")")), None)
                if base:
                    lines.append(f"{kv} / model-dtype KV, {base.system}: "
                                 f"{result.generated_per_s / base.generated_per_s:.2f}x generated tokens/s")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"device": name, "args": vars(args) | {"json": None},
                                         "roofline_seconds": roofline, "peaks": peaks,
                                         "results": [asdict(r) for r in results]}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
