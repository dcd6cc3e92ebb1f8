"""The training recipe of the ``medium`` protocol and the shipped model: lesion-centred crops with
a random margin and whole frames (:mod:`thyroid_plugin.lesion`), ultrasound augmentation for
scanner shift (:mod:`thyroid_plugin.us_augment`), more lesions from BUS-BRA (mixed in, or as
pre-training), evaluation against the box margin, and calibration on the validation data
(Platt scaling by default, ``settings["calibration"]``; :mod:`thyroid_plugin.calibration`).

Evaluation of one trained network on a test set (:func:`evaluate_recipe`):

- ROC-AUC with a box of each margin in ``settings["test_margins"]`` (tight, 25 %, 50 %, whole
  frame), the box drawn from the expert mask as a user would draw it;
- the headline figures at ``settings["headline_margin"]`` (25 %: a loose box), with the
  probabilities calibrated on the validation predictions (``settings["calibration"]``:
  ``platt``, the default, or ``temperature``); the expected calibration error before and after,
  and that of the other method too (``ece_temperature`` / ``ece_platt``), so the two can be
  compared on the same runs; accuracy, sensitivity, specificity, F1 and balanced accuracy at the
  operating point the product would serve (Youden's J on the calibrated validation predictions,
  ``threshold``);
- saliency against the mask on whole frames (where the map and the mask share a grid);
- a whole frame without a box, classified on the crop its own saliency map points at
  (``auc_saliency_box``: the saliency network as a nodule localiser).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from .calibration import IDENTITY, expected_calibration_error, fit_calibration
from .data import datalist_from_csv, grouped_split
from .lesion import FrameCache, box_from_saliency, LesionCropd, RandLesionCropd, margin_box, margin_label, margins_from
from .metrics import binary_metrics, youden_threshold
from .transforms import augmentation_transforms
from .us_augment import ultrasound_shift_transforms

__all__ = ["CropInputs", "DDTI_RECIPES", "box_sources", "training_inputs", "evaluate_recipe", "margin_key", "recipe_train_list"]

logger = logging.getLogger(__name__)

#: how DDTI folds use BUS-BRA: not at all, mixed into every fold's training set, or a network
#: pre-trained once on all of BUS-BRA and fine-tuned on each fold
DDTI_RECIPES = ("alone", "mixed", "pretrain")


def margin_key(margin: Optional[float]) -> str:
    """``auc_tight``, ``auc_25``, ``auc_50``, ``auc_whole``: the result key of a margin."""
    if margin is None:
        return "auc_whole"
    return "auc_tight" if margin == 0 else f"auc_{round(100 * margin)}"


class CropInputs:
    """Training and evaluation inputs of the recipe, all cut from one :class:`FrameCache`."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.settings = settings
        self.size = int(settings["image_size"])
        self.cache = FrameCache(self.size, user_boxes=bool(settings.get("user_boxes")))
        # evaluation inputs kept across variants (``cache_eval_inputs``: worth its memory when
        # many variants are evaluated on the same boxes, as in the ``gpu`` protocol)
        self._inputs: Optional[dict] = {} if settings.get("cache_eval_inputs") else None

    def train_transforms(self) -> list:
        crops = dict(self.settings.get("crops") or {})
        return ([RandLesionCropd(self.cache, **crops)] + augmentation_transforms(self.size, self.settings.get("augmentation"))
                + ultrasound_shift_transforms(self.settings.get("us_augmentation")))

    def val_transforms(self) -> list:
        return [LesionCropd(self.cache, self.settings.get("val_margin", 0.25))]

    def boxed(self, items: Sequence[Mapping], margin: Optional[float]) -> list[dict]:
        """The items with the box a user would draw at ``margin`` as ``roi`` (none for the whole
        frame or without a lesion mask)."""
        out = []
        for d in items:
            box = self.cache.box(d)
            roi = None if margin is None or box is None else list(margin_box(box, margin, self.cache.frame(d).shape[:2]))
            out.append({**d, "roi": roi})
        return out

    def prepare(self, item: Mapping) -> torch.Tensor:
        """Network input of an item: its ``roi`` crop, or the whole frame."""
        roi = tuple(item.get("roi") or ()) or None
        if self._inputs is None:
            return self.cache.crop(item, roi)
        key = (str(item["image"]), roi)
        if key not in self._inputs:
            self._inputs[key] = self.cache.crop(item, roi)
        return self._inputs[key]


#: the keys of ``configs/train.json``'s ``recipe`` section, and of its ``crops``
RECIPE_KEYS = ("crops", "us_augmentation", "val_margin")
CROP_KEYS = ("max_margin", "jitter", "whole_frame_prob")


def training_inputs(recipe: Optional[Mapping[str, Any]], image_size: int,
                    augmentation: Optional[Mapping[str, Any]] = None) -> Optional[CropInputs]:
    """The inputs of a training run configured by ``configs/train.json`` (the server's retraining
    and ``thyroid-nodule train``): with a ``recipe`` section, the shipped model's recipe (crops
    around each case's box with a random margin and jitter, a share of whole frames, ultrasound
    augmentation on top of ``augmentation``, validation at ``val_margin`` around the box); each
    case's box is the ``roi`` a user confirmed, else its lesion mask's, else none (the whole
    frame). ``None`` without a recipe: whole frames, or the ``roi`` crop, as before.

    Raises:
        ValueError: an unknown key or a value out of range, in one line.
    """
    if not recipe:
        return None
    unknown = sorted(set(recipe) - set(RECIPE_KEYS)) + sorted(set(recipe.get("crops") or {}) - set(CROP_KEYS))
    if unknown:
        raise ValueError(f"unknown recipe settings {unknown} (known: {', '.join(RECIPE_KEYS + CROP_KEYS)})")
    crops = dict(recipe.get("crops") or {})
    val_margin = recipe.get("val_margin", 0.25)
    checks = {"crops.max_margin": (crops.get("max_margin", 0.6), 0.0, 5.0), "crops.jitter": (crops.get("jitter", 0.1), 0.0, 1.0),
              "crops.whole_frame_prob": (crops.get("whole_frame_prob", 0.2), 0.0, 1.0), "val_margin": (val_margin, 0.0, 5.0)}
    for key, (value, low, high) in checks.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise ValueError(f"recipe {key} must be a number in [{low:g}, {high:g}], got {value!r}")
    return CropInputs({"image_size": int(image_size), "crops": crops, "augmentation": augmentation,
                       "us_augmentation": recipe.get("us_augmentation"), "val_margin": float(val_margin), "user_boxes": True})


def box_sources(inputs: CropInputs, items: Sequence[Mapping]) -> dict[str, int]:
    """How many ``items`` take their box from a confirmed ``roi``, from a lesion mask, or have
    none (trained and validated on the whole frame)."""
    counts = {"mask": 0, "roi": 0, "none": 0}
    for d in items:
        counts[inputs.cache.box_source(d)] += 1
    return counts


def recipe_train_list(dataset: str, train: Sequence[Mapping], settings: Mapping[str, Any], data_root: Path) -> list:
    """The training list of a split: BUS-BRA added to DDTI folds with the ``mixed`` recipe."""
    if dataset == "ddti" and settings.get("ddti_recipe") == "mixed":
        return list(train) + datalist_from_csv(data_root / "busbra" / "labels.csv")
    return list(train)


def pretraining_split(settings: Mapping[str, Any], data_root: Path) -> tuple[list, list]:
    """All of BUS-BRA, patient-grouped into training and validation (never DDTI's test data:
    the two collections share nothing)."""
    items = datalist_from_csv(data_root / "busbra" / "labels.csv")
    return grouped_split(items, settings["val_fraction"], settings["seed"])


def saliency_boxed(items: Sequence[Mapping], maps: Mapping[str, Any], margin: float) -> list[dict]:
    """The items boxed where their whole-frame saliency map points (:func:`box_from_saliency`);
    items without a map or with a flat one stay whole frames."""
    out = []
    for d in items:
        m = maps.get(d["image"])
        box = box_from_saliency(m, m.shape, margin) if m is not None else None
        out.append({**d, "roi": list(box) if box else None})
    return out


def evaluate_recipe(network: torch.nn.Module, variant: str, test: Sequence[Mapping], inputs: CropInputs,
                    validation: Optional[tuple[Sequence[float], Sequence[int]]],
                    evaluate: Callable[..., dict]) -> dict:
    """Test figures of a trained network (see the module docstring). ``validation`` is the
    ``(probabilities, labels)`` of its best epoch on the validation set (calibration);
    ``evaluate(network, variant, items, prepare)`` is the protocol's evaluation of a list.

    Returns ``{"test": summary, "records": per image, "temperature": T, "calibration": record}``."""
    settings = inputs.settings
    headline = settings.get("headline_margin", 0.25)
    by_margin: dict = {}
    for margin in margins_from(settings.get("test_margins", [0.0, 0.25, 0.5, None])):
        keep = [d["image"] for d in test] if margin is None else ()
        by_margin[margin] = evaluate(network, variant, inputs.boxed(test, margin), inputs.prepare, keep_maps=keep)
    if headline not in by_margin:
        by_margin[headline] = evaluate(network, variant, inputs.boxed(test, headline), inputs.prepare)
    main = by_margin[headline]
    raw = [r["prob_malignant"] for r in main["records"]]
    labels = [r["label"] for r in main["records"]]
    summary, calibrated, calibration = calibrated_figures(raw, labels, validation, settings.get("calibration", "platt"))
    for margin, result in by_margin.items():
        summary[margin_key(margin)] = result["summary"]["auc"]
    whole = by_margin.get(None)
    if whole is not None:
        for key in ("energy_in_mask", "pointing_game", "iou", "saliency_source"):
            if key in whole["summary"]:
                summary[key] = whole["summary"][key]
        if whole["maps"]:
            localised = evaluate(network, variant, saliency_boxed(test, whole["maps"], headline or 0.25), inputs.prepare)
            summary["auc_saliency_box"] = localised["summary"]["auc"]
    summary["headline_margin"] = margin_label(headline)
    records = [{**r, "prob_malignant": p, "prob_uncalibrated": q} for r, p, q in zip(main["records"], calibrated, raw)]
    return {"test": summary, "records": records, "temperature": calibration.temperature,
            "calibration": calibration.record()}


#: the fields :func:`calibrated_figures` computes (what :func:`rescore` replaces in a finished run)
CALIBRATED_FIELDS = ("threshold", "ece", "ece_uncalibrated", "ece_platt", "ece_temperature", "temperature",
                     "calibration_shift", "calibration_method")


def calibrated_figures(raw: Sequence[float], labels: Sequence[int], validation: Optional[tuple[Sequence[float], Sequence[int]]],
                       method: str):
    """The headline figures of uncalibrated test probabilities ``raw``: calibrated by ``method``
    fitted on ``validation``, the threshold metrics at the operating point the product would
    serve (Youden's J on the calibrated validation predictions: after a shift towards the
    malignant share, 0.5 no longer balances the classes), the ECE before and after, and after
    the other method. Returns ``(summary, calibrated probabilities, calibration)``."""
    calibration = fit_calibration(*validation, method=method) if validation else IDENTITY
    calibrated = calibration.apply(raw).tolist()
    threshold = youden_threshold(calibration.apply(validation[0]).tolist(), validation[1]) if validation else 0.5
    summary = binary_metrics(calibrated, labels, threshold)
    summary["threshold"] = threshold
    summary["ece"] = expected_calibration_error(calibrated, labels)
    summary["ece_uncalibrated"] = expected_calibration_error(raw, labels)
    if validation:
        other = "temperature" if method == "platt" else "platt"
        summary[f"ece_{other}"] = expected_calibration_error(fit_calibration(*validation, method=other).apply(raw), labels)
    summary["temperature"] = calibration.temperature
    summary["calibration_shift"] = calibration.shift
    summary["calibration_method"] = calibration.method
    return summary, calibrated, calibration


def scored_by(result: Mapping, method: str) -> bool:
    """Whether a finished run's figures follow today's rule (``method``, the served threshold)."""
    test = result.get("test") or {}
    return test.get("calibration_method") == method and "threshold" in test


def rescore(result: dict, validation: tuple[Sequence[float], Sequence[int]], method: str) -> dict:
    """A finished run (a protocol result) with its calibrated figures computed again by
    :func:`calibrated_figures` from its kept uncalibrated test probabilities and ``validation``,
    so that runs scored by an earlier rule are averaged with today's alike. Threshold-free
    figures (AUCs, saliency) stay as they were."""
    raw = [r["prob_uncalibrated"] for r in result["records"]]
    labels = [int(r["label"]) for r in result["records"]]
    summary, calibrated, _ = calibrated_figures(raw, labels, validation, method)
    test = {k: v for k, v in result["test"].items() if k not in CALIBRATED_FIELDS}
    result = {**result, "test": {**test, **summary},
              "records": [{**r, "prob_malignant": p} for r, p in zip(result["records"], calibrated)],
              "validation": {"prob_malignant": list(validation[0]), "label": list(validation[1])}}
    result["rescored"] = f"calibrated figures recomputed ({method}, threshold at Youden's J on the calibrated validation)"
    return result
