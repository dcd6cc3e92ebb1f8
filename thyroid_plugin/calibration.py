"""Honest probabilities: Platt or temperature scaling fitted on validation data, the expected
calibration error (ECE) and a reliability diagram.

Temperature scaling (Guo et al., "On calibration of modern neural networks", ICML 2017) divides
the logits by one scalar ``T`` chosen to minimise the negative log-likelihood of the validation
labels. Platt scaling (Platt, 1999) fits a scale *and a shift*, ``sigmoid(a * d + b)``: the
shift moves the probabilities to the validation set's share of malignant cases, which a
temperature cannot do (a network trained with class-balanced weights answers near 0.5 on data
where 5 of 6 nodules are malignant; on the medium protocol's DDTI fold 1 the temperature ran to
its bound and left the ECE at 0.33, Platt scaling brought it to 0.05). Both keep ``a > 0``, so
the ranking (the ROC-AUC) of the probabilities never changes, and the operating threshold cuts
between the same cases. A model file stores ``(a, b)`` and the network's last linear layer is
changed to compute them (:func:`fold_calibration`), so every consumer (the server, the CLI,
Slicer) gets calibrated probabilities with no change to the served computation.

Calibrated probabilities hold for data with the validation set's share of malignant nodules
(DDTI: 5 of 6); a clinic whose share differs should calibrate on its own confirmed cases
(``thyroid-nodule calibrate``).

For a two-class softmax, ``p(malignant) = sigmoid(d)`` with ``d = logit_1 - logit_0``; the
functions below work on ``d``, which the stored validation probabilities give back as
``logit(p)``.
"""

from __future__ import annotations

import math
from typing import Mapping, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import nn


__all__ = ["CALIBRATION_METHODS", "Calibration", "calibrate_model_file", "calibrate_on_kept_validation",
           "calibrate_probabilities", "expected_calibration_error", "fit_calibration", "fit_platt", "fit_temperature",
           "fold_calibration", "fold_temperature", "plot_reliability", "probabilities_to_margins", "reliability_bins",
           "scale_probabilities"]

_EPS = 1e-7


def probabilities_to_margins(prob_malignant: Sequence[float]) -> np.ndarray:
    """``logit(p)``: the logit difference that gave each probability."""
    p = np.clip(np.asarray(prob_malignant, dtype=np.float64), _EPS, 1.0 - _EPS)
    return np.log(p) - np.log1p(-p)


def scale_probabilities(prob_malignant: Sequence[float], temperature: float) -> np.ndarray:
    """The probabilities after dividing their logits by ``temperature``."""
    return calibrate_probabilities(prob_malignant, 1.0 / float(temperature), 0.0)


def calibrate_probabilities(prob_malignant: Sequence[float], scale: float, shift: float) -> np.ndarray:
    """``sigmoid(scale * logit(p) + shift)`` of each probability."""
    return 1.0 / (1.0 + np.exp(-(float(scale) * probabilities_to_margins(prob_malignant) + float(shift))))


#: the ways :func:`fit_calibration` knows
CALIBRATION_METHODS = ("platt", "temperature")


class Calibration(NamedTuple):
    """``p -> sigmoid(scale * logit(p) + shift)``; ``method`` says how it was fitted."""

    method: str
    scale: float
    shift: float

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    def apply(self, prob_malignant: Sequence[float]) -> np.ndarray:
        return calibrate_probabilities(prob_malignant, self.scale, self.shift)

    def record(self) -> dict:
        return {"method": self.method, "scale": self.scale, "shift": self.shift, "temperature": self.temperature}

    @classmethod
    def of_record(cls, record: Optional[Mapping]) -> "Calibration":
        """The calibration a model file records (``temperature`` alone in files calibrated before
        Platt scaling existed; none: the identity)."""
        record = record or {}
        if "scale" in record:
            return cls(str(record.get("method", "platt")), float(record["scale"]), float(record.get("shift", 0.0)))
        return cls("temperature", 1.0 / float(record.get("temperature", 1.0)), 0.0)


IDENTITY = Calibration("none", 1.0, 0.0)


def fit_calibration(prob_malignant: Sequence[float], labels: Sequence[int], method: str = "platt") -> Calibration:
    """Fit ``method`` (``platt`` or ``temperature``) on validation predictions."""
    if method == "platt":
        return Calibration("platt", *fit_platt(prob_malignant, labels))
    if method == "temperature":
        return Calibration("temperature", 1.0 / fit_temperature(prob_malignant, labels), 0.0)
    raise ValueError(f"unknown calibration method {method!r}; one of {', '.join(CALIBRATION_METHODS)}")


def fit_platt(prob_malignant: Sequence[float], labels: Sequence[int], scale_bounds: tuple[float, float] = (0.05, 20.0),
              ) -> tuple[float, float]:
    """Platt scaling: the ``(scale, shift)`` of ``sigmoid(scale * logit(p) + shift)`` that
    minimise the negative log-likelihood of the validation labels, against Platt's smoothed
    targets (``(n1 + 1) / (n1 + 2)`` for malignant, ``1 / (n0 + 2)`` for benign cases), which
    keep the solution finite when a small validation set is separable. Newton's method with
    step halving (a convex problem in two unknowns); ``scale`` is held inside ``scale_bounds``
    (the temperature's bounds: positive, so the ranking never changes; with it at a bound the
    shift is fitted alone). ``(1.0, 0.0)`` when the labels hold one class only."""
    y = np.asarray(labels, dtype=np.float64)
    if y.size == 0 or y.min() == y.max():
        return 1.0, 0.0
    n1, n0 = float(y.sum()), float(y.size - y.sum())
    t = np.where(y > 0.5, (n1 + 1.0) / (n1 + 2.0), 1.0 / (n0 + 2.0))
    d = probabilities_to_margins(prob_malignant)

    def nll(a: float, b: float) -> float:
        z = a * d + b
        return float(np.mean(np.logaddexp(0.0, z) - t * z))

    def newton(a: float, b: float, fit_scale: bool) -> tuple[float, float]:
        f = nll(a, b)
        for _ in range(100):
            s = 1.0 / (1.0 + np.exp(-(a * d + b)))
            w = s * (1.0 - s) + 1e-12
            g = np.array([np.mean((s - t) * d), np.mean(s - t)])
            h = np.array([[np.mean(w * d * d), np.mean(w * d)], [np.mean(w * d), np.mean(w)]])
            if fit_scale:
                step = np.linalg.solve(h + 1e-9 * np.eye(2), g)
            else:
                step = np.array([0.0, g[1] / h[1, 1]])
            k = 1.0
            while k > 1e-8:  # halve the step until the likelihood improves
                a_new, b_new = a - k * step[0], b - k * step[1]
                f_new = nll(a_new, b_new)
                if f_new <= f:
                    break
                k /= 2.0
            else:
                break
            converged = abs(f - f_new) < 1e-12
            a, b, f = a_new, b_new, f_new
            if converged:
                break
        return a, b

    a, b = newton(1.0, 0.0, True)
    lo, hi = scale_bounds
    if not lo <= a <= hi or not math.isfinite(a):
        a = float(np.clip(a if math.isfinite(a) else hi, lo, hi))
        a, b = newton(a, 0.0, False)
    return float(a), float(b)


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
    """Divide the network's class logits by ``temperature`` in place (see :func:`fold_calibration`)."""
    return fold_calibration(network, 1.0 / float(temperature), 0.0)


def fold_calibration(network: nn.Module, scale: float, shift: float) -> nn.Module:
    """Make the network's probability of malignancy ``sigmoid(scale * d + shift)`` (``d`` its
    malignant-minus-benign logit) in place, by changing its last linear layer (``head[-1]`` of
    the saliency-guided classifier, ``fc``/``class_layers.out`` of the baselines: the last
    ``nn.Linear`` in module order): weights and bias times ``scale``, ``shift / 2`` added to the
    malignant bias and taken from the benign one. Returns the network."""
    last = network.get_submodule(last_linear_name(network))
    with torch.no_grad():
        weight, bias = _calibrated_layer(last.weight, last.bias, scale, shift)
        last.weight.copy_(weight)
        if bias is not None:
            last.bias.copy_(bias)
    return network


def _calibrated_layer(weight: torch.Tensor, bias: Optional[torch.Tensor], scale: float, shift: float):
    """The output layer's ``(weight, bias)`` computing the calibrated logits of a two-class network."""
    if shift != 0.0 and (bias is None or bias.shape[0] != 2):
        raise ValueError("a shift needs a two-class output layer with a bias")
    weight = weight.float() * float(scale)
    if bias is None:
        return weight, None
    bias = bias.float() * float(scale)
    if shift != 0.0:
        bias = bias + torch.tensor([-shift / 2.0, shift / 2.0], device=bias.device)
    return weight, bias


def plot_reliability(curves: dict, path: str, n_bins: int = 10, title: str = "Reliability") -> str:
    """A reliability diagram (observed fraction malignant against mean predicted probability per
    bin, with the diagonal of perfect calibration) of ``{name: (probabilities, labels)}``, each
    curve labelled with its ECE; written as PNG to ``path``."""
    from .reports import _pyplot, save_figure

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
    return save_figure(fig, path)


def last_linear_name(network: nn.Module) -> str:
    """Module name of the layer :func:`fold_temperature` scales."""
    name = None
    for n, m in network.named_modules():
        if isinstance(m, nn.Linear):
            name = n
    if name is None:
        raise ValueError("the network has no linear output layer to scale")
    return name


def calibrate_model_file(path: str, prob_malignant: Sequence[float], labels: Sequence[int], method: str = "platt") -> dict:
    """Fit a calibration (``method``: :data:`CALIBRATION_METHODS`) of a model file on its
    validation predictions and store it, atomically: the output layer computes the calibrated
    probabilities (:func:`fold_calibration`), the stored validation probabilities are re-mapped,
    the operating threshold is re-chosen on them (Youden's J: the same cut between the same
    cases), and ``calibration`` records the method, scale, shift (and temperature ``1/scale``)
    and the validation ECE before and after. A file calibrated before is first returned to its
    uncalibrated logits (calibrations do not compound).

    Returns the ``calibration`` record (with the new ``model`` identity)."""
    from .checkpoint import apply_operating_point, build_network, load_checkpoint, write_payload
    from .metrics import youden_threshold

    payload = load_checkpoint(path)
    previous = Calibration.of_record(payload.get("calibration"))
    name = last_linear_name(build_network(payload["network_def"]))
    # the predictions given are the file's own: undo an earlier calibration first
    raw = calibrate_probabilities(prob_malignant, 1.0 / previous.scale, -previous.shift / previous.scale)
    fitted = fit_calibration(raw, labels, method)
    weight, bias = payload["state_dict"][f"{name}.weight"], payload["state_dict"].get(f"{name}.bias")
    # back to the raw layer, then the new calibration (one composition: no rounding drift)
    raw_w, raw_b = _calibrated_layer(weight, bias, 1.0 / previous.scale, -previous.shift / previous.scale)
    new_w, new_b = _calibrated_layer(raw_w, raw_b, fitted.scale, fitted.shift)
    payload["state_dict"][f"{name}.weight"] = new_w.to(weight.dtype)
    if bias is not None:
        payload["state_dict"][f"{name}.bias"] = new_b.to(bias.dtype)
    calibrated = fitted.apply(raw)
    record = {**fitted.record(), "val_ece_before": expected_calibration_error(raw, labels),
              "val_ece_after": expected_calibration_error(calibrated, labels), "n": len(labels)}
    payload["calibration"] = record
    apply_operating_point(payload, youden_threshold(calibrated.tolist(), list(labels)), (calibrated.tolist(), list(labels)))
    record["model"] = write_payload(path, payload)  # one atomic write: weights, threshold and figures agree
    return record


def calibrate_on_kept_validation(path: str, method: str = "platt") -> Optional[dict]:
    """Calibrate a model file on the validation predictions it keeps (``engine.fit`` stores its
    best epoch's; a retrain on a site's confirmed cases thereby calibrates on that site's own
    held-out cases): :func:`calibrate_model_file` with them. ``None`` (the file left as it is)
    when it keeps none or they hold one class only, where there is nothing to calibrate against.

    Returns the ``calibration`` record (with the new ``model`` identity) or ``None``."""
    from .checkpoint import load_checkpoint, stored_validation

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; one of {', '.join(CALIBRATION_METHODS)}")
    scores = stored_validation(load_checkpoint(path).get("validation"))
    if scores is None or len(set(scores[1])) < 2:
        return None
    return calibrate_model_file(path, *scores, method=method)
