"""Sampling parameters and the sampler.

Seeded requests draw from their own torch.Generator, one draw per generated token, so a request
with a seed produces the same tokens whatever else shares its batch. Logprobs are those of the
model's distribution (log-softmax of the raw logits) for the chosen token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class SamplingParamsError(ValueError):
    pass


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = no limit
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # generation stops before the first match
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False  # keep going past EOS (benchmarks)
    logprobs: bool = False  # return the logprob of each chosen token

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, f"max_tokens must be an integer >= 1, got {self.max_tokens!r}"),
            (isinstance(self.temperature, (int, float)) and self.temperature >= 0, f"temperature must be >= 0, got {self.temperature!r}"),
            (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}"),
            (isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be -1, 0 or a positive integer, got {self.top_k!r}"),
            (self.seed is None or isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be a string or a list of non-empty strings"),
            (all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids must be non-negative integers"),
        ]
        for ok, message in checks:
            if not ok:
                raise SamplingParamsError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.seed is None:
        return None
    return torch.Generator().manual_seed(params.seed)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           batch_generator: torch.Generator) -> tuple[list[int], list[float] | None]:
    """logits [n, vocab] float32 -> chosen token per row, and their logprobs if any row asks."""
    logits = logits.float()
    chosen = logits.argmax(dim=-1)
    for row, (p, generator) in enumerate(zip(params, generators)):
        if p.greedy:
            continue
        # One row at a time on the CPU: a seeded request's draw must not depend on its batch.
        row_logits = logits[row].cpu() / p.temperature
        if p.top_k:
            kth = torch.topk(row_logits, min(p.top_k, row_logits.shape[0])).values[-1]
            row_logits = row_logits.masked_fill(row_logits < kth, float("-inf"))
        probs = row_logits.softmax(dim=-1)
        if p.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
            outside = sorted_probs.cumsum(0) - sorted_probs >= p.top_p
            sorted_probs[outside] = 0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        chosen[row] = torch.multinomial(probs, 1, generator=generator or batch_generator).item()
    tokens = chosen.tolist()
    if not any(p.logprobs for p in params):
        return tokens, None
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, chosen[:, None].to(logits.device)).squeeze(1)
    return tokens, logprobs.tolist()
