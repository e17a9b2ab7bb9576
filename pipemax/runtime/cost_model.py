"""The step cost model: how long a micro-batch's step takes on a stage, from what it carries.

    T = alpha * batch_tokens + beta * context_tokens + delta

batch_tokens are the tokens the step computes (decodes + prefill pieces: the matmuls),
context_tokens the KV positions its attention reads (the sequences' lengths), delta the fixed
part (reading the weights, launches). It is fitted by least squares over a window of the
engine's own measured steps and refitted as steps come in, seeded from a saved profile when one
exists. Each prediction is scored against the step's measurement before that step joins the fit,
so the reported error is the model's error on steps it had not seen.
"""

from __future__ import annotations

from collections import deque

import torch


class StepCostModel:
    def __init__(self, window: int = 512, refit_every: int = 16,
                 seed: tuple[float, float, float] | None = None):
        self.samples: deque[tuple[int, int, float]] = deque(maxlen=window)
        self.refit_every = refit_every
        self.coefficients = seed  # (alpha, beta, delta) in seconds
        self._since_fit = 0
        self.abs_errors: deque[float] = deque(maxlen=window)  # |predicted - measured| / measured

    @property
    def ready(self) -> bool:
        return self.coefficients is not None

    def predict(self, batch_tokens: int, context_tokens: int) -> float | None:
        if self.coefficients is None:
            return None
        alpha, beta, delta = self.coefficients
        return max(0.0, alpha * batch_tokens + beta * context_tokens + delta)

    def observe(self, batch_tokens: int, context_tokens: int, seconds: float) -> None:
        predicted = self.predict(batch_tokens, context_tokens)
        if predicted is not None and seconds > 0:
            self.abs_errors.append(abs(predicted - seconds) / seconds)
        self.samples.append((batch_tokens, context_tokens, seconds))
        self._since_fit += 1
        if self._since_fit >= self.refit_every or (self.coefficients is None and len(self.samples) >= 3):
            self.fit()

    def fit(self) -> None:
        """Least squares over the window, coefficients clipped at zero (a negative cost per token
        is noise). Too few or degenerate samples keep the last fit."""
        self._since_fit = 0
        if len(self.samples) < 3:
            return
        data = torch.tensor(list(self.samples), dtype=torch.float64)
        design = torch.stack([data[:, 0], data[:, 1], torch.ones(len(data), dtype=torch.float64)], dim=1)
        target = data[:, 2:3]
        # Scale the columns so tokens (thousands) and the constant condition alike.
        scale = design.abs().amax(dim=0).clamp(min=1.0)
        solution = torch.linalg.lstsq(design / scale, target).solution.squeeze(1) / scale
        if not torch.isfinite(solution).all():
            return
        alpha, beta, delta = (max(0.0, float(value)) for value in solution)
        if alpha == beta == delta == 0.0:
            return
        self.coefficients = (alpha, beta, delta)

    def mean_error(self) -> float | None:
        """Mean relative error of the predictions made so far (None before the first)."""
        return sum(self.abs_errors) / len(self.abs_errors) if self.abs_errors else None

    def stats(self) -> dict:
        alpha, beta, delta = self.coefficients or (None, None, None)
        return {"alpha_s_per_token": alpha, "beta_s_per_context_token": beta, "delta_s": delta,
                "samples": len(self.samples), "mean_relative_error": self.mean_error()}
