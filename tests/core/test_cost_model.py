"""The step cost model (core/cost_model.py): a plain-Python least squares, checked against torch's
solver (minimum-norm answers included), and what it does with data that says little."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipemax.core.cost_model import StepCostModel
from tests.helpers import examples


def torch_fit(samples):
    """The fit as torch's least-squares solver makes it (what the model did before it dropped torch)."""
    data = torch.tensor(list(samples), dtype=torch.float64)
    design = torch.stack([data[:, 0], data[:, 1], torch.ones(len(data), dtype=torch.float64)], dim=1)
    scale = design.abs().amax(dim=0).clamp(min=1.0)
    solution = torch.linalg.lstsq(design / scale, data[:, 2:3], driver="gelsd").solution.squeeze(1) / scale
    return tuple(max(0.0, float(value)) for value in solution)


def fitted(samples):
    model = StepCostModel()
    model.samples.extend(samples)
    model.fit()
    return model.coefficients


def test_the_cost_model_learns_a_linear_step_time_and_reports_its_error():
    model = StepCostModel(refit_every=4)
    assert model.predict(10, 100) is None
    generator = torch.Generator().manual_seed(0)
    for _ in range(64):
        tokens, context = torch.randint(1, 512, (2,), generator=generator).tolist()
        context *= 20
        model.observe(tokens, context, 2e-6 * tokens + 5e-8 * context + 3e-3)
    alpha, beta, delta = model.coefficients
    assert abs(alpha - 2e-6) < 1e-8 and abs(beta - 5e-8) < 1e-10 and abs(delta - 3e-3) < 1e-6
    assert model.predict(100, 1000) == pytest.approx(2e-4 + 5e-5 + 3e-3)
    assert model.stats()["mean_relative_error"] < 0.05  # after the first fits, the predictions are exact


@settings(max_examples=examples(60), deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 200_000), st.floats(0, 0.5)), min_size=3, max_size=60))
def test_the_fit_is_the_least_squares_answer(samples):
    ours, reference = fitted(samples), torch_fit(samples)
    if ours is None:  # nothing learned: only when the best answer is no cost at all
        assert reference == (0.0, 0.0, 0.0)
        return
    predicted = [ours[0] * b + ours[1] * c + ours[2] for b, c, _ in samples]
    expected = [reference[0] * b + reference[1] * c + reference[2] for b, c, _ in samples]
    assert predicted == pytest.approx(expected, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("samples", [
    [(8, 1000, 0.0042)] * 6,  # every step the same shape: nothing tells the three costs apart
    [(8, context, 1e-3 + 1.25e-4 * 8 + 1e-6 * context) for context in range(100, 2000, 150)],  # a fixed batch
    [(0, 0, 0.002)] * 4,
], ids=["one-shape", "fixed-batch", "no-tokens"])
def test_data_that_cannot_tell_the_costs_apart_gets_the_minimum_norm_answer(samples):
    """What the data leaves open gets no weight (as torch's solver gives it none), so a fixed
    decode batch's fixed cost is not read as a cost per token."""
    assert fitted(samples) == pytest.approx(torch_fit(samples), rel=1e-9, abs=1e-15)


def test_a_failed_clock_neither_enters_the_fit_nor_blocks_it():
    model = StepCostModel(refit_every=1)
    for tokens in range(1, 9):
        model.observe(tokens, 10 * tokens, 1e-3 + 1e-4 * tokens)
        model.observe(tokens, 10 * tokens, math.nan)
        model.observe(tokens, 10 * tokens, math.inf)
        model.observe(tokens, 10 * tokens, -1.0)
    assert len(model.samples) == 8
    assert model.predict(4, 40) == pytest.approx(1e-3 + 4e-4)
    assert math.isfinite(model.mean_error())
