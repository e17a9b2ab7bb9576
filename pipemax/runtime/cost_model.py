"""The step cost model: how long a micro-batch's step takes on a stage, from what it carries.

    T = alpha * batch_tokens + beta * context_tokens + delta

batch_tokens are the tokens the step computes (decodes + prefill pieces: the matmuls),
context_tokens the KV positions its attention reads (the sequences' lengths), delta the fixed
part (reading the weights, launches). It is fitted by least squares over a window of the
engine's own measured steps and refitted as steps come in, seeded from a saved profile when one
exists. Each prediction is scored against the step's measurement before that step joins the fit,
so the reported error is the model's error on steps it had not seen.

Saved profiles: after a run the engine saves its fit (save_step_costs) under a key naming what
the step time depends on (the GPU, the model's shape, dtype, stage split, kernels); the next
engine with the same key starts from it (load_step_costs), so offload=auto has a budget from its
first steps instead of after the first few. The files live in $PIPEMAX_PROFILES, by default
~/.cache/pipemax/profiles (or $PIPEMAX_CACHE/profiles).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections import deque
from pathlib import Path

import torch

log = logging.getLogger("pipemax")
PROFILE_KIND = "pipemax step costs"


class StepCostModel:
    def __init__(self, window: int = 512, refit_every: int = 16,
                 seed: tuple[float, float, float] | None = None):
        self.samples: deque[tuple[int, int, float]] = deque(maxlen=window)
        self.refit_every = refit_every
        self.coefficients = seed  # (alpha, beta, delta) in seconds
        self._since_fit = 0
        self.fits = 0  # fits made from this model's own measured steps
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
        # The first fit as soon as there are 3 steps (a seed from a saved profile included: it
        # only stands in until the run's own steps speak), then every refit_every steps.
        if self._since_fit >= self.refit_every or (not self.fits and len(self.samples) >= 3):
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
        self.fits += 1

    def mean_error(self) -> float | None:
        """Mean relative error of the predictions made so far (None before the first)."""
        return sum(self.abs_errors) / len(self.abs_errors) if self.abs_errors else None

    def stats(self) -> dict:
        alpha, beta, delta = self.coefficients or (None, None, None)
        return {"alpha_s_per_token": alpha, "beta_s_per_context_token": beta, "delta_s": delta,
                "samples": len(self.samples), "mean_relative_error": self.mean_error()}


def profiles_dir() -> Path:
    from pipemax.models.default_model import cache_dir

    return Path(os.environ.get("PIPEMAX_PROFILES", cache_dir() / "profiles"))


def step_costs_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return profiles_dir() / f"step-costs-{digest}.json"


def load_step_costs(key: dict) -> tuple[tuple[float, float, float] | None, Path]:
    """(alpha, beta, delta) saved for this key, or None (no file, another key, a damaged file:
    the engine then learns from its own steps); and the file's path."""
    path = step_costs_path(key)
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        return None, path
    except (OSError, ValueError) as error:
        log.warning("ignoring the step-cost profile %s: %s", path, error)
        return None, path
    if not isinstance(saved, dict) or saved.get("kind") != PROFILE_KIND or saved.get("key") != key:
        log.warning("ignoring the step-cost profile %s: it was saved for another setup", path)
        return None, path
    coefficients = saved.get("coefficients")
    if (not isinstance(coefficients, list) or len(coefficients) != 3
            or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) and c >= 0
                       for c in coefficients)):
        log.warning("ignoring the step-cost profile %s: its coefficients are not three costs >= 0", path)
        return None, path
    return tuple(float(c) for c in coefficients), path


def save_step_costs(model: StepCostModel, key: dict) -> Path | None:
    """Saves a fit learned from at least a few measured steps (atomically: a reader never sees
    half a file). A failure to write costs the next run only its head start: logged, not raised."""
    if model.coefficients is None or not model.fits:  # a seed alone has learned nothing here
        return None
    path = step_costs_path(key)
    record = {"kind": PROFILE_KIND, "key": key, "coefficients": list(model.coefficients),
              "samples": len(model.samples), "mean_relative_error": model.mean_error()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(record, indent=1))
        os.replace(temporary, path)
    except OSError as error:
        log.warning("could not save the step-cost profile %s: %s", path, error)
        return None
    return path
