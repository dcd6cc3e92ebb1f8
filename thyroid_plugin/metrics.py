"""Classification metrics of a benign/malignant classifier (malignant is the positive class)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

__all__ = ["METRIC_NAMES", "OPERATING_POINT_METRICS", "THRESHOLDED_METRICS", "auc_bootstrap_ci", "binary_metrics",
           "operating_point_metrics", "paired_auc_difference_ci", "youden_threshold"]

#: the keys of :func:`binary_metrics`, in report order
METRIC_NAMES = ("auc", "accuracy", "sensitivity", "specificity", "f1", "balanced_accuracy")
#: the metrics that depend on the threshold (all but the AUC)
THRESHOLDED_METRICS = METRIC_NAMES[1:]
#: the keys of :func:`operating_point_metrics`: the metrics and the threshold they are at
OPERATING_POINT_METRICS = METRIC_NAMES + ("threshold",)


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC-AUC (scikit-learn; ties count half); NaN with one class or a non-finite score."""
    if len(np.unique(labels)) < 2 or not np.all(np.isfinite(scores)):
        return float("nan")
    return float(roc_auc_score(labels, scores))


def binary_metrics(prob_malignant: Sequence[float], labels: Sequence[int], threshold: float = 0.5) -> dict[str, float]:
    """ROC-AUC, accuracy, sensitivity, specificity, F1 and balanced accuracy.

    Args:
        prob_malignant: ``(N,)`` predicted probability of the malignant class.
        labels: ``(N,)`` true class index (0 benign, 1 malignant).
        threshold: a case is called malignant when its probability is ``>= threshold``.

    Undefined values (AUC with one class present, sensitivity without malignant cases, ...) are
    NaN, never a made-up 0 or 1.
    """
    p = np.asarray(prob_malignant, dtype=float).ravel()
    y = np.asarray(labels, dtype=int).ravel()
    if p.shape != y.shape:
        raise ValueError(f"{len(p)} probabilities for {len(y)} labels")
    pred = (p >= threshold).astype(int)
    tp = int(np.sum((pred == 1) & (y == 1)))
    tn = int(np.sum((pred == 0) & (y == 0)))
    fp = int(np.sum((pred == 1) & (y == 0)))
    fn = int(np.sum((pred == 0) & (y == 1)))
    nan = float("nan")
    sens = tp / (tp + fn) if tp + fn else nan
    spec = tn / (tn + fp) if tn + fp else nan
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else nan
    return {
        "auc": _auc(p, y),
        "accuracy": (tp + tn) / len(y) if len(y) else nan,
        "sensitivity": sens,
        "specificity": spec,
        "f1": f1,
        "balanced_accuracy": (sens + spec) / 2 if not (np.isnan(sens) or np.isnan(spec)) else nan,
    }


def youden_threshold(prob_malignant: Sequence[float], labels: Sequence[int], default: float = 0.5) -> float:
    """The operating point that maximises sensitivity + specificity - 1 (Youden's J) on these
    predictions: a case is malignant when its probability is ``>=`` the returned value.
    ``default`` when both classes are not present or a probability is not finite."""
    p = np.asarray(prob_malignant, dtype=float).ravel()
    y = np.asarray(labels, dtype=int).ravel()
    if np.all(y == 1) or np.all(y == 0) or not np.all(np.isfinite(p)):
        return float(default)
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    j = (tpr - fpr)[1:]  # the first point is scikit-learn's "nothing is malignant" (threshold inf)
    # ties of J: the lowest threshold, i.e. the most sensitive of the equally good operating points
    return float(thresholds[1:][np.flatnonzero(j >= j.max() - 1e-12)[-1]])


def operating_point_metrics(prob_malignant: Sequence[float], labels: Sequence[int], threshold: Optional[float] = None) -> dict[str, float]:
    """:func:`binary_metrics` at the threshold a model serves with, and ``threshold`` saying which.

    Args:
        prob_malignant, labels: as for :func:`binary_metrics`.
        threshold: the served operating point; ``None`` chooses it on these predictions
            (:func:`youden_threshold`), as training does on its validation split.
    """
    t = youden_threshold(prob_malignant, labels) if threshold is None else float(threshold)
    return {**binary_metrics(prob_malignant, labels, t), "threshold": t}


def _bootstrap(statistic, labels: Sequence[int], n: int, seed: int) -> list[float]:
    """95 % percentile interval of ``statistic(idx)`` over ``n`` resamples of the cases with
    replacement (resamples holding one class only are skipped: no AUC there)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        idx = rng.integers(0, len(labels), len(labels))
        if labels[idx].min() != labels[idx].max():
            values.append(statistic(idx))
    return [round(float(np.percentile(values, 2.5)), 3), round(float(np.percentile(values, 97.5)), 3)]


def auc_bootstrap_ci(scores: Sequence[float], labels: Sequence[int], n: int = 2000, seed: int = 0) -> list[float]:
    """95 % bootstrap interval ``[low, high]`` of the ROC-AUC of ``scores``."""
    s, y = np.asarray(scores, dtype=float), np.asarray(labels)
    return _bootstrap(lambda idx: _auc(s[idx], y[idx]), y, n, seed)


def paired_auc_difference_ci(a: Sequence[float], b: Sequence[float], labels: Sequence[int], n: int = 2000,
                             seed: int = 0) -> list[float]:
    """95 % paired bootstrap interval of AUC(a) - AUC(b): two scorings of the same cases,
    resampled together (an interval holding 0: no evidence of a difference)."""
    a, b, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float), np.asarray(labels)
    return _bootstrap(lambda idx: _auc(a[idx], y[idx]) - _auc(b[idx], y[idx]), y, n, seed)
