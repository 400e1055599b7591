"""The paired bootstrap of a stage's task-accuracy change against the reference (align.eval.metrics)."""

import itertools

import numpy as np
import pytest

from align.eval.metrics import paired_bootstrap


def test_interval_matches_the_exact_bootstrap_distribution_of_three_items():
    stage, reference = [1, 1, 0], [0, 1, 1]  # differences +1, 0, -1
    exact = [np.mean([[1, 0, -1][i] for i in idx]) for idx in itertools.product(range(3), repeat=3)]  # all 27
    result = paired_bootstrap(stage, reference, resamples=40000, seed=1)
    assert result["value"] == 0.0 and result["n"] == 3
    # the exact 2.5% and 97.5% quantiles: P(mean = -1) = P(mean = +1) = 1/27, more than 2.5%
    assert min(v for v in exact if np.mean(np.array(exact) <= v) >= 0.025) == -1
    assert (result["low"], result["high"]) == (-1, 1)


def test_pairs_that_move_together_add_no_noise():
    # 40 prompts both answer right, 40 both wrong, and the stage fixes 10 the reference got wrong
    stage = [1] * 40 + [0] * 40 + [1] * 10
    reference = [1] * 40 + [0] * 40 + [0] * 10
    result = paired_bootstrap(stage, reference, seed=0)
    assert result["value"] == pytest.approx(10 / 90)
    assert result["low"] > 0  # never worse on any prompt: every resample's change is >= 0, most > 0
    # unpaired, the same two accuracies (55.6% vs 44.4%) would have an interval that reaches below zero
    rng = np.random.default_rng(0)
    unpaired = [np.mean(rng.choice(stage, 90)) - np.mean(rng.choice(reference, 90)) for _ in range(2000)]
    assert np.percentile(unpaired, 2.5) < 0


def test_identical_answers_give_a_zero_width_interval_and_no_items_none():
    assert paired_bootstrap([1, 0, 1], [1, 0, 1]) == {"value": 0.0, "low": 0.0, "high": 0.0, "n": 3}
    assert paired_bootstrap([], []) is None
