"""Model files: written atomically, read without unpickling code, identified by checksum.

A model file is ``torch.save`` of a plain dict (tensors, numbers, strings, lists, dicts only, so
``torch.load(weights_only=True)`` reads it)::

    {"format": "thyroid_plugin.checkpoint/1",
     "network_def": {"_target_": "thyroid_plugin.networks.SaliencyGuidedClassifier", ...},
     "state_dict": {...},            # fp16 when published, BatchNorm statistics kept in fp32
     "image_size": 224, "class_names": ["benign", "malignant"],
     "threshold": 0.73,              # operating point chosen on validation data
     "metrics": {"auc": ..., ..., "threshold": 0.73},   # validation metrics at that threshold
     "validation": {"prob_malignant": [...], "label": [...]},   # the validation predictions
     "created": "2026-11-27T20:00:00Z", "train": {...}}   # what it was trained on and how

The validation predictions let :func:`validation_metrics` give the thresholded metrics at
whatever threshold the model serves with. Files written before they were stored hold metrics at
probability 0.5 (and no ``validation``).
"""

from __future__ import annotations

import datetime
import hashlib
import io
import os
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from .constants import CHECKPOINT_FORMAT, CLASS_NAMES
from .errors import InvalidModelError, ModelNotFoundError
from .io import atomic_write_bytes
from .metrics import THRESHOLDED_METRICS, operating_point_metrics

__all__ = ["build_network", "file_checksum", "load_checkpoint", "model_identity", "save_checkpoint", "validation_metrics"]

_NETWORK_TARGETS = {
    "thyroid_plugin.networks.SaliencyGuidedClassifier": "SaliencyGuidedClassifier",
    "thyroid_plugin.networks.classifier.SaliencyGuidedClassifier": "SaliencyGuidedClassifier",
    "thyroid_plugin.networks.BaselineClassifier": "BaselineClassifier",
    "thyroid_plugin.networks.baselines.BaselineClassifier": "BaselineClassifier",
}


def file_checksum(path: os.PathLike | str) -> str:
    """SHA-256 of a file, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as fp:
        for chunk in iter(lambda: fp.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_identity(path: os.PathLike | str) -> str:
    """A short, stable identity of a model file: ``sha256:<first 16 hex digits>``."""
    return f"sha256:{file_checksum(path)[:16]}"


def _to_plain(value: Any) -> Any:
    """Keep only what ``weights_only`` loading accepts (numbers, strings, lists, dicts, tensors)."""
    if isinstance(value, Mapping):
        return {str(k): _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None or torch.is_tensor(value):
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def save_checkpoint(
    path: os.PathLike | str,
    network: nn.Module,
    network_def: Mapping[str, Any],
    image_size: int,
    metrics: Optional[Mapping[str, Any]] = None,
    train_info: Optional[Mapping[str, Any]] = None,
    half: bool = True,
    threshold: Optional[float] = None,
    validation: Optional[tuple[Sequence[float], Sequence[int]]] = None,
) -> str:
    """Write a model file atomically (a reader sees the old file or the new one, never half).

    Args:
        path: destination.
        network: the trained network (a DDP wrapper is unwrapped).
        network_def: the config that builds it (``_target_`` plus arguments).
        image_size: side of the square network input it was trained at.
        metrics: validation metrics to record with it.
        train_info: anything else worth keeping (data, epochs, loss form, ...).
        threshold: the malignant-probability operating point chosen on validation data (Youden's
            J); inference uses it unless configured otherwise. Default 0.5.
        half: store floating weights as fp16 (BatchNorm statistics stay fp32): half the size,
            and inference loads them back to the compute precision.
        validation: ``(prob_malignant (N,), labels (N,))`` of the validation data the metrics
            and the threshold come from.

    Returns:
        the model's identity (:func:`model_identity`).
    """
    module = network.module if hasattr(network, "module") else network
    module = getattr(module, "_orig_mod", module)  # torch.compile wrapper
    state = {}
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu()
        if half and t.is_floating_point() and not name.endswith(("running_mean", "running_var")):
            t = t.half()
        state[name] = t.clone()
    payload = {
        "format": CHECKPOINT_FORMAT,
        "network_def": _to_plain(dict(network_def)),
        "state_dict": state,
        "image_size": int(image_size),
        "class_names": list(CLASS_NAMES),
        "metrics": _to_plain(dict(metrics or {})),
        "threshold": float(threshold) if threshold is not None and 0.0 < float(threshold) < 1.0 else 0.5,
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "train": _to_plain(dict(train_info or {})),
    }
    if validation is not None:
        payload["validation"] = _validation_record(*validation)
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    return _write(path, payload)


def _write(path: os.PathLike | str, payload: Mapping[str, Any]) -> str:
    buf = io.BytesIO()
    torch.save(dict(payload), buf)
    atomic_write_bytes(path, buf.getvalue())
    return model_identity(path)


def _validation_record(prob_malignant: Sequence[float], labels: Sequence[int]) -> dict:
    p = [float(v) for v in prob_malignant]
    y = [int(v) for v in labels]
    if len(p) != len(y):
        raise ValueError(f"{len(p)} validation probabilities for {len(y)} labels")
    return {"prob_malignant": p, "label": y}


def validation_metrics(payload: Mapping[str, Any], threshold: Optional[float] = None) -> dict:
    """A model file's validation metrics at ``threshold`` (default: its stored operating point),
    with ``threshold`` saying which.

    The thresholded metrics (:data:`~thyroid_plugin.metrics.THRESHOLDED_METRICS`) are computed
    from the stored validation predictions. A file without them (written before they were
    stored) has its figures at 0.5; at any other threshold they are left out rather than shown
    for the wrong threshold.
    """
    stored = dict(payload.get("metrics") or {})
    t = float(payload.get("threshold", 0.5) if threshold is None else threshold)
    untouched = {k: v for k, v in stored.items() if k not in THRESHOLDED_METRICS and k != "threshold"}
    scores = stored_validation(payload.get("validation"))
    if scores is not None:
        return {**untouched, **operating_point_metrics(*scores, t)}
    if abs(t - 0.5) < 1e-9:
        return {**stored, "threshold": t}
    return {**untouched, "threshold": t}


def stored_validation(record: Any) -> Optional[tuple[list, list]]:
    """``(prob_malignant, labels)`` of a file's ``validation`` record; ``None`` if it has none
    (or a malformed one: a model file may come from anywhere)."""
    if not isinstance(record, Mapping):
        return None
    try:
        p, y = [float(v) for v in record["prob_malignant"]], [int(v) for v in record["label"]]
    except (KeyError, TypeError, ValueError):
        return None
    return (p, y) if len(p) == len(y) and p else None


def load_checkpoint(path: os.PathLike | str, map_location: str | torch.device = "cpu") -> dict:
    """Read a model file safely (no code is unpickled).

    Raises:
        ModelNotFoundError: no file.
        InvalidModelError: not a thyroid_plugin model file, or damaged.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelNotFoundError(f"model file not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # garbage fails with UnpicklingError, BadZipFile, EOFError, IndexError, KeyError, ...
        raise InvalidModelError(f"{os.path.basename(path)} is not a readable model file ({type(e).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise InvalidModelError(f"{os.path.basename(path)} is not a thyroid_plugin model file (format {CHECKPOINT_FORMAT})")
    if list(payload.get("class_names", [])) != list(CLASS_NAMES):
        raise InvalidModelError(f"{os.path.basename(path)} has classes {payload.get('class_names')}, expected {list(CLASS_NAMES)}")
    state, spec, size = payload.get("state_dict"), payload.get("network_def"), payload.get("image_size")
    if (not isinstance(spec, dict) or not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values())
            or isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        raise InvalidModelError(f"{os.path.basename(path)} is damaged: it lacks the network, its weights or its input size")
    return payload


def build_network(network_def: Mapping[str, Any]) -> nn.Module:
    """Instantiate the network a checkpoint names. Only thyroid_plugin networks are accepted, so
    a model file cannot make the server import arbitrary code."""
    spec = dict(network_def)
    target = spec.pop("_target_", None)
    if target not in _NETWORK_TARGETS:
        raise InvalidModelError(f"unsupported network {target!r} in model file")
    from . import networks

    try:
        return getattr(networks, _NETWORK_TARGETS[target])(**spec)
    except (TypeError, ValueError) as e:
        raise InvalidModelError(f"bad network arguments in model file: {e}") from None


def network_from_checkpoint(payload: Mapping[str, Any], dtype: torch.dtype = torch.float32) -> nn.Module:
    """The network of a loaded checkpoint with its weights, in ``dtype``, in eval mode."""
    network = build_network(payload["network_def"])
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in payload["state_dict"].items()}
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise InvalidModelError(f"the weights do not fit the network: {str(e).splitlines()[0]}") from None
    return network.to(dtype).eval()


def set_threshold(path: os.PathLike | str, threshold: float,
                  validation: Optional[tuple[Sequence[float], Sequence[int]]] = None) -> str:
    """Store a new operating point in a model file (atomically, weights untouched); returns the
    new identity.

    Args:
        validation: ``(prob_malignant (N,), labels (N,))`` the threshold was chosen on: stored,
            and the model's metrics become theirs at ``threshold`` (see :func:`validation_metrics`).
    """
    return write_payload(path, apply_operating_point(load_checkpoint(path), threshold, validation))


def apply_operating_point(payload: dict, threshold: float,
                          validation: Optional[tuple[Sequence[float], Sequence[int]]] = None) -> dict:
    """Set a loaded model file's operating point (and, with ``validation``, its stored validation
    predictions and its metrics at that point) in place; see :func:`set_threshold`."""
    if not 0.0 < float(threshold) < 1.0:
        raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
    payload["threshold"] = float(threshold)
    if validation is not None:
        payload["validation"] = _validation_record(*validation)
        payload["metrics"] = _to_plain({**operating_point_metrics(*validation, float(threshold)), "n": len(validation[1])})
    return payload


def write_payload(path: os.PathLike | str, payload: Mapping[str, Any]) -> str:
    """Write a (loaded and changed) model file's payload atomically; returns its identity."""
    return _write(path, payload)
