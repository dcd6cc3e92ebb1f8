"""Classification metrics computed independently of the project, with scikit-learn."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, recall_score, roc_auc_score


def sklearn_metrics(prob_malignant: Sequence[float], labels: Sequence[int], threshold: float) -> dict:
    """AUC and, with malignant called at ``prob >= threshold``, accuracy, sensitivity,
    specificity, F1 and balanced accuracy (both classes must be present)."""
    y = np.asarray(labels, dtype=int)
    called = (np.asarray(prob_malignant, dtype=float) >= threshold).astype(int)
    return {
        "auc": roc_auc_score(y, prob_malignant),
        "accuracy": accuracy_score(y, called),
        "sensitivity": recall_score(y, called, pos_label=1, zero_division=np.nan),
        "specificity": recall_score(y, called, pos_label=0, zero_division=np.nan),
        "f1": f1_score(y, called, zero_division=np.nan),
        "balanced_accuracy": balanced_accuracy_score(y, called),
        "threshold": threshold,
    }
