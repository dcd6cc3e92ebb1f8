"""Classification metrics of a benign/malignant classifier (malignant is the positive class)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

__all__ = ["METRIC_NAMES", "OPERATING_POINT_METRICS", "THRESHOLDED_METRICS", "binary_metrics", "operating_point_metrics", "youden_threshold"]

#: the keys of :func:`binary_metrics`, in report order
METRIC_NAMES = ("auc", "accuracy", "sensitivity", "specificity", "f1", "balanced_accuracy")
#: the metrics that depend on the threshold (all but the AUC)
THRESHOLDED_METRICS = METRIC_NAMES[1:]
#: the keys of :func:`operating_point_metrics`: the metrics and the threshold they are at
OPERATING_POINT_METRICS = METRIC_NAMES + ("threshold",)


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC-AUC by the rank-sum (Mann-Whitney) formula, ties counted half; NaN with one class."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    values = np.concatenate([pos, neg])[order]
    # average ranks over ties
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0) / (len(pos) * len(neg)))


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
    ``default`` when both classes are not present."""
    p = np.asarray(prob_malignant, dtype=float).ravel()
    y = np.asarray(labels, dtype=int).ravel()
    pos, neg = int(np.sum(y == 1)), int(np.sum(y == 0))
    if pos == 0 or neg == 0:
        return float(default)
    best_t, best_j = float(default), -np.inf
    for t in np.unique(p):
        called = p >= t
        j = np.sum(called & (y == 1)) / pos + np.sum(~called & (y == 0)) / neg - 1.0
        if j > best_j + 1e-12:
            best_t, best_j = float(t), j
    return best_t


def operating_point_metrics(prob_malignant: Sequence[float], labels: Sequence[int], threshold: Optional[float] = None) -> dict[str, float]:
    """:func:`binary_metrics` at the threshold a model serves with, and ``threshold`` saying which.

    Args:
        prob_malignant, labels: as for :func:`binary_metrics`.
        threshold: the served operating point; ``None`` chooses it on these predictions
            (:func:`youden_threshold`), as training does on its validation split.
    """
    t = youden_threshold(prob_malignant, labels) if threshold is None else float(threshold)
    return {**binary_metrics(prob_malignant, labels, t), "threshold": t}
