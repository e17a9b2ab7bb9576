"""The step cost model: how long a micro-batch's step takes on a stage, from what it carries.

    T = alpha * batch_tokens + beta * context_tokens + delta

batch_tokens are the tokens the step computes (decodes + prefill pieces: the matmuls),
context_tokens the KV positions its attention reads (the sequences' lengths), delta the fixed
part (reading the weights, launches). It is fitted by least squares over a window of the
engine's own measured steps and refitted as steps come in, seeded from a saved profile when one
exists. Each prediction is scored against the step's measurement before that step joins the fit,
so the reported error is the model's error on steps it had not seen. A seed is scored apart: one
whose predictions are off by more than SEED_ERROR_LIMIT was measured under other conditions (a
busy machine, another job beside it) and is dropped at once; the run's own steps then decide.

Plain Python (no torch): the fit is a three-unknown least squares, solved from its normal
equations. The engine saves a fit after a run and seeds the next from it (engine/step_costs.py).
"""

from __future__ import annotations

import math
from collections import deque

# A mean relative error above this (predictions off by more than the step time itself) is not a
# model of the step time: a seed that far off was measured under other conditions (another job
# beside it, another machine load) and is dropped.
SEED_ERROR_LIMIT = 1.0
# Fewer scored predictions than this say nothing about the model: no error is reported.
MIN_SCORED_STEPS = 8


class StepCostModel:
    def __init__(self, window: int = 512, refit_every: int = 16,
                 seed: tuple[float, float, float] | None = None):
        self.samples: deque[tuple[int, int, float]] = deque(maxlen=window)
        self.refit_every = refit_every
        self.coefficients = seed  # (alpha, beta, delta) in seconds
        self.seed_dropped = False
        self._since_fit = 0
        self.fits = 0  # fits made from this model's own measured steps
        self.abs_errors: deque[float] = deque(maxlen=window)  # |predicted - measured| / measured, own fits
        self.seed_errors: list[float] = []  # the same, of the seed's predictions (before the first own fit)

    @property
    def ready(self) -> bool:
        return self.coefficients is not None

    def predict(self, batch_tokens: int, context_tokens: int) -> float | None:
        if self.coefficients is None:
            return None
        alpha, beta, delta = self.coefficients
        return max(0.0, alpha * batch_tokens + beta * context_tokens + delta)

    def observe(self, batch_tokens: int, context_tokens: int, seconds: float) -> None:
        if not (math.isfinite(seconds) and seconds >= 0):
            return  # a clock that failed teaches nothing, and would block every later fit
        predicted = self.predict(batch_tokens, context_tokens)
        if predicted is not None and seconds > 0:
            error = abs(predicted - seconds) / seconds
            if self.fits:
                self.abs_errors.append(error)
            else:
                self._score_seed(error)
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
        columns = [[float(b) for b, _, _ in self.samples], [float(c) for _, c, _ in self.samples],
                   [1.0] * len(self.samples)]
        target = [float(s) for _, _, s in self.samples]
        # Scale the columns so tokens (thousands) and the constant condition alike.
        scale = [max(1.0, max(abs(value) for value in column)) for column in columns]
        scaled = [[value / factor for value in column] for column, factor in zip(columns, scale)]
        solution = _least_squares(scaled, target)
        if solution is None:
            return
        solution = [value / factor for value, factor in zip(solution, scale)]
        alpha, beta, delta = (max(0.0, value) for value in solution)
        if alpha == beta == delta == 0.0:
            return
        self.coefficients = (alpha, beta, delta)
        self.fits += 1

    def _score_seed(self, error: float) -> None:
        self.seed_errors.append(error)
        if self.seed_error() > SEED_ERROR_LIMIT and not self.seed_dropped:
            # Until the first fit of this run's own steps (3 steps), better no prediction than one
            # this far off: the scheduler and the prefetch budget do without, as with no seed.
            self.coefficients = None
            self.seed_dropped = True

    def seed_error(self) -> float | None:
        """Mean relative error of the seed's predictions on this run's first steps (None unseeded)."""
        return sum(self.seed_errors) / len(self.seed_errors) if self.seed_errors else None

    def mean_error(self) -> float | None:
        """Mean relative error of the predictions of this run's own fits, each made before its step
        joined the fit; None before MIN_SCORED_STEPS of them (too few to say anything)."""
        if len(self.abs_errors) < MIN_SCORED_STEPS:
            return None
        return sum(self.abs_errors) / len(self.abs_errors)

    def stats(self) -> dict:
        alpha, beta, delta = self.coefficients or (None, None, None)
        return {"alpha_s_per_token": alpha, "beta_s_per_context_token": beta, "delta_s": delta,
                "samples": len(self.samples), "mean_relative_error": self.mean_error(),
                "scored_steps": len(self.abs_errors), "seed_relative_error": self.seed_error(),
                "seed_dropped": self.seed_dropped}


def describe_step_time_model(stats: dict) -> str:
    """The run summary's words for the cost model's figures (StepCostModel.stats(), plus
    "seeded_from"): how far its predicted step times were from the measured ones. "" when too few
    steps were predicted to say."""
    error = stats.get("mean_relative_error")
    parts = []
    if error is not None:
        line = (f"step-time model: predicted step times were off by {error:.0%} on average "
                f"({stats['scored_steps']} steps, each predicted before it ran)")
        if error > SEED_ERROR_LIMIT:
            line += ": the step times varied more than tokens and context explain (other jobs on this machine?)"
        parts.append(line)
    if stats.get("seed_dropped"):
        parts.append(f"the saved step-cost profile it started from was off by {stats['seed_relative_error']:.0%} "
                     "on the first steps: dropped, the model learned from this run's steps")
    return "; ".join(parts)


def _least_squares(columns: list[list[float]], target: list[float]) -> list[float] | None:
    """The minimum-norm x minimising |A x - target|, A given by its (few) columns: x = pinv(A^T A)
    A^T target, with the pseudo-inverse from the symmetric eigendecomposition of the Gram matrix
    (cyclic Jacobi; three unknowns converge in a few sweeps). Directions the data does not
    determine (every step the same shape: alpha, beta and delta cannot be told apart) get no
    weight, as a least-squares solver's minimum-norm answer gives them none. None when the
    answer is not finite."""
    size = len(columns)
    gram = [[math.fsum(a * b for a, b in zip(columns[row], columns[col])) for col in range(size)]
            for row in range(size)]
    rhs = [math.fsum(a * t for a, t in zip(columns[row], target)) for row in range(size)]
    values, vectors = _symmetric_eigen(gram)
    largest = max((abs(value) for value in values), default=0.0)
    if not math.isfinite(largest) or largest == 0.0:
        return None
    # Eigenvalues of A^T A are squared singular values: below this, rounding decides them.
    cutoff = largest * 1e-13
    solution = [0.0] * size
    for value, vector in zip(values, vectors):
        if value > cutoff:
            weight = math.fsum(v * r for v, r in zip(vector, rhs)) / value
            solution = [s + weight * v for s, v in zip(solution, vector)]
    return solution if all(math.isfinite(value) for value in solution) else None


def _symmetric_eigen(matrix: list[list[float]], sweeps: int = 50) -> tuple[list[float], list[list[float]]]:
    """Eigenvalues and eigenvectors (as rows) of a small symmetric matrix, by cyclic Jacobi
    rotations."""
    size = len(matrix)
    a = [row[:] for row in matrix]
    v = [[float(row == col) for col in range(size)] for row in range(size)]  # columns: eigenvectors
    for _ in range(sweeps):
        off = math.fsum(a[p][q] ** 2 for p in range(size) for q in range(size) if p != q)
        if off <= 1e-30 * math.fsum(a[p][p] ** 2 for p in range(size)) or off == 0.0:
            break
        for p in range(size - 1):
            for q in range(p + 1, size):
                if a[p][q] == 0.0:
                    continue
                theta = (a[q][q] - a[p][p]) / (2 * a[p][q])
                t = math.copysign(1.0, theta) / (abs(theta) + math.sqrt(theta * theta + 1))
                c = 1 / math.sqrt(t * t + 1)
                s = t * c
                for k in range(size):  # A <- A J (columns p, q)
                    akp, akq = a[k][p], a[k][q]
                    a[k][p], a[k][q] = c * akp - s * akq, s * akp + c * akq
                for k in range(size):  # A <- J^T A (rows p, q)
                    apk, aqk = a[p][k], a[q][k]
                    a[p][k], a[q][k] = c * apk - s * aqk, s * apk + c * aqk
                for k in range(size):
                    vkp, vkq = v[k][p], v[k][q]
                    v[k][p], v[k][q] = c * vkp - s * vkq, s * vkp + c * vkq
    return [a[i][i] for i in range(size)], [[v[k][i] for k in range(size)] for i in range(size)]
