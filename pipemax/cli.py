"""The `pipemax` command.

    pipemax serve-offline [--model PATH] -i requests.jsonl -o results.jsonl [options]
    pipemax plan --gpus 8 --gpu-memory-gib 32 --pcie-gbs 55 --hbm-tbs 1.8 --tflops 200 --model CONFIG
    pipemax env
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import signal
import sys
from pathlib import Path

from pipemax.core.kv_dtype import KV_CACHE_DTYPES
from pipemax.tuning.profile_settings import add_profile_arguments


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


# EngineConfig fields -> the flags that set them, so errors name what the user typed.
FLAG_OF_OPTION = {
    "dtype": "--dtype", "device": "--device", "max_num_seqs": "--max-batch",
    "max_num_batched_tokens": "--max-batched-tokens", "gpu_memory_gib": "--gpu-memory-gib",
    "kv_cache_gib": "--kv-cache-gib", "chunk_tokens": "--chunk-tokens", "max_model_len": "--max-model-len",
    "attention_backend": "--attention-backend", "prefill_mode": "--prefill-mode", "seed": "--seed",
    "pipeline_parallel": "--pipeline-parallel", "micro_batches": "--micro-batches",
    "pipeline_transport": "--pipeline-transport", "stage_layers": "--stage-layers", "stage_timeout": "--stage-timeout",
    "data_parallel": "--data-parallel", "offload": "--offload", "host_memory_gib": "--host-memory-gib",
    "trace": "--trace", "prefetch_gbs": "--prefetch-gbs", "prefix_caching": "--prefix-caching",
    "kv_cache_dtype": "--kv-cache-dtype",
}


class JobError(Exception):
    """A job-level user error: printed as one line, exit status 2, nothing lost."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the results so far stay, the job can be resumed."""


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--model", help="local HF model folder (safetensors) or .gguf file; default: the bundled "
                                       "SmolLM2-135M-Instruct")
    group.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                       help="weights and KV dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    group.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES),
                       help="KV cache storage: auto (the model's dtype), fp8 (= fp8_e4m3) or fp8_e5m2. fp8 holds "
                            "twice the tokens per GiB and moves and reads half the KV bytes, with a scale per "
                            "token and KV head; needs an sm_89+ GPU (Ada, Hopper, Blackwell) or the CPU")
    group.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (auto: cuda if available)")
    group.add_argument("--max-batch", type=int, help="sequences per step (default: the server profile's, else 256)")
    group.add_argument("--max-batched-tokens", type=int,
                       help="tokens per step, decode tokens plus prefill pieces (default: the server profile's, "
                            "else 2048)")
    group.add_argument("--gpu-memory-gib", type=float, help="device memory PipeMax may use, weights included, in GiB "
                                                             "(default: 90%% of the GPU)")
    group.add_argument("--kv-cache-gib", type=float, help="KV cache size in GiB (default: what --gpu-memory-gib "
                                                           "leaves; 1 GiB on CPU)")
    group.add_argument("--chunk-tokens", type=int, help="tokens per KV chunk, a power of two 8..256 (default: the "
                                                        "server profile's, else 16)")
    group.add_argument("--max-model-len", type=int, help="tokens per sequence, prompt + output (default and "
                                                         "maximum: the model's)")
    group.add_argument("--attention-backend", default="auto", choices=["auto", "triton", "torch"],
                       help="auto: Triton kernels on CUDA, torch references on CPU")
    group.add_argument("--prefill-mode", default="mixed", choices=["mixed", "separate"],
                       help="prefill pieces share steps with decodes (mixed) or get steps of their own")
    group.add_argument("--seed", type=int, default=0, help="seed for requests without their own")
    group.add_argument("--pipeline-parallel", type=int, metavar="P",
                       help="pipeline stages: the layers split into P contiguous ranges (default: the server "
                            "profile's, else 1)")
    group.add_argument("--micro-batches", type=int, metavar="M",
                       help="micro-batches in flight, at least P (default: P, the best measured in process)")
    group.add_argument("--pipeline-transport", default="distributed", choices=["distributed", "inprocess"],
                       help="distributed: a process per stage, one GPU each (CPU processes without GPUs); "
                            "inprocess: every stage in this process on one device, taking turns")
    group.add_argument("--data-parallel", type=int, metavar="R",
                       help="replicas of the whole pipeline, each a process of its own on its own GPUs "
                            "(8 GPUs = --pipeline-parallel 4 --data-parallel 2); results land in one file")
    group.add_argument("--stage-timeout", type=float, default=60.0, metavar="SECONDS",
                       help="a stage process silent this long ends the job (default 60)")
    group.add_argument("--stage-layers", metavar="N,N,...",
                       help="layers per stage, e.g. 10,11,11 (default: balanced by cost)")
    group.add_argument("--offload", choices=["off", "auto", "force"],
                       help="KV of micro-batches between their steps: off (stays on the GPU); auto (while "
                            "requests wait for GPU memory, as much as each micro-batch's prefetch can bring "
                            "back while the others compute); force (every request host-resident, for testing). "
                            "Default: the server profile's, else off")
    group.add_argument("--host-memory-gib", type=float, metavar="GIB",
                       help="host KV pool of offload and of the prefix cache's host tier, every stage of this "
                            "node together (default with offload: a quarter of the host memory available; "
                            "without: none); checked against what is free")
    group.add_argument("--prefetch-gbs", type=float, metavar="GB/S",
                       help="host -> GPU bandwidth offload=auto's prefetch budget counts on (default: measured "
                            "at start; an autotune profile sets it)")
    group.add_argument("--prefix-caching", choices=["on", "off"], default="on",
                       help="share the KV of prompt prefixes common to several requests: computed once, kept "
                            "on the GPU while there is room, then in the host KV pool (with offload, or "
                            "--host-memory-gib), and requests sharing one run together (default: on)")
    group.add_argument("--trace", metavar="TRACE.json",
                       help="write a Chrome/Perfetto trace of the run: each stage's compute, prefetch and "
                            "write-back, and the host's planning (open at ui.perfetto.dev); it may replace an "
                            "earlier trace, another file only with --overwrite")


def engine_options(args: argparse.Namespace) -> dict:
    return dict(
        dtype=args.dtype, device=args.device, max_num_seqs=args.max_batch,
        max_num_batched_tokens=args.max_batched_tokens, gpu_memory_gib=args.gpu_memory_gib,
        kv_cache_gib=args.kv_cache_gib, chunk_tokens=args.chunk_tokens, max_model_len=args.max_model_len,
        attention_backend=args.attention_backend, prefill_mode=args.prefill_mode, seed=args.seed,
        pipeline_parallel=args.pipeline_parallel, micro_batches=args.micro_batches,
        pipeline_transport=args.pipeline_transport, stage_layers=args.stage_layers, stage_timeout=args.stage_timeout,
        data_parallel=args.data_parallel, offload=args.offload, host_memory_gib=args.host_memory_gib,
        trace=str(args.trace) if args.trace else None, overwrite_trace=getattr(args, "overwrite", False),
        prefetch_gbs=args.prefetch_gbs, prefix_caching=args.prefix_caching == "on",
        kv_cache_dtype=args.kv_cache_dtype,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipemax", description="PipeMax: offline LLM inference")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("env", help="print versions and the devices PipeMax sees")
    serve = commands.add_parser(
        "serve-offline", help="run a batch file (OpenAI batch JSONL) through a model",
        epilog="exit status: 0 all requests succeeded; 3 the job finished but some requests failed (see their "
               "error records); 2 job error (flags, paths, model, another job on the output), nothing lost; "
               "130 interrupted (Ctrl-C), 143 terminated (SIGTERM): rerun the same command to resume; 1 an "
               "unexpected error inside PipeMax (a traceback: please report it), results written so far stay")
    serve.add_argument("-i", "--input-file", required=True, type=Path, help="requests, one JSON object per line")
    serve.add_argument("-o", "--output-file", required=True, type=Path,
                       help="results, appended as requests finish; rerun to resume (failed requests run again)")
    serve.add_argument("--overwrite", action="store_true",
                       help="discard an existing output file (needed when it is not a PipeMax results file)")
    serve.add_argument("--served-model-name", nargs="+", metavar="NAME",
                       help="the model name(s) requests may ask for and results carry (default: the model's "
                            "folder name, and the --model string as given, as vLLM serves it); a request naming "
                            "another model gets an error record")
    serve.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_engine_arguments(serve)
    add_profile_arguments(serve)
    from pipemax.tuning.autotune import add_autotune_parser
    from pipemax.tuning.plan_command import add_plan_parser

    add_autotune_parser(commands)
    add_plan_parser(commands)
    return parser


def resolve_settings(args: argparse.Namespace) -> list[str]:
    """Flags, then the server profile, then defaults (profile_settings.py): the lines saying so."""
    from pipemax.parallel.cluster import launched_by_torchrun
    from pipemax.tuning.profile_settings import ProfileSettingsError, apply_server_profile

    try:
        return apply_server_profile(args, launched_by_torchrun())
    except ProfileSettingsError as error:
        raise JobError(str(error)) from None


def preflight(args: argparse.Namespace) -> None:
    """Every check that needs no weights: flags, device, model files. Fails in seconds, not after loading."""
    from pipemax.engine.config import ConfigError, EngineConfig
    from pipemax.models.loader import WeightLoadError, check_model_path

    check_trace_is_not_a_job_file(args)
    try:
        config = EngineConfig(model=str(args.model or ""), **engine_options(args))
    except ConfigError as error:
        flag = FLAG_OF_OPTION.get(error.option, error.option)
        if error.option in getattr(args, "profile_fields", ()):
            raise JobError(f"the server profile's {error.option} {error.problem}: override it with {flag}, or run "
                           "`pipemax autotune` again") from None
        raise JobError(f"{flag} {error.problem}") from None
    if args.model is not None:
        try:
            check_model_path(Path(args.model))
        except WeightLoadError as error:
            raise JobError(f"--model: {error}") from None
    if config.pipeline_parallel > 1:
        check_partition(args, config)


def check_trace_is_not_a_job_file(args: argparse.Namespace) -> None:
    """--trace is written after the run: it must not replace the requests or the results."""
    if not args.trace:
        return
    trace = Path(args.trace).resolve()
    for flag, path in (("input", args.input_file), ("output", args.output_file)):
        if path is not None and trace == Path(path).resolve():
            raise JobError(f"--trace {args.trace} is the {flag} file: the trace would replace the "
                           f"{'requests' if flag == 'input' else 'results'}; name another file")


def check_partition(args: argparse.Namespace, config) -> None:
    """The stage split needs only the model's config.json: check it now, not after loading."""
    from pipemax.models import model_config_at
    from pipemax.models.default_model import default_model_path
    from pipemax.parallel.partition import PartitionError, partition_layers

    path = Path(args.model) if args.model is not None else default_model_path()
    try:
        partition_layers(model_config_at(path), config.pipeline_parallel, list(config.stage_layers or []) or None)
    except PartitionError as error:
        flag = "--stage-layers" if config.stage_layers else "--pipeline-parallel"
        raise JobError(f"{flag}: {error}") from None


def served_names(args: argparse.Namespace) -> list[str]:
    from pipemax.models.default_model import DEFAULT_MODEL_NAME

    if args.served_model_name:
        return list(args.served_model_name)
    if args.model is None:
        return [DEFAULT_MODEL_NAME]
    # The folder's name, and (as vLLM serves it) the --model string as given: a batch file written
    # for vLLM says "model": "/models/Llama-3.1-8B-Instruct".
    path = Path(args.model)
    names = [path.stem if path.suffix == ".gguf" else path.resolve().name, str(args.model)]
    if str(args.model).rstrip("/") != str(args.model):
        names.append(str(args.model).rstrip("/"))
    return list(dict.fromkeys(names))


def serve_offline(args: argparse.Namespace) -> int:
    from pipemax.batch.job import BatchSummary, run_batch_job
    from pipemax.batch.results_file import OutputFileError, ResultsFile
    from pipemax.parallel.distributed import StageFailure

    settings = resolve_settings(args)
    preflight(args)
    if serve_as_torchrun_worker(args):  # ranks other than 0 under torchrun: stages and replica heads
        return 0
    try:
        results, dropped_errors = ResultsFile.open(args.input_file, args.output_file, args.overwrite)
    except OutputFileError as error:
        raise JobError(str(error)) from None
    for line in settings:  # after the checks: an error stays alone on its line
        print(line, file=sys.stderr)
    summary = BatchSummary(retried=dropped_errors)
    llm = None
    try:
        llm = load_llm(args)
        run_batch_job(llm, args.input_file, results, served_names(args), use_tqdm=not args.no_progress,
                      summary=summary)
    except KeyboardInterrupt as interruption:
        print(f"interrupted: {results.count_records()} results written to {results.path}; run the same command again "
              "to resume", file=sys.stderr)
        return 143 if isinstance(interruption, Terminated) else 130
    except OutputFileError as error:  # the disk filled up, say: what was written stays
        raise JobError(str(error)) from None
    except StageFailure as error:  # a stage process died or hung: what was written stays
        raise JobError(f"{error}; {results.count_records()} results are safe in {results.path}: run the same "
                       "command again to resume") from None
    finally:
        note_late_interruptions()  # results are safe from here on: closing down is not interrupted
        if llm is not None:
            llm.close()
        results.close()
    for line in summary.lines():
        print(line)
    print(f"results: {results.path}")
    return summary.exit_code


def serve_as_torchrun_worker(args: argparse.Namespace) -> bool:
    """Under torchrun, rank 0 runs the job (its files live on its node); every other rank serves
    until rank 0 is done. False anywhere else."""
    from pipemax.api import serve_torchrun_worker
    from pipemax.engine.config import ConfigError

    try:
        return serve_torchrun_worker(args.model, **engine_options(args))
    except ConfigError as error:
        raise JobError(f"{FLAG_OF_OPTION.get(error.option, error.option)} {error.problem}") from None


def load_llm(args: argparse.Namespace):
    from pipemax.api import LLM
    from pipemax.engine.config import ConfigError

    try:
        return LLM(model=args.model, **engine_options(args))
    except ConfigError as error:  # e.g. a memory budget that leaves no room for the KV cache
        raise JobError(f"{FLAG_OF_OPTION.get(error.option, error.option)} {error.problem}") from None


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (tests and tqdm swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def show_pipemax_logs() -> None:
    """PipeMax's own INFO and warnings on stderr, once. Not logging.basicConfig: a root handler
    prints every transformers warning a second time wherever transformers propagates its logs
    (it does when the CI variable is set)."""
    log = logging.getLogger("pipemax")
    if not any(isinstance(handler, _CurrentStderr) for handler in log.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)


def _raise_terminated(signum, frame):
    raise Terminated()


def note_late_interruptions() -> None:
    """Once the job has ended (every result written, or an interruption handled), a Ctrl-C or SIGTERM
    must not break the closing down with a KeyboardInterrupt traceback and a death by signal: say so
    in one line and go on, so the job exits with its own status. A second one quits at once.
    main() puts the previous handlers back."""
    seen = []

    def late(signum, frame):
        if seen:
            os._exit(128 + signum)
        seen.append(signum)
        print("pipemax: the job has ended and its results are written; closing down (again to quit at once)",
              file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, late)
    signal.signal(signal.SIGTERM, late)


def is_torchrun_worker_rank() -> bool:
    from pipemax.parallel.cluster import launched_by_torchrun

    return launched_by_torchrun() and os.environ.get("RANK", "0") != "0"


def exit_now_under_torchrun(rc: int) -> None:
    """Under torchrun the job is over once its files are closed: leave at once with its status.
    A normal exit would tear down torch.distributed under threads that a failed peer left inside
    a gloo receive, and abort (SIGABRT) instead of exiting with rc."""
    from pipemax.parallel.cluster import launched_by_torchrun

    if launched_by_torchrun():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    show_pipemax_logs()
    if args.version:
        from pipemax import __version__

        print(__version__)
        return 0
    if args.command == "env":
        print("\n".join(describe_environment()))
        return 0
    if args.command == "serve-offline":
        previous_sigint = signal.getsignal(signal.SIGINT)
        previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            rc = _serve_with_one_line_errors(args)
        except KeyboardInterrupt as interruption:  # before the output was opened: nothing to resume
            if not is_torchrun_worker_rank():  # (a worker rank has no job of its own: rank 0 reports)
                print("interrupted before any request ran", file=sys.stderr)
            rc = 143 if isinstance(interruption, Terminated) else 130
        finally:
            signal.signal(signal.SIGTERM, previous_sigterm)
            signal.signal(signal.SIGINT, previous_sigint)
        exit_now_under_torchrun(rc)
        return rc
    if args.command in ("autotune", "plan"):
        return _run_planning_command(args)
    parser.print_help(sys.stderr)
    return 2


def _run_planning_command(args: argparse.Namespace) -> int:
    """`pipemax autotune` or `pipemax plan`: what they cannot use is one line, exit status 2."""
    if args.command == "autotune":
        from pipemax.tuning.autotune import AutotuneError as InputError
        from pipemax.tuning.autotune import run_autotune as run
    else:
        from pipemax.tuning.plan_command import PlanInputError as InputError
        from pipemax.tuning.plan_command import run_plan as run
    try:
        return run(args)
    except InputError as error:
        print(f"pipemax: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        saved = "no profile was saved" if args.command == "autotune" else "nothing was written"
        print(f"pipemax: {args.command} interrupted; {saved}", file=sys.stderr)
        return 130


def _serve_with_one_line_errors(args: argparse.Namespace) -> int:
    from pipemax.models import UnsupportedModelError, WeightLoadError

    try:
        return serve_offline(args)
    except (JobError, WeightLoadError, UnsupportedModelError, FileNotFoundError) as error:
        print(f"pipemax: {error}", file=sys.stderr)
        return 2


def entry() -> None:
    """The `pipemax` command (pyproject.toml's script): main(), and a Ctrl-C that lands outside the
    job's own handling (while arguments parse, or as the process leaves) is one line and status 130,
    not a traceback."""
    try:
        rc = main()
    except KeyboardInterrupt:
        print("pipemax: interrupted", file=sys.stderr)
        rc = 130
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # leaving now: a late Ctrl-C changes nothing
    sys.exit(rc)


if __name__ == "__main__":
    entry()
