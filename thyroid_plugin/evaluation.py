"""Evaluation protocols: does the saliency-guided method hold up on real ultrasound, and where
does its saliency look?

One command (``thyroid-nodule protocol --protocol quick --out DIR``) trains every variant on every
split with the same budget, augmentation and input size, evaluates on the held-out images, and
writes ``results.json`` (every number), ``tables.md``, ROC curves and saliency overlays.

Splits:

- ``ddti``: case-grouped, stratified 5-fold cross-validation of DDTI (thyroid);
- ``busbra``: BUS-BRA's official 5 folds (``5-fold-cv.csv``: test ``kFold == k``, train
  ``valid_k == 1``, validation ``valid_k == 0``);
- ``busbra_cross``: train on one scanner, test on two others: GE Logiq 7 -> GE Logiq 5 + Toshiba
  Aplio 300, and GE Logiq 5 -> GE Logiq 7 + Toshiba Aplio 300.

The validation images (never the test images) choose each run's best epoch. The expert lesion
masks are used only to score saliency: energy inside the mask, the pointing game, and the IoU of
the saliency thresholded at its own mean + 1 standard deviation. Variants without a saliency
network are scored with Grad-CAM of their last feature map (post-hoc, for comparison).
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.visualize import GradCAM
from monai.visualize.class_activation_maps import ModelWithHooks

from .data import cross_centre_split, datalist_from_csv, grouped_kfold, grouped_split
from .engine import TrainSettings, fit, predict
from .io import atomic_write_bytes, atomic_write_json, load_image
from .losses import SaliencyGuidedLoss
from .metrics import METRIC_NAMES, binary_metrics
from .networks import BASELINES, BaselineClassifier, SaliencyGuidedClassifier
from .calibration import plot_reliability
from .recipe import CropInputs, evaluate_recipe, pretraining_split, recipe_train_list, rescore, scored_by
from .reports import plot_roc, saliency_vs_mask

__all__ = ["PROTOCOLS", "VARIANTS", "Split", "build_splits", "run_protocol", "summarize"]

logger = logging.getLogger(__name__)

#: the compared variants: the network, the loss form, and a label for reports
VARIANTS: dict[str, dict] = {
    "full_reference": {"network": {"variant": "full"}, "loss": "reference", "label": "1. full method, reference losses"},
    "full_wellposed": {"network": {"variant": "full"}, "loss": "wellposed", "label": "2. full method, well-posed losses"},
    "full_ce_only": {"network": {"variant": "full"}, "loss": "none", "label": "3. full method, cross-entropy only"},
    "single_branch": {"network": {"variant": "single_branch"}, "loss": "none", "label": "4. single branch, no saliency network"},
    "resnet18": {"baseline": "resnet18", "loss": "none", "label": "5a. ResNet-18 (MONAI, from scratch)"},
    "densenet121": {"baseline": "densenet121", "loss": "none", "label": "5b. DenseNet-121 (MONAI, from scratch)"},
}

#: protocol settings; every variant of a protocol gets exactly these
PROTOCOLS: dict[str, dict] = {
    # CPU: about two hours on 2 cores for every split and variant
    "quick": {"image_size": 64, "epochs": 4, "batch_size": 32, "lr": 5e-4, "val_fraction": 0.15, "seed": 0},
    # the paper's schedule (224x224, 150 epochs, Adam 1e-4); for a GPU
    "full": {"image_size": 224, "epochs": 150, "batch_size": 32, "lr": 1e-4, "val_fraction": 0.15, "seed": 0,
             "early_stop_patience": 30},
    # CPU, the product's recipe (thyroid_plugin/recipe.py): lesion-centred crops with a random
    # margin and whole frames, ultrasound augmentation, BUS-BRA pre-training for DDTI, evaluation
    # against the box margin, Platt calibration on validation; as many epochs as validation improves
    "medium": {"image_size": 128, "epochs": 40, "batch_size": 32, "lr": 3e-4, "val_fraction": 0.15, "seed": 0,
               "early_stop_patience": 8,
               "crops": {"max_margin": 0.6, "jitter": 0.1, "whole_frame_prob": 0.2},
               "us_augmentation": {"shift_prob": 0.3, "marks_prob": 0.3},
               "val_margin": 0.25, "test_margins": [0.0, 0.25, 0.5, None], "headline_margin": 0.25,
               "ddti_recipe": "pretrain", "pretrain_epochs": 12, "calibration": "platt"},
}
# CPU, the medium recipe at 96 px on a shorter schedule (8 pre-training epochs, at most 20 per
# fold, patience 6): DDTI's 5 folds of one variant in about an hour of a 2-core CPU with bf16,
# where the medium run takes 8-10 hours, longer than a development machine has kept its files
PROTOCOLS["compact"] = {**PROTOCOLS["medium"], "image_size": 96, "epochs": 20, "early_stop_patience": 6,
                        "pretrain_epochs": 8}
# one GPU, sized in time: the medium recipe at the paper's 224 px, Adam 1e-4 and loss weights
# (each variant's own loss form), every variant on DDTI's 5 folds (from BUS-BRA pre-training) and
# BUS-BRA cross-device. Training time is capped: ``time_budget_s`` for all the protocol's
# training, shared among its runs by training-set size, each run stopping after the epoch that
# spends its share (or earlier: patience, the epoch cap); start-up, evaluation and each run's
# set-up come on top. Measured on one H200 with 16 cores (docs/evaluation.md): training steps at
# 224 px run at 650-790 frames/s for the saliency-guided variants (2,900-3,800 for single branch
# and ResNet-18), while an epoch of the BUS-BRA pre-training (1,615 frames, validation included)
# took 2.8-4.4 s with 12 loader processes, 370-580 frames/s: loader-bound, so ``num_workers``
# takes 14 of the 16 cores (the main process keeps two). Evaluation runs on the device and reuses
# the evaluation crops across variants.
PROTOCOLS["gpu"] = {**PROTOCOLS["medium"], "image_size": 224, "lr": 1e-4, "batch_size": 32, "epochs": 30,
                    "pretrain_epochs": 30, "early_stop_patience": 8, "time_budget_s": 300, "num_workers": 14,
                    "cache_eval_inputs": True, "datasets": ["ddti", "busbra_cross"]}

#: the protocols' datasets (see the module docstring)
DATASETS = ("ddti", "busbra", "busbra_cross")

CROSS_DEVICE = {
    "logiq7_to_others": (["GE Logiq 7 @10-14MHz"], ["GE Logiq 5 @10-12MHz", "Toshiba Aplio 300 @12-14 MHz"]),
    "logiq5_to_others": (["GE Logiq 5 @10-12MHz"], ["GE Logiq 7 @10-14MHz", "Toshiba Aplio 300 @12-14 MHz"]),
}


@dataclass
class Split:
    """One train / validation / test split of a dataset."""

    dataset: str  # ddti | busbra | busbra_cross
    name: str  # fold1 ... | logiq7_to_others ...
    train: list = field(repr=False)
    val: list = field(repr=False)
    test: list = field(repr=False)


def _busbra_official_folds(root: Path) -> list[tuple[str, list, list, list]]:
    items = datalist_from_csv(root / "labels.csv")
    by_id = {Path(d["image"]).stem: d for d in items}
    with open(root / "5-fold-cv.csv", newline="") as fp:
        rows = list(csv.DictReader(fp))
    folds = []
    for k in range(1, 6):
        train, val, test = [], [], []
        for r in rows:
            d = by_id.get(r["ID"])
            if d is None:
                continue
            if r["kFold"] == str(k):
                test.append(d)
            elif r[f"valid_{k}"] == "1":
                train.append(d)
            else:
                val.append(d)
        folds.append((f"fold{k}", train, val, test))
    return folds


def build_splits(data_root: Path, datasets: Sequence[str], val_fraction: float = 0.15, seed: int = 0) -> list[Split]:
    """The splits of the requested datasets (of :data:`DATASETS`)."""
    unknown = set(datasets) - set(DATASETS)
    if unknown or not datasets:
        raise ValueError(f"unknown datasets {sorted(unknown)}; use {', '.join(DATASETS)}")
    splits: list[Split] = []
    if "ddti" in datasets:
        items = datalist_from_csv(data_root / "ddti" / "labels.csv")
        for k, (train, test) in enumerate(grouped_kfold(items, 5, seed), start=1):
            tr, va = grouped_split(train, val_fraction, seed + k)
            splits.append(Split("ddti", f"fold{k}", tr, va, test))
    if "busbra" in datasets:
        for name, train, val, test in _busbra_official_folds(data_root / "busbra"):
            splits.append(Split("busbra", name, train, val, test))
    if "busbra_cross" in datasets:
        items = datalist_from_csv(data_root / "busbra" / "labels.csv")
        for name, (source, target) in CROSS_DEVICE.items():
            train, test = cross_centre_split(items, source, target)
            tr, va = grouped_split(train, val_fraction, seed)
            splits.append(Split("busbra_cross", name, tr, va, test))
    return splits


def build_variant(name: str) -> torch.nn.Module:
    spec = VARIANTS[name]
    if "baseline" in spec:
        return BaselineClassifier(spec["baseline"])
    return SaliencyGuidedClassifier(**spec["network"])


def _feature_layer(network: torch.nn.Module, name: str) -> Optional[torch.nn.Module]:
    if isinstance(network, BaselineClassifier):
        return network.get_submodule(BASELINES[network.name])
    if getattr(network, "saliency", None) is None:  # single branch: the last encoder stage
        return network.encoder.image_stages[-1]
    return None


class _LogitsOf(torch.nn.Module):
    """``network`` with its class logits as the output, the form MONAI's CAM classes expect."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x).logits


class _EachImagesClass(ModelWithHooks):
    """MONAI's hooks, scoring each image's own class: MONAI 1.6 indexes ``logits[:, class_idx]``,
    which with the per-image predicted classes of a batch mixes the images' classes."""

    def class_score(self, logits: torch.Tensor, class_idx) -> torch.Tensor:
        idx = torch.as_tensor(class_idx, device=logits.device).reshape(-1, 1).expand(logits.shape[0], 1)
        return logits.gather(1, idx).squeeze(1)


def grad_cam(network: torch.nn.Module, layer: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Grad-CAM of the predicted class (``monai.visualize.GradCAM`` at ``layer``), as a function
    ``(B, 3, S, S) -> (B, 1, S, S)`` in ``[0, 1]`` (each map divided by its peak; all-zero maps stay 0).

    MONAI keeps its hooks on ``layer`` for the network's lifetime: for a network being evaluated."""
    name = next(n for n, m in network.named_modules() if m is layer)
    hooks = _EachImagesClass(_LogitsOf(network), f"network.{name}", register_forward=True, register_backward=True)
    cam = GradCAM(hooks, target_layers=f"network.{name}",
                  postprocessing=lambda m: m / m.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12))

    def explain(x: torch.Tensor) -> torch.Tensor:
        # MONAI puts the wrapped module back in the mode the wrapper was in: the network's own
        hooks.model.train(network.training)
        with torch.enable_grad():
            return cam(x).detach()

    return explain


class Preprocessed:
    """Each frame decoded, cropped and resized once per protocol run, shared by every variant:
    ``cache(item) -> (3, S, S)`` float tensor (the deterministic part of the training and
    inference pipelines)."""

    def __init__(self, image_size: int) -> None:
        from monai.transforms import Compose

        from .transforms import preprocess_transforms

        self.transforms = Compose(preprocess_transforms(image_size))
        self._cache: dict = {}

    def __call__(self, item: Mapping) -> torch.Tensor:
        key = (item["image"], tuple(item.get("roi") or ()))
        if key not in self._cache:
            self._cache[key] = torch.as_tensor(self.transforms({"image": item["image"], "roi": item.get("roi")})["image"]).float()
        return self._cache[key]

    def transform(self):
        """A dictionary transform that replaces ``image`` by its cached tensor."""
        cache = self

        class FromCache:
            def __call__(self, data):
                d = dict(data)
                d["image"] = cache(d)
                return d

        return FromCache()


def _own_saliency(x: torch.Tensor, out) -> torch.Tensor:
    return torch.sigmoid(out.saliency_logits.float())


def evaluate_split(network: torch.nn.Module, name: str, items: Sequence[Mapping], prepare: Callable[[Mapping], torch.Tensor],
                   batch_size: int = 32, keep_maps: Iterable[str] = (), device: str | torch.device = "cpu") -> dict:
    """Probabilities, classification metrics and saliency-vs-mask measures on ``items``, computed
    on ``device`` (where ``network`` is).

    Saliency is the network's own map (resized back to each frame) or, without a saliency
    network, Grad-CAM. Returns per-image records, the summary and the kept maps."""
    layer = _feature_layer(network, name)
    saliency = None
    if getattr(network, "saliency", None) is not None:
        saliency = _own_saliency
    elif layer is not None:
        cam = grad_cam(network, layer)

        def saliency(x: torch.Tensor, out) -> torch.Tensor:
            return cam(x)

    batches = ({"image": torch.stack([prepare(d) for d in items[i : i + batch_size]]),
                "label": torch.tensor([int(d["label"]) for d in items[i : i + batch_size]])} for i in range(0, len(items), batch_size))
    predictions = predict(network, batches, torch.device(device), saliency=saliency)
    keep = set(keep_maps)
    records, maps = [], {}
    for n, d in enumerate(items):
        rec = {"image": d["image"], "label": int(d["label"]), "prob_malignant": float(predictions.prob_malignant[n])}
        if predictions.saliency is not None and d.get("mask") and not d.get("roi"):
            m = np.asarray(load_image(d["mask"]).array)  # the lesion mask, on the frame's grid
            m = m[..., 0] if m.ndim == 3 else m
            s = F.interpolate(predictions.saliency[n : n + 1], size=m.shape, mode="bilinear", align_corners=False)[0, 0].numpy()
            rec.update(saliency_vs_mask(s, m))
            if d["image"] in keep:
                maps[d["image"]] = s
        records.append(rec)
    summary = binary_metrics(predictions.prob_malignant, predictions.labels)
    for key in ("energy_in_mask", "pointing_game", "iou"):
        values = [r[key] for r in records if key in r and not math.isnan(r[key])]
        summary[key] = float(np.mean(values)) if values else float("nan")
    summary["saliency_source"] = "saliency network" if getattr(network, "saliency", None) is not None else "Grad-CAM"
    return {"summary": summary, "records": records, "maps": maps}


def run_protocol(
    out_dir: Path,
    protocol: str = "quick",
    datasets: Sequence[str] = ("ddti", "busbra", "busbra_cross"),
    variants: Sequence[str] = tuple(VARIANTS),
    data_root: Optional[Path] = None,
    overrides: Optional[Mapping[str, Any]] = None,
    device: str = "cpu",
    progress: Optional[Callable[[str], None]] = print,
    only_splits: Optional[Sequence[str]] = None,
) -> dict:
    """Train and evaluate every (split, variant), or only the splits named in ``only_splits``
    (e.g. ``logiq5_to_others``, ``fold3``: a repeat of one split); resumable (finished runs are
    kept in ``out_dir/runs/`` and skipped). Returns :func:`summarize` of everything."""
    settings = {**PROTOCOLS[protocol], **dict(overrides or {})}
    data_root = Path(data_root) if data_root else Path(__file__).resolve().parents[2] / "shared" / "data"
    out_dir = Path(out_dir)
    splits = build_splits(data_root, datasets, settings["val_fraction"], settings["seed"])
    if only_splits:
        unknown = sorted(set(only_splits) - {split.name for split in splits})
        if unknown:
            raise ValueError(f"unknown splits {unknown}; the datasets have {sorted({split.name for split in splits})}")
        splits = [split for split in splits if split.name in set(only_splits)]
    prepared = Preprocessed(settings["image_size"])
    crops = CropInputs(settings) if settings.get("crops") else None
    budgets = run_budgets(splits, variants, settings, data_root)
    evaluate = functools.partial(evaluate_split, device=device)
    if crops is not None:
        train_tf, val_tf = crops.train_transforms(), crops.val_transforms()
    else:
        from .transforms import augmentation_transforms

        train_tf, val_tf = [prepared.transform()] + augmentation_transforms(settings["image_size"]), [prepared.transform()]
    total = len(splits) * len(variants)
    done = 0
    started = time.time()
    for split in splits:
        for variant in variants:
            done += 1
            result_path = out_dir / "runs" / split.dataset / split.name / f"{variant}.json"
            if result_path.is_file():
                if crops is not None:
                    _rescore_if_older(result_path, settings.get("calibration", "platt"))
                continue
            t0, cpu0 = time.time(), time.process_time()
            run_dir = result_path.parent / f"{variant}_train"
            start = None
            if _pretrains(split, settings):
                start = pretrained_weights(out_dir, variant, settings, data_root, train_tf, val_tf, device, progress,
                                           budgets.get(("pretrain", variant)))
            train = recipe_train_list(split.dataset, split.train, settings, data_root) if crops is not None else split.train
            budget = budgets.get((split.dataset, split.name, variant))
            # a fine-tuning from the pre-training may take its own learning rate (``finetune_lr``)
            lr = settings.get("finetune_lr") if start is not None and settings.get("finetune_lr") else settings["lr"]
            # ... and be the mean of its weights after epochs K..N (``finetune_average`` [K, N]),
            # where no epoch is chosen with a fold's few validation frames
            average = settings.get("finetune_average") if start is not None else None
            network, best = train_variant(variant, settings, train, split.val, run_dir, train_tf, val_tf, device, start,
                                          epochs=average[1] if average else None, time_budget_s=budget, lr=lr,
                                          average_from_epoch=average[0] if average else 0)
            t_eval = time.time()
            if crops is not None:
                evaluation = evaluate_recipe(network, variant, split.test, crops, _validation_of(best), evaluate)
                evaluation["summary"] = evaluation["test"]
            else:
                evaluation = evaluate(network, variant, split.test, prepared)
            result = {
                "dataset": split.dataset, "split": split.name, "variant": variant, "protocol": protocol, "settings": settings,
                "sizes": {"train": len(train), "val": len(split.val), "test": len(split.test)}, "lr": lr,
                "from_pretraining": start is not None, "averaged_epochs": best.get("averaged_epochs"),
                "best_epoch": best.get("epoch"), "val_metrics": best.get("metrics"),
                # the best epoch's validation predictions: calibrations can be fitted again later
                "validation": best.get("validation"),
                "test": evaluation["summary"], "records": evaluation["records"], "seconds": round(time.time() - t0, 1),
                "cpu_seconds": round(time.process_time() - cpu0, 1), "evaluation_seconds": round(time.time() - t_eval, 1),
                "epochs_run": best.get("epochs_run"), "time_budget_s": budget, "stopped_by": best.get("stopped_by"),
            }
            atomic_write_json(result_path, result)
            # kept: the overlay figures' splits, and both cross-scanner classifiers (whole-frame and
            # localiser measurements on the other scanners, scripts/localiser_eval.py)
            keep = split.name in ("fold1", "logiq7_to_others") or split.dataset == "busbra_cross"
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            if keep:
                shutil.move(str(run_dir / "model.pt"), str(result_path.with_suffix(".pt")))
            shutil.rmtree(run_dir, ignore_errors=True)
            if progress:
                elapsed = time.time() - started
                progress(f"[protocol] {done}/{total} {split.dataset}/{split.name}/{variant}: test AUC "
                         f"{evaluation['summary']['auc']:.3f} ({result['seconds']:.0f}s; {elapsed / 60:.1f} min so far)")
    for split in splits:
        if split.name in ("fold1", "logiq7_to_others"):
            overlay_figure(out_dir, split, variants, crops.prepare if crops is not None else prepared)
    return summarize(out_dir, datasets, variants)


def _pretrains(split: Split, settings: Mapping[str, Any]) -> bool:
    """Whether ``split``'s runs start from the protocol's BUS-BRA pre-training (recipe protocols)."""
    return bool(settings.get("crops")) and split.dataset == "ddti" and settings.get("ddti_recipe") == "pretrain"


def run_budgets(splits: Sequence[Split], variants: Sequence[str], settings: Mapping[str, Any],
                data_root: Path) -> dict[tuple, float]:
    """Each training run's share of the protocol's ``time_budget_s`` (empty without one), in
    proportion to its training-set size: keys ``(dataset, split, variant)`` and, for the BUS-BRA
    pre-training, ``("pretrain", variant)``. Computed over all the protocol's runs, finished or
    not, so a resumed protocol gives every run the share it had."""
    total = settings.get("time_budget_s")
    if not total:
        return {}
    sizes: dict[tuple, int] = {}
    if any(_pretrains(split, settings) for split in splits):
        pretraining = len(pretraining_split(settings, data_root)[0])
        sizes.update({("pretrain", variant): pretraining for variant in variants})
    for split in splits:
        train = recipe_train_list(split.dataset, split.train, settings, data_root) if settings.get("crops") else split.train
        sizes.update({(split.dataset, split.name, variant): len(train) for variant in variants})
    whole = sum(sizes.values())
    return {key: float(total) * n / whole for key, n in sizes.items()}


def average_range_problem(average: Optional[Sequence[int]]) -> Optional[str]:
    """What is wrong with a ``[FROM, EPOCHS]`` weight-averaging range (``None``: nothing, or no range)."""
    if average is not None and not 1 <= average[0] <= average[1]:
        return f"needs 1 <= FROM <= EPOCHS, got {average[0]} {average[1]}"
    return None


def train_variant(variant: str, settings: Mapping[str, Any], train: Sequence[Mapping], val: Sequence[Mapping], run_dir: Path,
                  train_tf: list, val_tf: list, device: str, start: Optional[Mapping] = None,
                  epochs: Optional[int] = None, time_budget_s: Optional[float] = None,
                  lr: Optional[float] = None, average_from_epoch: int = 0) -> tuple[torch.nn.Module, dict]:
    """Train one variant (from ``start`` weights if given; Adam at ``lr``, default the settings'
    ``lr``) and return the network at its best
    validation epoch (on ``device``, float32) and that model file's payload; with
    ``average_from_epoch`` every epoch is trained (no early stopping) and the network is the mean
    of the weights after epochs ``average_from_epoch``..last. An interrupted run resumes from its
    checkpoints in ``run_dir``."""
    torch.manual_seed(settings["seed"])
    network = build_variant(variant)
    if start is not None:
        network.load_state_dict(start)
    loss = SaliencyGuidedLoss(VARIANTS[variant]["loss"], class_weights="balanced")
    optimizer = torch.optim.Adam(network.parameters(), lr=lr or settings["lr"])
    train_settings = TrainSettings(
        epochs=epochs or settings["epochs"], batch_size=settings["batch_size"], val_batch_size=64,
        image_size=settings["image_size"], seed=settings["seed"], progress=False, log_every=0, tensorboard=False,
        early_stop_patience=0 if average_from_epoch else settings.get("early_stop_patience", 0),
        num_workers=settings.get("num_workers", 0), time_budget_s=time_budget_s, average_from_epoch=average_from_epoch,
    )
    stats = fit(network, loss, optimizer, train, val, run_dir, train_settings, device=device,
                train_transforms=train_tf, val_transforms=val_tf, resume=True)
    best = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    network.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in best["state_dict"].items()})
    network.to(device).to(memory_format=torch.contiguous_format)
    info = best.get("train") or {}
    return network, {"epoch": info.get("epoch"), "metrics": best.get("metrics"), "validation": best.get("validation"),
                     "epochs_run": stats.get("epoch"), "stopped_by": stats.get("stopped_by"),
                     "averaged_epochs": info.get("averaged_epochs")}


def _rescore_if_older(result_path: Path, method: str) -> None:
    """Bring a finished run scored by an earlier rule (a temperature, a 0.5 cut) to today's
    (:func:`thyroid_plugin.recipe.rescore`), from the validation predictions it keeps or, for
    runs written before they were kept, its kept model file's; left as it is (with a warning)
    when neither has them."""
    result = json.loads(result_path.read_text())
    if scored_by(result, method):
        return
    validation = kept_validation(result_path, result)
    if validation is None or not all("prob_uncalibrated" in r for r in result.get("records", [])):
        logger.warning("%s was scored by an earlier rule and keeps no validation predictions: left as it is", result_path)
        return
    atomic_write_json(result_path, rescore(result, validation, method))
    logger.info("%s: calibrated figures recomputed by today's rule", result_path)


def kept_validation(result_path: Path, result: Mapping) -> Optional[tuple[list, list]]:
    """The ``(probabilities, labels)`` of a finished run's best epoch on its validation set: kept
    in the result, or, for runs written before they were, in the split's kept model file
    (``<variant>.pt`` beside the result); ``None`` when neither has them."""
    validation = _validation_of(result)
    kept = Path(result_path).with_suffix(".pt")
    if validation is None and kept.is_file():
        validation = _validation_of(torch.load(kept, map_location="cpu", weights_only=True))
    return validation


def _validation_of(best: Mapping) -> Optional[tuple[list, list]]:
    record = best.get("validation")
    if not record:
        return None
    return list(record["prob_malignant"]), [int(v) for v in record["label"]]


def pretrained_weights(out_dir: Path, variant: str, settings: Mapping[str, Any], data_root: Path, train_tf: list, val_tf: list,
                       device: str, progress: Optional[Callable[[str], None]], time_budget_s: Optional[float] = None) -> dict:
    """Weights of ``variant`` pre-trained on all of BUS-BRA (trained once per protocol folder,
    kept as ``pretrain/<variant>.pt``, resumable)."""
    done = out_dir / "pretrain" / f"{variant}.pt"
    if not done.is_file():
        train, val = pretraining_split(settings, data_root)
        if progress:
            progress(f"[protocol] pre-training {variant} on BUS-BRA ({len(train)} training, {len(val)} validation frames)")
        # its own patience where given (a pre-training on many frames may improve slowly and late)
        pretrain = {**settings, "early_stop_patience": settings.get("pretrain_patience", settings.get("early_stop_patience", 0))}
        network, best = train_variant(variant, pretrain, train, val, done.parent / f"{variant}_train", train_tf, val_tf,
                                      device, epochs=settings.get("pretrain_epochs"), time_budget_s=time_budget_s)
        # the validation frames are kept with the weights: held-out figures of the pre-trained network
        # must use exactly these (scripts/whole_frame_eval.py), whatever the split code becomes
        payload = io.BytesIO()  # written whole or not at all: a file there means a finished pre-training
        torch.save({"state_dict": network.state_dict(), "best_epoch": best["epoch"], "val_metrics": best["metrics"],
                    "val_images": [d["image"] for d in val], "epochs_run": best["epochs_run"],
                    "stopped_by": best["stopped_by"], "time_budget_s": time_budget_s}, payload)
        atomic_write_bytes(done, payload.getvalue())
        shutil.rmtree(done.parent / f"{variant}_train", ignore_errors=True)
    return torch.load(done, map_location="cpu", weights_only=True)["state_dict"]


def overlay_figure(out_dir: Path, split: Split, variants: Sequence[str], prepare: Callable[[Mapping], torch.Tensor],
                   n: int = 3) -> Optional[Path]:
    """A grid of test frames (``n`` classified correctly and ``n`` wrongly by the well-posed
    variant, with lesion masks) by variant: each cell the saliency heat map over the frame and
    the expert outline (green)."""
    from .reports import _pyplot

    folder = out_dir / "runs" / split.dataset / split.name
    reference = folder / "full_wellposed.json"
    if not reference.is_file():
        return None
    records = json.loads(reference.read_text())["records"]
    with_mask = {d["image"]: d for d in split.test if d.get("mask")}
    correct = [r for r in records if r["image"] in with_mask and (r["prob_malignant"] >= 0.5) == bool(r["label"])]
    wrong = [r for r in records if r["image"] in with_mask and (r["prob_malignant"] >= 0.5) != bool(r["label"])]
    chosen = correct[:n] + wrong[:n]
    shown = [v for v in variants if (folder / f"{v}.pt").is_file()]
    if not chosen or not shown:
        return None
    maps = {}
    for variant in shown:
        network = build_variant(variant)
        payload = torch.load(folder / f"{variant}.pt", map_location="cpu", weights_only=True)
        network.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()})
        items = [with_mask[r["image"]] for r in chosen]
        maps[variant] = evaluate_split(network, variant, items, prepare, keep_maps=[d["image"] for d in items])
    plt = _pyplot()
    fig, axes = plt.subplots(len(chosen), len(shown), figsize=(2.2 * len(shown), 2.2 * len(chosen)), dpi=100, squeeze=False)
    for row, rec in enumerate(chosen):
        frame = np.asarray(load_image(rec["image"]).array)
        gray = frame if frame.ndim == 2 else frame.mean(axis=2)
        mask = np.asarray(load_image(with_mask[rec["image"]]["mask"]).array)
        mask = mask[..., 0] if mask.ndim == 3 else mask
        for col, variant in enumerate(shown):
            ax = axes[row, col]
            ax.imshow(gray, cmap="gray")
            sal = maps[variant]["maps"].get(rec["image"])
            if sal is not None:
                ax.imshow(sal, cmap="jet", alpha=0.45, vmin=0, vmax=1)
            if mask.any():
                ax.contour(mask > 0, levels=[0.5], colors="lime", linewidths=0.8)
            p = next(r["prob_malignant"] for r in maps[variant]["records"] if r["image"] == rec["image"])
            ax.set_title(f"P(mal) {p:.2f}", fontsize=7)
            ax.axis("off")
            if row == 0:
                ax.text(0.5, 1.25, VARIANTS[variant]["label"], transform=ax.transAxes, ha="center", fontsize=6.5, wrap=True)
        truth = "malignant" if rec["label"] else "benign"
        kind = "correct" if rec in correct else "wrong"
        axes[row, 0].text(-0.08, 0.5, f"{Path(rec['image']).stem}\n{truth} ({kind})", transform=axes[row, 0].transAxes,
                          ha="right", va="center", fontsize=7)
    fig.tight_layout()
    path = out_dir / f"overlays_{split.dataset}_{split.name}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    v = [x for x in values if x is not None and not math.isnan(x)]
    if not v:
        return float("nan"), float("nan")
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


SUMMARY_KEYS = METRIC_NAMES + ("energy_in_mask", "pointing_game", "iou")
#: the recipe's figures (medium protocol): AUC by box margin and calibration
RECIPE_KEYS = ("auc_tight", "auc_25", "auc_50", "auc_whole", "auc_saliency_box", "ece", "ece_uncalibrated", "ece_temperature",
               "ece_platt")


def summarize(out_dir: Path, datasets: Sequence[str] = ("ddti", "busbra", "busbra_cross"),
              variants: Sequence[str] = tuple(VARIANTS)) -> dict:
    """Aggregate finished runs: per split and mean +- sd over splits; write ``results.json``,
    ``tables.md`` and ``roc_<dataset>.png`` (test predictions pooled over the splits)."""
    out_dir = Path(out_dir)
    results: dict = {"datasets": {}}
    lines = []
    for dataset in datasets:
        per_variant = {}
        curves, reliability = {}, {}
        for variant in variants:
            runs = [json.loads(p.read_text()) for p in sorted((out_dir / "runs" / dataset).glob(f"*/{variant}.json"))]
            if not runs:
                continue
            entry = {"splits": {r["split"]: r["test"] for r in runs}, "seconds": sum(r["seconds"] for r in runs),
                     "cpu_seconds": sum(r.get("cpu_seconds", 0.0) for r in runs)}
            keys = SUMMARY_KEYS + tuple(k for k in RECIPE_KEYS if any(k in r["test"] for r in runs))
            for key in keys:
                entry[key] = _mean_sd([r["test"].get(key) for r in runs])
            per_variant[variant] = entry
            probs = [rec["prob_malignant"] for r in runs for rec in r["records"]]
            labels = [rec["label"] for r in runs for rec in r["records"]]
            curves[VARIANTS[variant]["label"]] = (probs, labels)
            if all("prob_uncalibrated" in rec for r in runs for rec in r["records"]):
                raw = [rec["prob_uncalibrated"] for r in runs for rec in r["records"]]
                reliability[VARIANTS[variant]["label"] + ", uncalibrated"] = (raw, labels)
                reliability[VARIANTS[variant]["label"] + ", calibrated"] = (probs, labels)
        if not per_variant:
            continue
        results["datasets"][dataset] = per_variant
        if curves:
            plot_roc(curves, str(out_dir / f"roc_{dataset}.png"), title=f"{dataset}: test predictions of all splits")
        if reliability:
            plot_reliability(reliability, str(out_dir / f"reliability_{dataset}.png"),
                             title=f"{dataset}: test predictions of all splits")
        n_splits = max(len(v["splits"]) for v in per_variant.values())
        lines.append(f"### {dataset} ({n_splits} splits; mean +- sd over splits)\n")
        keys = SUMMARY_KEYS + tuple(k for k in RECIPE_KEYS if any(k in e for e in per_variant.values()))
        lines.append("| variant | " + " | ".join(keys) + " |")
        lines.append("|---|" + "---|" * len(keys))
        for variant, entry in per_variant.items():
            cells = []
            for key in keys:
                m, s = entry.get(key, (float("nan"), float("nan")))
                cells.append("n/a" if math.isnan(m) else f"{m:.3f} +- {s:.3f}")
            lines.append(f"| {VARIANTS[variant]['label']} | " + " | ".join(cells) + " |")
        lines.append("")
    wall = sum(e["seconds"] for per in results["datasets"].values() for e in per.values())
    cpu = sum(e["cpu_seconds"] for per in results["datasets"].values() for e in per.values())
    results["time"] = {"wall_seconds": wall, "cpu_seconds": cpu, "cores": os.cpu_count(),
                       "note": "cpu_seconds / cores is the wall time on an otherwise idle machine"}
    lines.append(f"Time: {wall / 3600:.2f} h wall, {cpu / 3600:.2f} h CPU on {os.cpu_count()} cores "
                 f"(the protocol's processes only; {cpu / max(1, os.cpu_count()) / 3600:.2f} h on an idle machine).")
    atomic_write_json(out_dir / "results.json", results)
    (out_dir / "tables.md").write_text("\n".join(lines))
    return results
