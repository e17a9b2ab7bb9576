"""The sampler (SamplingParams, the request's side of it, lives in core/sampling_params.py).

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

import torch

from pipemax import kernels
from pipemax.core.sampling_params import SamplingParams


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
    """logits [n, vocab] (the model's dtype, or float32) -> (chosen token per row [n] int64, their logprobs [n] if any row
    asks, and (values, ids) [n, k] of the top alternatives if any row asks), all on the device.

    Random rows are drawn with the Gumbel-max trick: argmax(logits / temperature + G), G Gumbel
    noise from Philox keyed by the row's seed (row_seed for a seeded request, a fresh one per step
    otherwise: `seeds`, one per row, ignored for greedy rows), drawn on the device
    (kernels.gumbel_noise). No softmax, and no sort of the vocabulary unless a row asks for top-p
    (top-k alone takes the k largest). The choice is made on processed_logits (penalties applied)
    when given; logprobs always come from the raw logits. greedy_ids: the raw logits' argmax when
    already computed (inside a decode graph).
    """
    # No float32 copy of the whole batch's logits: greedy's argmax on the model's dtype chooses
    # what it would on their float32 copy (an exact upcast); random rows and logprobs upcast
    # what they compute with.
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
        scaled = logits[rows].float() / temperature
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
    all_logprobs = torch.log_softmax(raw_logits.float(), dim=-1)
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
