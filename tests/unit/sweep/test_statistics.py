"""The sweep's interval, paired-difference and minimum-detectable-effect arithmetic, on cases whose
answers can be worked out by hand."""
import numpy as np
import pytest
import torch

from pipeline.metrics import classification_metrics
from pipeline.sweep import statistics as st

B = 20000  # replicates: bootstrap frequencies within ~1% of their exact values


def one(values, y=None):
    """One repetition, arms x seeds x items from nested lists."""
    c = np.asarray(values, float)
    return [np.zeros(c.shape[2], int) if y is None else np.asarray(y)], [c]


def test_two_items_one_right_enumerates_to_quarter_half_quarter():
    # resampling 2 items: both right (1/4), one each (1/2), both wrong (1/4)
    labels, correct = one([[[1, 0]]])
    reps = st.bootstrap(labels, correct, 1, "accuracy", B, seed=0)[:, 0]
    freq = {v: np.mean(reps == v) for v in (0.0, 0.5, 1.0)}
    assert freq == pytest.approx({0.0: 0.25, 0.5: 0.5, 1.0: 0.25}, abs=0.015)
    assert st.percentile_interval(reps, 0.95) == (0.0, 1.0)
    assert reps.std() == pytest.approx(np.sqrt(0.125), abs=0.01)  # sqrt(1/4 * 1/4 + 1/4 * 1/4)


def test_repetitions_are_resampled_too():
    # two repetitions, one all right and one all wrong: the mean of two drawn repetitions is
    # 1 (1/4), 1/2 (1/2) or 0 (1/4); items within a repetition cannot move it
    labels = [np.zeros(5, int), np.zeros(5, int)]
    correct = [np.ones((1, 1, 5)), np.zeros((1, 1, 5))]
    cells, reps = st.cells(labels, correct, 1, "balanced_accuracy", B, 0, 0.95)
    assert cells[0].mean == 0.5 and cells[0].trials == 2
    assert (cells[0].low, cells[0].high) == (0.0, 1.0)
    assert np.mean(reps[:, 0] == 0.5) == pytest.approx(0.5, abs=0.015)


def test_a_perfect_arm_has_a_zero_width_interval():
    labels, correct = one([[[1, 1, 1, 1]]], y=[0, 1, 1, 2])
    cells, _ = st.cells(labels, correct, 3, "balanced_accuracy", 500, 0, 0.95)
    assert (cells[0].mean, cells[0].low, cells[0].high) == (1.0, 1.0, 1.0)


def test_items_are_resampled_within_class():
    y = np.array([0, 0, 0, 1, 2, 2])
    w = st._stratified_weights(y, 1000, np.random.default_rng(0))
    assert (w[:, y == 0].sum(1) == 3).all() and (w[:, y == 1].sum(1) == 1).all() and (w[:, y == 2].sum(1) == 2).all()


def test_balanced_accuracy_is_the_one_pipeline_metrics_computes():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 60)  # class 3 of 4 has no test item: it counts as 0 in both
    pred = np.where(rng.random(60) < 0.6, y, rng.integers(0, 4, 60))
    logits = torch.nn.functional.one_hot(torch.from_numpy(pred), 4).float()
    expected = classification_metrics(logits, torch.from_numpy(y), 4)["balanced_accuracy"]
    got = st.trial_scores([y], [(pred == y)[None, None].astype(float)], 4, "balanced_accuracy")[0, 0, 0]
    assert got == pytest.approx(expected)


def test_paired_difference_hand_computed():
    # 400 items of one class; arm a right on all, arm b wrong on 100: the difference is 0.25 and
    # its standard error that of a proportion, sqrt(0.25 x 0.75 / 400) = 0.02165
    labels, correct = one([[np.ones(400)], [np.r_[np.zeros(100), np.ones(300)]]])
    d = st.paired_difference(labels, correct, 0, 1, 1, "accuracy", 8000, 0, 0.95, 0.8)
    se = np.sqrt(0.25 * 0.75 / 400)
    assert d.mean == 0.25 and d.pairs == 1
    assert d.se == pytest.approx(se, rel=0.05)
    assert (d.low, d.high) == pytest.approx((0.25 - 1.96 * se, 0.25 + 1.96 * se), abs=0.006)
    assert d.mde == pytest.approx(2.8016 * d.se, rel=1e-4)
    assert st.verdict("A", "B", d, 0.8).startswith("A beats B by 25.0 points [")


def test_minimum_detectable_effect_formula():
    # (z_0.975 + z_0.80) x SE = (1.959964 + 0.841621) x SE
    assert st.minimum_detectable_effect(0.01) == pytest.approx(0.02801585, abs=1e-8)
    assert st.minimum_detectable_effect(0.01, 0.9, 0.9) == pytest.approx((1.644854 + 1.281552) * 0.01, abs=1e-8)


def test_identical_arms_differ_by_nothing_and_say_so():
    labels, correct = one([[[1, 0, 1, 1]], [[1, 0, 1, 1]]])
    d = st.paired_difference(labels, correct, 0, 1, 1, "accuracy", 500, 0, 0.95, 0.8)
    assert (d.mean, d.low, d.high, d.se, d.mde) == (0.0, 0.0, 0.0, 0.0, 0.0)
    assert "no difference detectable" in st.verdict("A", "B", d, 0.8)


def test_the_loser_is_named_second_with_positive_numbers():
    d = st.Difference(0, 1, -0.031, -0.058, -0.004, 0.01, 0.028, 9)
    assert st.verdict("MAE ViT", "ResNet-18", d, 0.8) == "ResNet-18 beats MAE ViT by 3.1 points [0.4, 5.8]"


def test_draws_do_not_depend_on_the_arms():
    # what makes differences paired: arm 0's replicates are the same alone or beside another arm
    rng = np.random.default_rng(2)
    labels = [rng.integers(0, 2, 30), rng.integers(0, 2, 25)]
    correct = [rng.integers(0, 2, (2, 3, 30)).astype(float), rng.integers(0, 2, (2, 3, 25)).astype(float)]
    both = st.bootstrap(labels, correct, 2, "balanced_accuracy", 300, 7)
    alone = st.bootstrap(labels, [c[:1] for c in correct], 2, "balanced_accuracy", 300, 7)
    np.testing.assert_array_equal(both[:, 0], alone[:, 0])


def test_a_trial_not_run_is_left_out_not_counted_as_zero():
    labels = [np.zeros(4, int), np.zeros(4, int)]
    correct = [np.ones((1, 2, 4)), np.ones((1, 2, 4))]
    correct[1][0, 1] = np.nan
    cells, _ = st.cells(labels, correct, 1, "accuracy", 200, 0, 0.95)
    assert cells[0].trials == 3 and cells[0].mean == 1.0 and cells[0].low == 1.0
