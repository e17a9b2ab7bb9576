"""The `pipemax` command.

    pipemax serve-offline [--model PATH] -i requests.jsonl -o results.jsonl [options]
    pipemax env
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
from pathlib import Path


def describe_environment() -> list[str]:
    """Versions and devices, for bug reports and for checking a server before a job."""
    import torch
    import triton

    lines = [
        f"python {platform.python_version()}",
        f"torch {torch.__version__}",
        f"triton {triton.__version__}",
    ]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            lines.append(f"cuda:{index} {props.name}, {props.total_memory / 2**30:.1f} GiB, sm_{props.major}{props.minor}")
    else:
        lines.append("no CUDA device: kernels run on CPU (torch references, or Triton's interpreter)")
    return lines


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--model", help="local HF model folder (safetensors) or .gguf file; default: the bundled "
                                       "SmolLM2-135M-Instruct")
    group.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                       help="weights and KV dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    group.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (auto: cuda if available)")
    group.add_argument("--max-batch", type=int, default=256, help="sequences per step (default 256)")
    group.add_argument("--max-batched-tokens", type=int, default=2048,
                       help="tokens per step, decode tokens plus prefill pieces (default 2048)")
    group.add_argument("--gpu-memory-gib", type=float, help="device memory PipeMax may use, weights included, in GiB "
                                                             "(default: 90%% of the GPU)")
    group.add_argument("--kv-cache-gib", type=float, help="KV cache size in GiB (default: what --gpu-memory-gib "
                                                           "leaves; 1 GiB on CPU)")
    group.add_argument("--chunk-tokens", type=int, default=16, help="tokens per KV chunk, a power of two 8..256")
    group.add_argument("--max-model-len", type=int, help="tokens per sequence, prompt + output (default: the model's)")
    group.add_argument("--attention-backend", default="auto", choices=["auto", "triton", "torch"],
                       help="auto: Triton kernels on CUDA, torch references on CPU")
    group.add_argument("--prefill-mode", default="mixed", choices=["mixed", "separate"],
                       help="prefill pieces share steps with decodes (mixed) or get steps of their own")
    group.add_argument("--seed", type=int, default=0, help="seed for requests without their own")


def engine_options(args: argparse.Namespace) -> dict:
    return dict(
        dtype=args.dtype, device=args.device, max_num_seqs=args.max_batch,
        max_num_batched_tokens=args.max_batched_tokens, gpu_memory_gib=args.gpu_memory_gib,
        kv_cache_gib=args.kv_cache_gib, chunk_tokens=args.chunk_tokens, max_model_len=args.max_model_len,
        attention_backend=args.attention_backend, prefill_mode=args.prefill_mode, seed=args.seed,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipemax", description="PipeMax: offline LLM inference")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("env", help="print versions and the devices PipeMax sees")
    serve = commands.add_parser("serve-offline", help="run a batch file (OpenAI batch JSONL) through a model")
    serve.add_argument("-i", "--input-file", required=True, type=Path, help="requests, one JSON object per line")
    serve.add_argument("-o", "--output-file", required=True, type=Path,
                       help="results, appended as requests finish; rerun to resume")
    serve.add_argument("--served-model-name", help="model name written into results (default: the folder name)")
    serve.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_engine_arguments(serve)
    return parser


def serve_offline(args: argparse.Namespace) -> int:
    from pipemax.api import LLM
    from pipemax.batch_job import run_batch_job

    if not args.input_file.is_file():
        print(f"pipemax: input file {args.input_file} not found", file=sys.stderr)
        return 2
    llm = LLM(model=args.model, **engine_options(args))
    model_name = args.served_model_name or Path(llm.engine.config.model).name
    summary = run_batch_job(llm, args.input_file, args.output_file, model_name, use_tqdm=not args.no_progress)
    for line in summary.lines():
        print(line)
    print(f"results: {args.output_file.resolve()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.version:
        from pipemax import __version__

        print(__version__)
        return 0
    if args.command == "env":
        print("\n".join(describe_environment()))
        return 0
    if args.command == "serve-offline":
        from pipemax.models import WeightLoadError

        try:
            return serve_offline(args)
        except (ValueError, FileNotFoundError, WeightLoadError) as error:  # bad configuration: no traceback
            print(f"pipemax: {error}", file=sys.stderr)
            return 2
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
