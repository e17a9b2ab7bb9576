"""Request shapes for planning and benchmarks: (prompt tokens, output tokens) per request.

Synthetic workloads have log-normal lengths around their means: ShareGPT conversations (344 in,
237 out) and LongBench documents (2,700 in, 100 out), published means with a wide spread (sigma
0.6), and decode-heavy work (512 in, 2,048 out: long generations from short prompts, where KV
capacity limits the batch), narrowly spread (sigma 0.1) so that requests do not all finish
together. A JSONL file gives a real job's shapes: each line either {"prompt_tokens": N,
"output_tokens": M}, or an OpenAI batch request whose prompt is counted with the model's
tokenizer (about 4 characters a token without one) and whose output is its max_tokens /
max_completion_tokens.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

# (mean input, mean output) tokens, sigma of their logarithms, longest output
SYNTHETIC = {"sharegpt": (344, 237, 0.6, 1024), "longbench": (2700, 100, 0.6, 1024),
             "decode-heavy": (512, 2048, 0.1, 4096)}
DEFAULT_OUTPUT_TOKENS = 256  # for a request that names no max_tokens (the plan says how many did)


class WorkloadError(ValueError):
    pass


def synthetic_lengths(kind: str, num_prompts: int, seed: int = 0) -> list[tuple[int, int]]:
    """[(prompt tokens, output tokens)], seeded."""
    if kind not in SYNTHETIC:
        raise WorkloadError(f"unknown workload {kind!r}: use {', '.join(SYNTHETIC)} or a .jsonl file")
    generator = torch.Generator().manual_seed(seed)
    mean_in, mean_out, sigma, longest_output = SYNTHETIC[kind]

    def lognormal(mean, low, high):
        mu = math.log(mean) - sigma**2 / 2
        values = torch.empty(num_prompts).log_normal_(mu, sigma, generator=generator)
        return [int(min(max(v, low), high)) for v in values.tolist()]

    return list(zip(lognormal(mean_in, 4, 7000), lognormal(mean_out, 1, longest_output)))


def lengths_from_jsonl(path: Path, tokenizer=None) -> tuple[list[tuple[int, int]], int]:
    """The file's request shapes, and how many requests named no output length (counted as
    DEFAULT_OUTPUT_TOKENS)."""
    shapes, defaulted = [], 0
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise WorkloadError(f"cannot read the workload {path}: {error.strerror or error}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise WorkloadError(f"{path} line {number}: not JSON") from None
        if not isinstance(record, dict):
            raise WorkloadError(f"{path} line {number}: not a JSON object")
        if "prompt_tokens" in record:
            prompt, output = record.get("prompt_tokens"), record.get("output_tokens")
        else:
            body = record.get("body") if isinstance(record.get("body"), dict) else record
            prompt = _count_prompt(body, tokenizer)
            output = body.get("max_completion_tokens") or body.get("max_tokens")
            if output is None:
                output, defaulted = DEFAULT_OUTPUT_TOKENS, defaulted + 1
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (prompt, output)):
            raise WorkloadError(f"{path} line {number}: needs a prompt and an output of at least one token "
                                f"(got {prompt!r}, {output!r})")
        shapes.append((prompt, output))
    if not shapes:
        raise WorkloadError(f"{path} holds no requests")
    return shapes, defaulted


def _count_prompt(body: dict, tokenizer) -> int | None:
    messages, prompt = body.get("messages"), body.get("prompt")
    if isinstance(messages, list):
        text = "\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in messages)
    elif isinstance(prompt, str):
        text = prompt
    elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return len(prompt)
    else:
        return None
    if tokenizer is not None:
        return max(1, len(tokenizer(text)["input_ids"]))
    return max(1, round(len(text) / 4))
