"""Honest probabilities: temperature scaling fitted on validation data, the expected calibration
error (ECE) and a reliability diagram.

Temperature scaling (Guo et al., "On calibration of modern neural networks", ICML 2017) divides
the logits by one scalar ``T`` chosen to minimise the negative log-likelihood of the validation
labels. It does not change the ranking (the ROC-AUC) of the probabilities. A model file stores
``T`` and the network's last linear layer is divided by it (:func:`fold_temperature`), so every
consumer (the server, the CLI, Slicer) gets calibrated probabilities with no change to the
served computation.

For a two-class softmax, ``p(malignant) = sigmoid(d)`` with ``d = logit_1 - logit_0``; the
functions below work on ``d``, which the stored validation probabilities give back as
``logit(p)``.
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .io import atomic_write_bytes

__all__ = ["expected_calibration_error", "fit_temperature", "fold_temperature", "plot_reliability",
           "probabilities_to_margins", "reliability_bins", "scale_probabilities"]

_EPS = 1e-7


def probabilities_to_margins(prob_malignant: Sequence[float]) -> np.ndarray:
    """``logit(p)``: the logit difference that gave each probability."""
    p = np.clip(np.asarray(prob_malignant, dtype=np.float64), _EPS, 1.0 - _EPS)
    return np.log(p) - np.log1p(-p)


def scale_probabilities(prob_malignant: Sequence[float], temperature: float) -> np.ndarray:
    """The probabilities after dividing their logits by ``temperature``."""
    return 1.0 / (1.0 + np.exp(-probabilities_to_margins(prob_malignant) / float(temperature)))


def fit_temperature(prob_malignant: Sequence[float], labels: Sequence[int], bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature that minimises the validation negative log-likelihood (a 1-D convex
    problem in ``log T``, solved by golden-section search). ``1.0`` when the labels hold one
    class only (nothing to calibrate against)."""
    y = np.asarray(labels, dtype=np.float64)
    if y.size == 0 or y.min() == y.max():
        return 1.0
    d = probabilities_to_margins(prob_malignant)

    def nll(log_t: float) -> float:
        z = d / math.exp(log_t)
        return float(np.mean(np.logaddexp(0.0, z) - y * z))  # -[y log s(z) + (1-y) log(1-s(z))]

    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    g = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(b)
    return float(math.exp((lo + hi) / 2.0))


def reliability_bins(prob_malignant: Sequence[float], labels: Sequence[int], n_bins: int = 10) -> list[dict]:
    """Equal-width bins of the predicted probability of malignancy: for each non-empty bin its
    range, count, mean prediction and observed fraction of malignant cases."""
    p = np.asarray(prob_malignant, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1], right=True), 0, n_bins - 1)
    out = []
    for b in range(n_bins):
        sel = which == b
        if sel.any():
            out.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": int(sel.sum()),
                        "mean_prob": float(p[sel].mean()), "fraction_malignant": float(y[sel].mean())})
    return out


def expected_calibration_error(prob_malignant: Sequence[float], labels: Sequence[int], n_bins: int = 10) -> float:
    """ECE of the probability of malignancy: the count-weighted mean of
    ``|observed fraction - mean prediction|`` over ``n_bins`` equal-width bins (nan for no data)."""
    bins = reliability_bins(prob_malignant, labels, n_bins)
    n = sum(b["count"] for b in bins)
    if n == 0:
        return float("nan")
    return float(sum(b["count"] * abs(b["fraction_malignant"] - b["mean_prob"]) for b in bins) / n)


def fold_temperature(network: nn.Module, temperature: float) -> nn.Module:
    """Divide the network's class logits by ``temperature`` in place, by scaling its last linear
    layer (``head[-1]`` of the saliency-guided classifier, ``fc``/``class_layers.out`` of the
    baselines: the last ``nn.Linear`` in module order). Returns the network."""
    last = network.get_submodule(last_linear_name(network))
    with torch.no_grad():
        last.weight.div_(float(temperature))
        if last.bias is not None:
            last.bias.div_(float(temperature))
    return network


def plot_reliability(curves: dict, path: str, n_bins: int = 10, title: str = "Reliability") -> str:
    """A reliability diagram (observed fraction malignant against mean predicted probability per
    bin, with the diagonal of perfect calibration) of ``{name: (probabilities, labels)}``, each
    curve labelled with its ECE; written as PNG to ``path``."""
    from .reports import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect calibration")
    for name, (prob, labels) in curves.items():
        bins = reliability_bins(prob, labels, n_bins)
        ece = expected_calibration_error(prob, labels, n_bins)
        ax.plot([b["mean_prob"] for b in bins], [b["fraction_malignant"] for b in bins], marker="o", markersize=3,
                label=f"{name} (ECE {ece:.3f}, n={len(labels)})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean predicted probability of malignancy")
    ax.set_ylabel("observed fraction malignant")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def last_linear_name(network: nn.Module) -> str:
    """Module name of the layer :func:`fold_temperature` scales."""
    name = None
    for n, m in network.named_modules():
        if isinstance(m, nn.Linear):
            name = n
    if name is None:
        raise ValueError("the network has no linear output layer to scale")
    return name


def calibrate_model_file(path: str, prob_malignant: Sequence[float], labels: Sequence[int]) -> dict:
    """Fit the temperature of a model file on its validation predictions and store it, atomically:
    the output layer's weights are divided by it (the file's probabilities become calibrated),
    the stored validation probabilities are rescaled, the operating threshold is re-chosen on
    them (Youden's J: the same cut between the same cases), and ``calibration`` records the
    temperature and the validation ECE before and after. A file calibrated before is first
    returned to its uncalibrated logits (temperatures do not compound).

    Returns the ``calibration`` record (with the new ``model`` identity)."""
    from .checkpoint import apply_operating_point, build_network, load_checkpoint, write_payload
    from .metrics import youden_threshold

    payload = load_checkpoint(path)
    previous = float((payload.get("calibration") or {}).get("temperature", 1.0))
    name = last_linear_name(build_network(payload["network_def"]))
    # the predictions given are the file's own: undo an earlier temperature first
    raw = scale_probabilities(prob_malignant, 1.0 / previous) if previous != 1.0 else np.asarray(prob_malignant, float)
    t = fit_temperature(raw, labels)
    for key in (f"{name}.weight", f"{name}.bias"):
        if key in payload["state_dict"]:
            w = payload["state_dict"][key]
            payload["state_dict"][key] = (w.float() * (previous / t)).to(w.dtype)
    calibrated = scale_probabilities(raw, t)
    record = {"temperature": t, "method": "temperature scaling on the validation predictions",
              "val_ece_before": expected_calibration_error(raw, labels),
              "val_ece_after": expected_calibration_error(calibrated, labels), "n": len(labels)}
    payload["calibration"] = record
    apply_operating_point(payload, youden_threshold(calibrated.tolist(), list(labels)), (calibrated.tolist(), list(labels)))
    record["model"] = write_payload(path, payload)  # one atomic write: weights, threshold and figures agree
    return record
