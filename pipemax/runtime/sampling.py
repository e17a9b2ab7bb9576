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
    """logits [n, vocab] float32 -> chosen token per row, and their logprobs if any row asks.

    Random rows are filtered (temperature, top-k, top-p) in one batched pass and drawn with the
    exponential race: argmax(p / E), E ~ Exp(1), picks token i with probability p_i. A seeded row
    draws its E from its own generator, so its choice does not depend on the rest of the batch;
    the others share `batch_generator` (on the logits' device).
    """
    logits = logits.float()
    chosen = logits.argmax(dim=-1)
    random_rows = [row for row, p in enumerate(params) if not p.greedy]
    if random_rows:
        device, vocab = logits.device, logits.shape[1]
        rows = torch.tensor(random_rows, device=device)
        temperature = torch.tensor([params[r].temperature for r in random_rows], device=device)
        top_k = torch.tensor([params[r].top_k or vocab for r in random_rows], device=device)
        top_p = torch.tensor([params[r].top_p for r in random_rows], device=device)
        sorted_logits, order = (logits[rows] / temperature[:, None]).sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=device)
        sorted_logits.masked_fill_(ranks[None, :] >= top_k[:, None], float("-inf"))
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        sorted_probs.masked_fill_(sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p[:, None], 0.0)
        probs = torch.zeros_like(sorted_probs).scatter_(1, order, sorted_probs)
        noise = torch.empty_like(probs).exponential_(generator=batch_generator)
        for index, row in enumerate(random_rows):
            if generators[row] is not None:
                noise[index] = torch.empty(vocab).exponential_(generator=generators[row]).to(device)
        chosen[rows] = (probs / noise).argmax(dim=-1)
    tokens = chosen.tolist()
    if not any(p.logprobs for p in params):
        return tokens, None
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, chosen[:, None]).squeeze(1)
    return tokens, logprobs.tolist()
