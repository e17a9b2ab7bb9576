"""fp8 KV accuracy against the model's-dtype KV on a real model (the bundled SmolLM2-135M by default).

    python bench/bench_fp8_accuracy.py                                   (32 prompts, 48 tokens, e4m3 and e5m2)
    python bench/bench_fp8_accuracy.py --kv-cache-dtype fp8 --output-len 96 --chunk-tokens 8
    python bench/bench_fp8_accuracy.py --smoke                           (4 prompts, 8 tokens: checks the script)

For each prompt (a fixed set of 32 chat prompts), the model's-dtype KV first generates a greedy
continuation. Then, with each KV dtype:
  * teacher-forced: the prompt is prefilled and the reference continuation fed back one token a
    step (decode steps, as the engine runs them), and the next-token distribution at every step
    compared with the model's-dtype KV run: top-1 agreement, and the mean KL(reference || fp8)
    per token in nats;
  * free-running: the engine (LLM.generate, greedy) with that KV dtype; continuations identical
    to the reference, and the mean length of the identical prefix.
The model's own dtype is float32 on the CPU (bfloat16 on a GPU unless --dtype says otherwise).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipemax import LLM, SamplingParams  # noqa: E402
from pipemax.core.kv_dtype import kv_storage_name  # noqa: E402
from pipemax.core.kv_manager import KVManager  # noqa: E402
from pipemax.core.sequence import Sequence  # noqa: E402
from pipemax.core.step_plan import StagePlan  # noqa: E402
from pipemax.models import load_model  # noqa: E402
from pipemax.models.default_model import default_model_path  # noqa: E402
from pipemax.worker.kv_pool import KV_TORCH_DTYPES, KVPool, KVPoolSpec  # noqa: E402
from pipemax.worker.model_runner import ModelRunner  # noqa: E402

PROMPTS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis in one sentence.",
    "List three uses of a paperclip.", "What is 17 times 23?", "Translate 'good morning' into Spanish.",
    "Give me a tip for learning to code.", "Why is the sky blue?", "Name a famous painting and its painter.",
    "Summarise the plot of Romeo and Juliet.", "What does a CPU do?", "Suggest a name for a pet turtle.",
    "How do I boil an egg?", "What is the difference between weather and climate?", "Write a limerick about a cat.",
    "Describe the taste of lemon.", "What causes earthquakes?", "Give two synonyms for happy.",
    "How many legs does a spider have?", "What is machine learning?", "Write a short thank-you note to a teacher.",
    "What year did the first person walk on the moon?", "Explain what a prime number is.",
    "Recommend a book for a long flight.", "What is the boiling point of water in Fahrenheit?",
    "How do bees make honey?", "Write one sentence that uses the word 'serendipity'.",
    "What are the three states of matter?", "Give a fun fact about octopuses.", "What is an API?",
    "How can I save energy at home?", "Describe a sunset in two sentences.",
]


def chat_ids(tokenizer, prompt: str) -> list[int]:
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def greedy(model_path: str, prompts: list[list[int]], output_len: int, kv_cache_dtype: str, dtype: str,
           chunk_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    with LLM(model=model_path, kv_cache_dtype=kv_cache_dtype, dtype=dtype, chunk_tokens=chunk_tokens,
             prefix_caching=False) as llm:
        return [output.token_ids for output in llm.generate(prompts, params, use_tqdm=False)]


def teacher_forced_log_probs(model, prompts: list[list[int]], continuations: list[list[int]], kv_cache_dtype: str,
                             chunk_tokens: int, backend: str) -> torch.Tensor:
    """Log-probabilities [prompts, steps, vocab] of the next token after the prompt and after each
    fed-back continuation token but the last: a prefill step, then one decode step per token."""
    config, device = model.config, next(model.parameters()).device
    model_dtype = next(model.parameters()).dtype
    kv_dtype = KV_TORCH_DTYPES[kv_storage_name(kv_cache_dtype, str(model_dtype).removeprefix("torch."))]
    spec = KVPoolSpec(model.num_stage_layers, config.num_kv_heads, config.head_dim, chunk_tokens, model_dtype, kv_dtype)
    chunks = sum(-(-(len(p) + len(c)) // chunk_tokens) for p, c in zip(prompts, continuations))
    pool = KVPool(spec, chunks, 0, device, backend)
    kv = KVManager(chunks, 0, chunk_tokens)
    runner = ModelRunner(model, pool, kv, backend)
    sequences = [Sequence(index, prompt + continuation, SamplingParams())
                 for index, (prompt, continuation) in enumerate(zip(prompts, continuations))]
    steps = []
    # (start, count) per sequence: the whole prompt, then one fed-back token a step
    schedule = [[(0, len(p))] + [(len(p) + t, 1) for t in range(len(c) - 1)] for p, c in zip(prompts, continuations)]
    for step in range(len(schedule[0])):
        pieces = [(seq, *schedule[index][step]) for index, seq in enumerate(sequences)]
        for seq, start, count in pieces:
            if start == 0:
                kv.allocate(seq.seq_id, count)
            else:
                kv.append(seq.seq_id, count)
        num_decode = sum(count == 1 and start > 0 for _, start, count in pieces)
        stage_plan = StagePlan(0, [], [seq.seq_id for seq, _, _ in pieces], [start for _, start, _ in pieces],
                               [count for _, _, count in pieces], num_decode, [True] * len(pieces),
                               [t for seq, start, count in pieces for t in seq.token_ids[start:start + count]])
        input_ids, positions, meta, _ = runner.build_batch(stage_plan)
        with torch.inference_mode():
            hidden = model(input_ids, positions, runner.attention, meta)
            last_rows = torch.tensor(stage_plan.sample_rows(), device=hidden.device)
            logits = model.compute_logits(hidden[last_rows]).float()
        steps.append(torch.log_softmax(logits, dim=-1).cpu())
    return torch.stack(steps, dim=1)


def compare(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    agreement = (reference.argmax(-1) == candidate.argmax(-1)).float().mean().item()
    kl = (reference.exp() * (reference - candidate)).sum(-1).mean().item()
    return {"top1_agreement": agreement, "mean_kl_nats": kl}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--kv-cache-dtype", default="fp8_e4m3,fp8_e5m2", help="comma-separated KV dtypes to compare")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=48)
    parser.add_argument("--chunk-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="auto", help="the model's dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--backend", default=None, help="triton | torch (default: triton on CUDA, torch on CPU)")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    parser.add_argument("--smoke", action="store_true", help="4 prompts, 8 tokens")
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_prompts, args.output_len = 4, 8
    model_path = args.model or str(default_model_path())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    backend = args.backend or ("triton" if device == "cuda" else "torch")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts = [chat_ids(tokenizer, text) for text in (PROMPTS * 2)[:args.num_prompts]]
    started = time.perf_counter()
    reference = greedy(model_path, prompts, args.output_len, "auto", dtype, args.chunk_tokens)
    model = load_model(model_path, device=torch.device(device), dtype=getattr(torch, dtype))
    reference_log_probs = teacher_forced_log_probs(model, prompts, reference, "auto", args.chunk_tokens, backend)
    figures = {"model": Path(model_path).name, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "dtype": dtype, "prompts": len(prompts), "output_len": args.output_len,
               "chunk_tokens": args.chunk_tokens, "kv": {}}
    # The model's-dtype KV against itself: the harness's own noise floor (0 and 100% on the CPU).
    for kv_cache_dtype in ["auto"] + args.kv_cache_dtype.split(","):
        log_probs = teacher_forced_log_probs(model, prompts, reference, kv_cache_dtype, args.chunk_tokens, backend)
        free_running = greedy(model_path, prompts, args.output_len, kv_cache_dtype, dtype, args.chunk_tokens)
        same_prefix = [next((i for i, (a, b) in enumerate(zip(ref, out)) if a != b), len(ref))
                       for ref, out in zip(reference, free_running)]
        figures["kv"][kv_cache_dtype] = {
            **compare(reference_log_probs, log_probs),
            "exact_greedy_matches": sum(out == ref for out, ref in zip(free_running, reference)),
            "mean_identical_prefix_tokens": sum(same_prefix) / len(same_prefix),
        }
    figures["seconds"] = round(time.perf_counter() - started, 1)
    print(f"{figures['model']} on {figures['device']}, {dtype} model, {len(prompts)} prompts x {args.output_len} "
          f"tokens, chunks of {args.chunk_tokens}")
    print(f"{'KV dtype':<10} {'top-1 agree':>11} {'mean KL':>10} {'exact greedy':>13} {'same prefix':>12}")
    for name, row in figures["kv"].items():
        print(f"{name:<10} {row['top1_agreement']:>10.2%} {row['mean_kl_nats']:>10.5f} "
              f"{row['exact_greedy_matches']:>6}/{len(prompts):<6} {row['mean_identical_prefix_tokens']:>11.1f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
