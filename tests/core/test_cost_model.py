"""The step cost model (core/cost_model.py): a plain-Python least squares, checked against torch's
solver (minimum-norm answers included), and what it does with data that says little."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipemax.core.cost_model import MIN_SCORED_STEPS, StepCostModel, describe_step_time_model
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
    for tokens in range(1, 13):  # (enough steps for an error to be reported: 9 scored after the first fit)
        model.observe(tokens, 10 * tokens, 1e-3 + 1e-4 * tokens)
        model.observe(tokens, 10 * tokens, math.nan)
        model.observe(tokens, 10 * tokens, math.inf)
        model.observe(tokens, 10 * tokens, -1.0)
    assert len(model.samples) == 12
    assert model.predict(4, 40) == pytest.approx(1e-3 + 4e-4)
    assert math.isfinite(model.mean_error())


def steps(model, count, seconds_of=lambda tokens, context: 1e-3 + 1e-5 * tokens + 1e-7 * context):
    """`count` measured steps of growing shape, timed by seconds_of (no clock: injected times)."""
    for step in range(len(model.samples), len(model.samples) + count):  # (a step's shape: its index in the run)
        # (never collinear: any three steps tell the costs apart)
        tokens, context = 1 + step * step % 7 * 30, 100 + 50 * step
        model.observe(tokens, context, seconds_of(tokens, context))


def test_a_seed_far_off_is_dropped_at_once_and_kept_out_of_the_reported_error():
    """A seed saved on a busy machine predicts steps 50x too slow: dropped after the first step
    (no prediction until this run's own fit), and its errors are not the model's."""
    true = (1e-5, 1e-7, 1e-3)
    model = StepCostModel(seed=tuple(50 * value for value in true))
    steps(model, 1)
    assert model.seed_dropped and not model.ready and model.seed_error() > 40
    steps(model, 30)
    assert model.coefficients == pytest.approx(true)
    stats = model.stats()
    assert stats["seed_dropped"] and stats["mean_relative_error"] < 0.01 and stats["scored_steps"] == 28


def test_a_seed_that_predicts_well_is_kept_until_the_run_has_its_own_fit():
    true = (1e-5, 1e-7, 1e-3)
    model = StepCostModel(seed=tuple(1.2 * value for value in true))
    steps(model, 2)
    assert model.coefficients == pytest.approx(tuple(1.2 * value for value in true))
    assert not model.seed_dropped and model.seed_error() == pytest.approx(0.2, rel=0.05)
    steps(model, 30)
    assert not model.stats()["seed_dropped"] and model.mean_error() < 0.01


def test_too_few_predicted_steps_report_no_error():
    model = StepCostModel()
    steps(model, 10)  # the first fit after 3 steps: 7 predictions, one short of MIN_SCORED_STEPS
    assert model.mean_error() is None and model.stats()["mean_relative_error"] is None
    steps(model, 1)
    assert model.mean_error() is not None and MIN_SCORED_STEPS == 8


def test_the_summary_says_in_words_what_the_error_is_or_nothing():
    assert describe_step_time_model({"mean_relative_error": None, "scored_steps": 3}) == ""
    words = describe_step_time_model({"mean_relative_error": 0.12, "scored_steps": 52, "seed_dropped": False})
    assert words == "step-time model: predicted step times were off by 12% on average (52 steps, each predicted " \
                    "before it ran)"
    noisy = describe_step_time_model({"mean_relative_error": 14.69, "scored_steps": 60, "seed_dropped": True,
                                      "seed_relative_error": 66.59})
    assert "off by 1469% on average" in noisy and "other jobs on this machine?" in noisy
    assert "profile it started from was off by 6659%" in noisy and "dropped" in noisy
