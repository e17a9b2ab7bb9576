"""PipeMax against every peer that runs on this machine, one workload, the same memory cap, one run.

    python bench/bench_peers.py                                  (a lent GPU: OPT-6.7B shape, 256 x 512 in / 32 out,
                                                            caps 16, 24, 32 GiB)
    python bench/bench_peers.py --smoke                          (tiny OPT on the CPU: checks the script)

Peers:
  - transformers `generate` with its dynamic cache, and with its offloaded cache (each layer's KV
    in CPU memory between uses), batched at the largest batch that fits the cap;
  - FlexGen (PyPI `flexgen`, OPT only, dummy weights, its KV on the CPU: --percent 100 0 0 100 100 0),
    run as its own process; a row says why when it cannot run (not installed, no network for
    its tokenizer, ...);
  - PipeMax on the same OPT shape with random weights, offload off and auto.
FlexGen's memory use is set by its placement policy, not capped; the cap applies to the others.
Prints a table, writes JSON (--json), and plots generated tokens/s against the cap (--plot, needs
matplotlib; without it the plot is skipped with a note).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_throughput import (  # noqa: E402
    MODEL_SHAPES,
    Result,
    free_memory,
    make_workload,
    run_pipemax,
    run_transformers,
    set_memory_cap,
)

FLEXGEN_MODELS = {"opt-6.7b": "facebook/opt-6.7b"}


def run_flexgen(args, num_prompts: int, input_len: int, output_len: int) -> Result:
    """FlexGen in a process of its own; a Result with zero tokens and the reason when it cannot run."""
    if importlib.util.find_spec("flexgen") is None:
        return Result("flexgen", 0.0, 0, 0, "not installed (pip install flexgen)")
    if args.model not in FLEXGEN_MODELS:
        return Result("flexgen", 0.0, 0, 0, f"FlexGen runs OPT checkpoints by name; no name for {args.model}")
    batch = min(num_prompts, 32)
    command = [sys.executable, "-m", "flexgen.flex_opt", "--model", FLEXGEN_MODELS[args.model], "--path", "_DUMMY_",
               "--percent", "100", "0", "0", "100", "100", "0", "--gpu-batch-size", str(batch),
               "--num-gpu-batches", str(max(1, num_prompts // batch)), "--prompt-len", str(input_len),
               "--gen-len", str(output_len)]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.flexgen_timeout)
    except subprocess.TimeoutExpired:
        return Result("flexgen", 0.0, 0, 0, f"did not finish in {args.flexgen_timeout} s")
    output = done.stdout + done.stderr
    match = re.search(r"decode throughput:\s*([0-9.]+)\s*token/s", output)
    total = re.search(r"total throughput:\s*([0-9.]+)\s*token/s", output)
    if done.returncode != 0 or not match:
        reason = (output.strip().splitlines() or ["no output"])[-1][:160]
        return Result("flexgen", 0.0, 0, 0, f"failed (exit {done.returncode}): {reason}")
    generated = batch * max(1, num_prompts // batch) * output_len
    seconds = generated / float(total.group(1)) if total else time.perf_counter() - started
    return Result("flexgen", seconds, generated, generated + generated // output_len * input_len,
                  f"its own figures: decode {float(match.group(1)):.1f} tok/s")


def report_row(cap: float, result: Result) -> None:
    """Each row as it finishes (stderr): a run cut short by a timeout still shows what it measured."""
    rate = result.generated_per_s if result.seconds else 0.0
    print(f"[{cap:g} GiB] {result.system}: {rate:.1f} generated tok/s  {result.note}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="opt-6.7b", choices=sorted(MODEL_SHAPES))
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--caps", default="16,24,32", help="memory caps in GiB, comma-separated")
    parser.add_argument("--flexgen-timeout", type=int, default=240)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path, help="PNG of generated tokens/s against the cap")
    parser.add_argument("--smoke", action="store_true", help="tiny OPT on the CPU: checks the script")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.num_prompts, args.input_len, args.output_len, args.caps = "opt-tiny", 6, 20, 6, "1"
    device = torch.device("cuda") if torch.cuda.is_available() and not args.smoke else torch.device("cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32  # FlexGen's dtype
    vocab = MODEL_SHAPES[args.model]["vocab_size"]
    workload = make_workload("fixed", args.num_prompts, args.input_len, args.output_len, vocab, seed=0)
    rows = []
    for cap in [float(c) for c in args.caps.split(",")]:
        engine_args = Namespace(model=args.model, max_batch=256, max_batched_tokens=4096, memory_cap_gib=cap,
                                chunk_tokens=16, kv_cache_gib=0.01 if args.smoke else None,
                                host_memory_gib=0.05 if args.smoke else 64.0, cuda_graphs="on", peer_batch=None)
        set_memory_cap(device, cap)
        results = []
        for offload in ("off", "auto"):
            try:
                results.append(run_pipemax(engine_args, workload, device, dtype, "mixed", offload=offload))
            except (torch.OutOfMemoryError, RuntimeError, ValueError) as error:
                free_memory(device)
                results.append(Result(f"pipemax (offload {offload})", 0.0, 0, 0,
                                      f"failed: {str(error).splitlines()[0][:120]}"))
            report_row(cap, results[-1])
        for cache in ("dynamic", "offloaded"):
            if cache == "offloaded" and device.type != "cuda":
                results.append(Result("transformers generate, offloaded cache", 0.0, 0, 0, "needs a CUDA device"))
                continue
            try:
                results.append(run_transformers(engine_args, workload, device, dtype, cache))
            except (torch.OutOfMemoryError, RuntimeError, ValueError) as error:
                free_memory(device)
                results.append(Result(f"transformers generate, {cache} cache", 0.0, 0, 0,
                                      f"failed: {str(error).splitlines()[0][:120]}"))
            report_row(cap, results[-1])
        results.append(run_flexgen(args, len(workload), args.input_len, args.output_len))  # its own process
        report_row(cap, results[-1])
        rows += [{"cap_gib": cap, **r.__dict__, "generated_per_s": r.generated_per_s if r.seconds else 0.0}
                 for r in results]
        if args.json:  # after every cap: a run cut short keeps what it measured
            args.json.write_text(json.dumps({"model": args.model, "rows": rows}, indent=1))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke)" if args.smoke else "CPU"
    print(f"device: {name}; model {args.model} ({dtype}), {len(workload)} x {args.input_len} in / {args.output_len} out")
    print(f"{'cap GiB':>7}  {'system':<44} {'gen tok/s':>10} {'vs transformers':>15} {'vs FlexGen':>10}  note")
    for cap in sorted({row["cap_gib"] for row in rows}):
        at_cap = [row for row in rows if row["cap_gib"] == cap]
        peers = [next((r["generated_per_s"] for r in at_cap if r["system"] == name), 0.0)
                 for name in ("transformers generate", "flexgen")]
        for row in at_cap:
            ratios = [f"{row['generated_per_s'] / peer:.2f}x" if peer and row["generated_per_s"] else "-"
                      for peer in peers]
            print(f"{cap:>7g}  {row['system']:<44} {row['generated_per_s']:>10.1f} {ratios[0]:>15} {ratios[1]:>10}  "
                  f"{row['note']}")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "model": args.model, "rows": rows}, indent=1))
    if args.plot:
        plot(rows, args.plot, name)
    return 0


def plot(rows: list[dict], path: Path, device: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no plot: matplotlib is not installed (pip install matplotlib), {path} not written")
        return
    figure, axes = plt.subplots(figsize=(7, 4))
    for system in dict.fromkeys(row["system"] for row in rows):
        points = sorted((r["cap_gib"], r["generated_per_s"]) for r in rows if r["system"] == system and r["seconds"])
        if points:
            axes.plot(*zip(*points), marker="o", label=system)
    axes.set_xlabel("memory cap (GiB)")
    axes.set_ylabel("generated tokens/s")
    axes.set_title(f"peers on {device}")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
