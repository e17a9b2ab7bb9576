"""Sampling parameters and the sampler.

Sampling runs on the device without host round trips (sample_on_device). A seeded request draws
its noise from Philox keyed by its seed and step (row_seed), on the device, so it produces the
same tokens whatever else shares its batch. Logprobs are those of the
model's distribution (log-softmax of the raw logits) for the chosen token.

Penalties, applied to the logits before the choice (greedy included):
  repetition_penalty  tokens in prompt or output: positive logits divided by it, negative multiplied
                      (as transformers and vLLM)
  presence_penalty    subtracted once from every token already in the output (OpenAI)
  frequency_penalty   subtracted once per occurrence in the output (OpenAI)
  min_tokens          EOS and stop_token_ids are blocked until that many tokens were generated
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from pipemax import kernels

MAX_TOP_LOGPROBS = 20  # the OpenAI API's limit


class SamplingParamsError(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param  # the field at fault


SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


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
    top_logprobs: int = 0  # and that many most likely alternatives at each position (with logprobs)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) and self.stop is not None:
            raise SamplingParamsError(f"stop must be a string or a list of strings, got {self.stop!r}", "stop")
        if not isinstance(self.stop_token_ids, (list, tuple)) and self.stop_token_ids is not None:
            raise SamplingParamsError(f"stop_token_ids must be a list of integers, got {self.stop_token_ids!r}",
                                      "stop_token_ids")
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        checks = [
            ("max_tokens", _is_int(self.max_tokens) and self.max_tokens >= 1,
             f"max_tokens must be an integer >= 1, got {self.max_tokens!r}"),
            ("temperature", _is_number(self.temperature) and self.temperature >= 0,
             f"temperature must be a number >= 0, got {self.temperature!r}"),
            ("top_p", _is_number(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}"),
            ("top_k", _is_int(self.top_k) and self.top_k >= 0,
             f"top_k must be -1, 0 or a positive integer, got {self.top_k!r}"),
            ("seed", self.seed is None or (_is_int(self.seed) and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]),
             f"seed must be an integer in [-2**63, 2**64 - 1], got {self.seed!r}"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "stop must be a string or a list of non-empty strings"),
            ("stop_token_ids", all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
             "stop_token_ids must be non-negative integers"),
            ("ignore_eos", isinstance(self.ignore_eos, bool), f"ignore_eos must be true or false, got {self.ignore_eos!r}"),
            ("logprobs", isinstance(self.logprobs, bool), f"logprobs must be true or false, got {self.logprobs!r}"),
            ("presence_penalty", _is_number(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}"),
            ("frequency_penalty", _is_number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}"),
            ("repetition_penalty", _is_number(self.repetition_penalty) and self.repetition_penalty > 0,
             f"repetition_penalty must be > 0, got {self.repetition_penalty!r}"),
            ("top_logprobs", _is_int(self.top_logprobs) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
             f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs!r}"),
            ("min_tokens", _is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens,
             f"min_tokens must be an integer in [0, max_tokens], got {self.min_tokens!r}"),
        ]
        for name, ok, message in checks:
            if not ok:
                raise SamplingParamsError(message, name)
        if self.top_logprobs:
            self.logprobs = True

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1 or self.min_tokens)


def device_tensor(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list on the device without a synchronisation: a pageable copy would wait for the
    device to drain (and so for another micro-batch in flight); a pinned one is queued."""
    tensor = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams],
                    token_histories: list[tuple[list[int] | torch.Tensor, list[int]]],
                    blocked_token_ids: set[int]) -> torch.Tensor:
    """Logits with each row's penalties applied (a copy when any row has one), as tensor
    operations over the rows that have penalties: one upload of their outputs and settings.

    token_histories: (prompt ids, as a list or an int64 tensor on the logits' device, output ids)
    per row; blocked_token_ids: EOS ids, which with each row's stop_token_ids stay blocked until
    min_tokens are out."""
    rows = [row for row, p in enumerate(params) if p.has_penalties]
    if not rows:
        return logits
    logits = logits.clone()
    device, vocab = logits.device, logits.shape[1]
    # One packed upload: per penalised row its settings, then (row, token) pairs of its outputs
    # and of what min_tokens still blocks.
    settings, output_pairs, blocked_pairs = [], [], []
    for index, row in enumerate(rows):
        p, output = params[row], token_histories[row][1]
        settings += [p.repetition_penalty, p.frequency_penalty, p.presence_penalty]
        output_pairs += [(index, token) for token in output if token < vocab]
        if len(output) < p.min_tokens:
            blocked_pairs += [(index, token) for token in blocked_token_ids | set(p.stop_token_ids) if token < vocab]
    values = device_tensor(settings, torch.float32, device).view(len(rows), 3)
    repetition, frequency, presence = values[:, 0:1], values[:, 1:2], values[:, 2:3]
    pairs = device_tensor([v for pair in output_pairs + blocked_pairs for v in pair] or [0, 0], torch.int64, device)
    pairs = pairs.view(-1, 2)
    outputs, blocked = pairs[:len(output_pairs)], pairs[len(output_pairs):len(output_pairs) + len(blocked_pairs)]
    selected = logits[device_tensor(rows, torch.int64, device)] if len(rows) < len(params) else logits
    counts = torch.zeros(len(rows), vocab, dtype=torch.float32, device=device)
    counts.index_put_((outputs[:, 0], outputs[:, 1]), torch.ones(len(output_pairs), device=device), accumulate=True)
    if any(params[row].repetition_penalty != 1 for row in rows):
        seen = counts > 0
        prompts = [(index, token_histories[row][0]) for index, row in enumerate(rows)
                   if params[row].repetition_penalty != 1]
        prompt_ids = [ids if isinstance(ids, torch.Tensor) else device_tensor(list(ids), torch.int64, device)
                      for _, ids in prompts]
        lengths = device_tensor([len(ids) for ids in prompt_ids], torch.int64, device)
        prompt_rows = torch.repeat_interleave(device_tensor([index for index, _ in prompts], torch.int64, device),
                                              lengths, output_size=sum(len(ids) for ids in prompt_ids))
        prompt_ids = torch.cat(prompt_ids)
        # Ids past the vocabulary (added tokens the model has no logit for) land in a spare
        # column, dropped after: a boolean filter would cost a synchronisation.
        marked = torch.zeros(len(rows), vocab + 1, dtype=torch.bool, device=device)
        marked[prompt_rows, torch.where(prompt_ids < vocab, prompt_ids, vocab)] = True
        seen |= marked[:, :vocab]
        selected = torch.where(seen, torch.where(selected > 0, selected / repetition, selected * repetition), selected)
    selected = selected - frequency * counts - presence * (counts > 0)
    selected[blocked[:, 0], blocked[:, 1]] = float("-inf")
    if len(rows) < len(params):
        logits[device_tensor(rows, torch.int64, device)] = selected
        return logits
    return selected


MASK64 = 2**64 - 1


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & MASK64
    return value ^ (value >> 31)


def row_seed(seed: int, step: int) -> int:
    """The Philox key of a seeded request's draw at `step` (the tokens it has generated so far):
    a 64-bit mix of both (splitmix64), so that nearby seeds and steps give unrelated streams and
    the draw depends on nothing else in the batch."""
    return _splitmix64(_splitmix64(seed & MASK64) ^ step) & (2**63 - 1)


SampledOnDevice = tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]


def sample(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int],
           processed_logits: torch.Tensor | None = None,
           ) -> tuple[list[int], list[float] | None, list[list[tuple[int, float]]] | None]:
    """sample_on_device, read back to the host (a synchronisation: the engine defers it)."""
    return to_host(sample_on_device(logits, params, seeds, processed_logits), params)


def sample_on_device(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int],
                     processed_logits: torch.Tensor | None = None,
                     greedy_ids: torch.Tensor | None = None) -> SampledOnDevice:
    """logits [n, vocab] float32 -> (chosen token per row [n] int64, their logprobs [n] if any row
    asks, and (values, ids) [n, k] of the top alternatives if any row asks), all on the device.

    Random rows are drawn with the Gumbel-max trick: argmax(logits / temperature + G), G Gumbel
    noise from Philox keyed by the row's seed (row_seed for a seeded request, a fresh one per step
    otherwise: `seeds`, one per row, ignored for greedy rows), drawn on the device
    (kernels.gumbel_noise). No softmax, and no sort of the vocabulary unless a row asks for top-p
    (top-k alone takes the k largest). The choice is made on processed_logits (penalties applied)
    when given; logprobs always come from the raw logits. greedy_ids: the raw logits' argmax when
    already computed (inside a decode graph).
    """
    logits = logits.float()
    raw_logits = logits
    if processed_logits is not None:
        logits = processed_logits.float()
    if greedy_ids is not None and processed_logits is None:
        chosen = greedy_ids.clone()  # (a graph's static output: random rows are written below)
    else:
        chosen = logits.argmax(dim=-1)
    random_rows = [row for row, p in enumerate(params) if not p.greedy]
    if random_rows:
        device, vocab = logits.device, logits.shape[1]
        rows = device_tensor(random_rows, torch.int64, device)
        settings = device_tensor([[float(params[r].temperature), float(params[r].top_p),
                                   float(min(params[r].top_k or vocab, vocab))] for r in random_rows],
                                 torch.float32, device)
        temperature, top_p, top_k = settings[:, 0:1], settings[:, 1:2], settings[:, 2:3].long()
        scaled = logits[rows] / temperature
        if any(params[r].top_p < 1 for r in random_rows):
            scaled = _top_k_top_p(scaled, top_k, top_p)
        elif any(0 < params[r].top_k < vocab for r in random_rows):
            most = max(params[r].top_k for r in random_rows if 0 < params[r].top_k < vocab)
            largest = scaled.topk(most, dim=-1).values  # [rows, most], descending
            threshold = largest.gather(1, (top_k.clamp(max=most) - 1))
            threshold = torch.where(top_k < vocab, threshold, float("-inf"))  # no limit: keep all
            scaled = scaled.masked_fill(scaled < threshold, float("-inf"))
        noise_seeds = device_tensor([seeds[r] for r in random_rows], torch.int64, device)
        noise = kernels.gumbel_noise(noise_seeds, vocab) if device.type == "cuda" else \
            kernels.gumbel_noise_ref(noise_seeds, vocab)
        chosen[rows] = (scaled + noise).argmax(dim=-1)
    if not any(p.logprobs for p in params):
        return chosen, None, None
    all_logprobs = torch.log_softmax(raw_logits, dim=-1)
    logprobs = all_logprobs.gather(1, chosen[:, None]).squeeze(1)
    most = max(p.top_logprobs for p in params)
    if not most:
        return chosen, logprobs, None
    return chosen, logprobs, all_logprobs.topk(most, dim=-1)


def _top_k_top_p(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Logits outside each row's top-k, and outside the smallest prefix (by probability) whose
    mass reaches its top_p (the top token always stays), set to -inf: a full sort."""
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(scaled.shape[1], device=scaled.device)
    sorted_logits.masked_fill_(ranks[None, :] >= top_k, float("-inf"))
    sorted_probs = sorted_logits.softmax(dim=-1)
    sorted_logits.masked_fill_(sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p, float("-inf"))
    return torch.empty_like(scaled).scatter_(1, order, sorted_logits)


def to_host(sampled: SampledOnDevice, params: list[SamplingParams]):
    """(tokens, logprobs, top alternatives per row) as Python lists."""
    chosen, logprobs, top = sampled
    tokens = chosen.tolist()
    if logprobs is None:
        return tokens, None, None
    logprobs = logprobs.tolist()
    if top is None:
        return tokens, logprobs, None
    values, ids = top[0].tolist(), top[1].tolist()
    return tokens, logprobs, [list(zip(ids[row][: p.top_logprobs], values[row][: p.top_logprobs]))
                              for row, p in enumerate(params)]
