"""Figures people look at: ROC curves, confusion matrices and saliency overlays (PNG files),
and the measures that compare a saliency map with an expert's lesion mask."""

from __future__ import annotations

import os
import warnings
from typing import Mapping, Optional, Sequence

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import roc_curve as sklearn_roc_curve

from .constants import CLASS_NAMES

__all__ = ["plot_boxes", "plot_confusion", "plot_roc", "roc_curve", "saliency_vs_mask", "save_figure", "save_overlay"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_boxes(frames: Sequence[np.ndarray], expert: Sequence, found: Sequence, titles: Sequence[str], path: str,
               cols: int = 6) -> str:
    """Frames with the expert's box (green) and a localiser's (orange), ``cols`` a row; boxes are
    ``(x0, y0, x1, y1)`` pixels or ``None``. Written atomically."""
    plt = _pyplot()
    rows = max(1, (len(frames) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.0 * rows), dpi=100, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, frame, a, b, title in zip(axes.ravel(), frames, expert, found, titles):
        f = np.asarray(frame)
        ax.imshow(f if f.ndim == 2 else f.mean(axis=2), cmap="gray")
        for box, colour in ((a, "lime"), (b, "orange")):
            if box is not None:
                x0, y0, x1, y1 = box
                ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=1.2))
        ax.set_title(title, fontsize=7)
    fig.suptitle("expert box (green), localiser box (orange)", fontsize=9)
    return save_figure(fig, path)


def save_figure(fig, path: str) -> str:
    """Lay out ``fig``, write it as a PNG at ``path`` whole or not at all, and close it."""
    import io

    from .io import atomic_write_bytes

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    _pyplot().close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def roc_curve(prob: Sequence[float], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates over all thresholds (malignant positive), from ``(0, 0)``;
    a rate whose class is absent is 0 (scikit-learn would give NaN)."""
    y = np.asarray(labels, dtype=int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        fpr, tpr, _ = sklearn_roc_curve(y, np.asarray(prob, dtype=float), pos_label=1, drop_intermediate=False)
    return np.nan_to_num(fpr), np.nan_to_num(tpr)


def plot_roc(curves: Mapping[str, tuple[Sequence[float], Sequence[int]]], path: str, title: str = "ROC") -> str:
    """One ROC plot with a curve per entry ``name -> (prob_malignant, labels)``; AUC in the legend."""
    from .metrics import binary_metrics

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    for name, (prob, labels) in curves.items():
        fpr, tpr = roc_curve(prob, labels)
        auc = binary_metrics(prob, labels)["auc"]
        ax.plot(fpr, tpr, lw=1.6, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="0.6", lw=1)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01), title=title)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_confusion(prob: Sequence[float], labels: Sequence[int], path: str, threshold: float = 0.5, title: str = "") -> str:
    """Confusion matrix image (rows: truth, columns: prediction) at ``threshold``."""
    plt = _pyplot()
    p = np.asarray(prob) >= threshold
    y = np.asarray(labels).astype(int)
    m = np.array([[np.sum((y == t) & (p == bool(c))) for c in (0, 1)] for t in (0, 1)])
    fig, ax = plt.subplots(figsize=(3.6, 3.2), dpi=120)
    ax.imshow(m, cmap="Blues")
    for t in (0, 1):
        for c in (0, 1):
            ax.text(c, t, str(m[t, c]), ha="center", va="center", color="black" if m[t, c] < m.max() / 2 else "white")
    ax.set_xticks([0, 1], [f"pred {n}" for n in CLASS_NAMES])
    ax.set_yticks([0, 1], list(CLASS_NAMES))
    ax.set_title(title or f"threshold {threshold}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def save_overlay(
    image: np.ndarray, saliency: np.ndarray, path: str, title: str = "", mask: Optional[np.ndarray] = None, alpha: float = 0.45
) -> str:
    """The frame in gray with the saliency as a heat map and, if given, the expert mask outline."""
    plt = _pyplot()
    gray = image if image.ndim == 2 else image.mean(axis=2)
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.6), dpi=110)
    for ax in axes:
        ax.imshow(gray, cmap="gray")
        ax.axis("off")
    axes[1].imshow(saliency, cmap="jet", alpha=alpha, vmin=0, vmax=1)
    if mask is not None and mask.any():
        axes[1].contour(mask > 0, levels=[0.5], colors="lime", linewidths=1)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def saliency_vs_mask(saliency: np.ndarray, mask: np.ndarray, threshold: Optional[float] = None) -> dict:
    """Where a saliency map looks, against an expert lesion mask of the same size.

    - ``energy_in_mask``: saliency mass inside the lesion / total saliency mass;
    - ``pointing_game``: 1 if the saliency maximum lies inside the lesion, else 0;
    - ``iou``: IoU of the saliency thresholded at ``threshold`` (default: its own mean plus one
      standard deviation, a rule that does not depend on the model's calibration) with the lesion.

    Empty masks give NaN.
    """
    s = np.asarray(saliency, dtype=float)
    m = np.asarray(mask) > 0
    if s.shape != m.shape:
        raise ValueError(f"saliency {s.shape} and mask {m.shape} differ in shape")
    if not m.any():
        nan = float("nan")
        return {"energy_in_mask": nan, "pointing_game": nan, "iou": nan}
    total = s.sum()
    energy = float(s[m].sum() / total) if total > 0 else float("nan")
    peak = np.unravel_index(int(np.argmax(s)), s.shape)
    t = float(s.mean() + s.std()) if threshold is None else float(threshold)
    b = s >= t
    union = np.logical_or(b, m).sum()
    return {"energy_in_mask": energy, "pointing_game": float(m[peak]), "iou": float(np.logical_and(b, m).sum() / union) if union else float("nan")}
