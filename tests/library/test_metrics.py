"""Classification metrics against hand-computed confusion matrices and scikit-learn's AUC."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from thyroid_plugin.metrics import METRIC_NAMES, binary_metrics


def test_metric_names():
    assert METRIC_NAMES == ("auc", "accuracy", "sensitivity", "specificity", "f1", "balanced_accuracy")


def test_against_a_hand_computed_confusion_matrix():
    # truth:      1    1    1    1    0    0    0    0    0    0
    probs = [0.9, 0.8, 0.55, 0.2, 0.7, 0.4, 0.3, 0.1, 0.05, 0.5]
    labels = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    # at 0.5 (>= is malignant): TP = 3 (0.9, 0.8, 0.55), FN = 1 (0.2), FP = 2 (0.7, 0.5), TN = 4
    m = binary_metrics(probs, labels)
    assert set(m) == set(METRIC_NAMES)
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 4 / 6) / 2)
    # AUC by counting ordered pairs: positives {.9,.8,.55,.2} vs negatives {.7,.4,.3,.1,.05,.5}
    wins = sum((p > n) + 0.5 * (p == n) for p in probs[:4] for n in probs[4:])
    assert m["auc"] == pytest.approx(wins / 24)


def test_threshold_is_inclusive_and_configurable():
    m = binary_metrics([0.5, 0.49], [1, 0])
    assert m["sensitivity"] == 1.0 and m["specificity"] == 1.0
    m = binary_metrics([0.5, 0.49], [1, 0], threshold=0.6)
    assert m["sensitivity"] == 0.0 and m["specificity"] == 1.0 and m["accuracy"] == 0.5
    assert m["auc"] == 1.0  # AUC does not depend on the threshold


@pytest.mark.parametrize("seed", range(6))
def test_auc_matches_sklearn_including_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 80))
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]  # both classes present
    probs = np.round(rng.random(n), 1)  # coarse values: many ties
    assert binary_metrics(probs, labels)["auc"] == pytest.approx(roc_auc_score(labels, probs), abs=1e-12)


def test_perfect_and_inverted_rankings():
    assert binary_metrics([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1])["auc"] == 1.0
    assert binary_metrics([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1])["auc"] == 0.0
    assert binary_metrics([0.5] * 4, [0, 0, 1, 1])["auc"] == 0.5


def test_undefined_values_are_nan():
    only_malignant = binary_metrics([0.9, 0.2, 0.7], [1, 1, 1])
    assert math.isnan(only_malignant["auc"])
    assert math.isnan(only_malignant["specificity"])
    assert math.isnan(only_malignant["balanced_accuracy"])
    assert only_malignant["sensitivity"] == pytest.approx(2 / 3)
    assert only_malignant["accuracy"] == pytest.approx(2 / 3)

    only_benign = binary_metrics([0.1, 0.2], [0, 0])
    assert math.isnan(only_benign["auc"]) and math.isnan(only_benign["sensitivity"])
    assert only_benign["specificity"] == 1.0
    assert math.isnan(only_benign["f1"])  # no positives predicted or present: F1 is 0/0

    empty = binary_metrics([], [])
    assert all(math.isnan(v) for v in empty.values())


def test_length_mismatch():
    with pytest.raises(ValueError, match="3 probabilities for 2 labels"):
        binary_metrics([0.1, 0.2, 0.3], [0, 1])


def test_bootstrap_intervals_hold_the_auc_and_tell_two_scorings_apart():
    from thyroid_plugin.metrics import auc_bootstrap_ci, paired_auc_difference_ci

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 120)
    good = labels + rng.normal(0, 0.7, 120)  # separates the classes
    noise = rng.normal(0, 1, 120)  # does not
    low, high = auc_bootstrap_ci(good, labels)
    assert low < binary_metrics(good, labels)["auc"] < high and high - low < 0.25
    low, high = paired_auc_difference_ci(good, noise, labels)
    assert 0 < low < high  # good is better, and the interval says so
    assert paired_auc_difference_ci(noise, noise, labels) == [0.0, 0.0]
    # a handful of cases: wide, not a crash (resamples with one class are skipped)
    few = auc_bootstrap_ci([0.2, 0.8, 0.6], [0, 1, 1])
    assert 0.0 <= few[0] <= few[1] <= 1.0
