"""Training and evaluation on pytorch-ignite.

:func:`fit` trains a network with the combined loss and keeps the model that scores best on a
validation split (ROC-AUC by default). Behaviour lives in small ignite event handlers: loss
means, validation and best-model publication, the epoch report (stats file, progress lines for
MONAI Label's task log, TensorBoard), early stopping, resume checkpoints, tqdm progress.
:func:`predict` is the one loop that runs a network over labelled batches: validation,
:func:`evaluate_network` and the evaluation protocols use it.

Files written in ``output_dir`` (each atomically):

- ``model.pt`` - the best model (see :mod:`thyroid_plugin.checkpoint`);
- ``metrics.json`` - its validation metrics (``auc``, ``accuracy``, ``sensitivity``,
  ``specificity``, ``f1``, ``balanced_accuracy``) at its operating point ``threshold`` (Youden's
  J on the validation predictions), the threshold it serves with;
- ``train_stats.json`` - progress and history, updated every epoch;
- ``checkpoints/`` - the last epoch's full state, for ``resume``;
- ``tensorboard/`` - TensorBoard event files.
"""

from __future__ import annotations

import datetime
import io
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver, EarlyStopping
from monai.data import CacheDataset, DataLoader, Dataset, ThreadDataLoader, get_track_meta, set_track_meta
from monai.transforms import Compose, SelectItemsd
from monai.utils import set_determinism
from torch import nn

from .checkpoint import save_checkpoint
from .constants import POSITIVE_CLASS
from .data import class_counts, grouped_split, load_datalist
from .io import atomic_write_bytes, atomic_write_json, json_safe
from .metrics import OPERATING_POINT_METRICS, operating_point_metrics
from .runtime import amp_dtype, default_device
from .runtime import autocast as _autocast
from .transforms import augmentation_transforms, preprocess_transforms

__all__ = [
    "Predictions",
    "TrainSettings",
    "amp_dtype",
    "default_device",
    "evaluate_network",
    "fit",
    "make_loader",
    "make_train_step",
    "predict",
    "train_bundle",
]

logger = logging.getLogger(__name__)


@dataclass
class TrainSettings:
    """Training settings (the ``training`` section of ``configs/train.json``)."""

    epochs: int = 40
    batch_size: int = 16
    val_batch_size: int = 32
    image_size: int = 224
    amp: str = "auto"  # auto | bf16 | fp16 | off
    channels_last: bool = True
    compile: bool = False
    num_workers: int = 0
    cache: bool = True
    seed: int = 0
    val_interval: int = 1
    early_stop_patience: int = 0
    key_metric: str = "auc"
    progress: Any = "auto"  # True, False or "auto" (a bar on a terminal, log lines otherwise)
    log_every: int = 10
    tensorboard: bool = True
    max_grad_norm: Optional[float] = None
    augmentation: dict = field(default_factory=dict)
    # stop after the epoch at which the run's epochs (validation included, resumed ones too)
    # have taken this many seconds; None: no limit (a protocol sized in time, e.g. ``gpu``)
    time_budget_s: Optional[float] = None
    # from this epoch on the model is the mean of the weights after each epoch (weight averaging
    # at a constant learning rate), not the best validation epoch's: no choice is made with the
    # validation data, which only calibrates and reports it; early stopping does not apply. 0: off
    average_from_epoch: int = 0

    @classmethod
    def from_mapping(cls, values: Optional[Mapping[str, Any]] = None, **overrides: Any) -> "TrainSettings":
        merged = {**dict(values or {}), **{k: v for k, v in overrides.items() if v is not None}}
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(merged) - known
        if unknown:
            raise ValueError(f"unknown training settings {sorted(unknown)}")
        return cls(**merged)


def _batch_to(batch: Mapping, device: torch.device, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(batch["image"]).to(device, non_blocking=True).float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.as_tensor(batch["label"]).to(device, non_blocking=True).long()
    return x, y


@dataclass
class Predictions:
    """A network's predictions on ``N`` labelled images (see :func:`predict`)."""

    prob_malignant: np.ndarray  # (N,) float32
    labels: np.ndarray  # (N,) int
    loss: float  # mean cross-entropy
    saliency: Optional[torch.Tensor] = None  # (N, 1, S, S) in [0, 1] on the CPU, when asked for

    def metrics(self, threshold: Optional[float] = None) -> dict:
        """:func:`~thyroid_plugin.metrics.operating_point_metrics` at ``threshold`` (default: the
        operating point chosen on these predictions) and the mean cross-entropy ``loss``."""
        return {**operating_point_metrics(self.prob_malignant, self.labels, threshold), "loss": self.loss}


def predict(network: nn.Module, batches: Iterable[Mapping], device: torch.device, dtype: Optional[torch.dtype] = None,
            channels_last: bool = False, saliency: Optional[Callable[[torch.Tensor, Any], torch.Tensor]] = None) -> Predictions:
    """Run ``network`` (in eval mode) over ``{"image": (B, 3, S, S), "label": (B,)}`` batches.

    Args:
        device, dtype, channels_last: where and how the network runs (``dtype``: autocast, or ``None``).
        saliency: ``(x, network output) -> (B, 1, S, S)`` map in ``[0, 1]`` (the network's own
            saliency or Grad-CAM), kept for every image when given.
    """
    network.eval()
    probs, labels, maps, ce = [], [], [], 0.0
    for batch in batches:
        x, y = _batch_to(batch, device, channels_last)
        with torch.inference_mode(), _autocast(device, dtype):
            out = network(x)
        logits = out.logits.float()
        ce += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        probs.append(torch.softmax(logits, dim=1)[:, POSITIVE_CLASS].cpu())
        labels.append(y.cpu())
        if saliency is not None:
            maps.append(saliency(x, out).float().cpu())
    n = sum(len(y) for y in labels)
    return Predictions(torch.cat(probs).numpy().astype(np.float32) if probs else np.zeros(0, np.float32),
                       torch.cat(labels).numpy() if labels else np.zeros(0, int), ce / max(1, n),
                       torch.cat(maps) if maps else None)


def make_train_step(forward_model: nn.Module, network: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, device: torch.device, settings: TrainSettings) -> Callable:
    """One optimisation step ``(engine, batch) -> {loss part: value}`` (the ignite process function).

    ``forward_model`` is what runs forward (maybe compiled or DDP-wrapped), ``network`` the plain
    module (for gradient clipping)."""
    dtype = amp_dtype(device, settings.amp)

    def train_step(engine: Optional[Engine], batch: Mapping) -> dict:
        forward_model.train()
        x, y = _batch_to(batch, device, settings.channels_last)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, dtype):
            output = forward_model(x)
        parts = loss_fn(output, x, y)
        scaler.scale(parts["loss"]).backward()
        if settings.max_grad_norm:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(network.parameters(), settings.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        return {k: float(v.detach()) for k, v in parts.items()}

    return train_step


def make_loader(items: Sequence[Mapping], transforms: list, settings: TrainSettings, batch_size: int, shuffle: bool, sampler=None):
    """``(dataset, loader)`` of ``{"image", "label"}`` batches: a cached dataset of the
    deterministic transforms (decoding and resizing happen once) and a loader that prepares
    the next batch in a background thread (or ``settings.num_workers`` processes)."""
    ds = _dataset(items, transforms, settings)
    return ds, _batches(ds, settings, batch_size, shuffle, sampler)


def _dataset(items: Sequence[Mapping], transforms: list, settings: TrainSettings) -> Dataset:
    pipeline = Compose(transforms + [SelectItemsd(keys=["image", "label"])])
    if settings.cache:
        return CacheDataset(list(items), pipeline, cache_rate=1.0, num_workers=None, progress=False)
    return Dataset(list(items), pipeline)


def _batches(ds: Dataset, settings: TrainSettings, batch_size: int, shuffle: bool, sampler=None):
    if settings.num_workers > 0:
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                          num_workers=settings.num_workers, persistent_workers=True)
    # a background thread prepares the next batch while the model computes
    return ThreadDataLoader(ds, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler, num_workers=0)


def _progress_enabled(progress: Any) -> bool:
    if progress == "auto":
        return sys.stderr.isatty()
    return bool(progress)


def _initial_stats(settings: TrainSettings, train_list: Sequence[Mapping], val_list: Sequence[Mapping], device: torch.device,
                   dtype: Optional[torch.dtype]) -> dict[str, Any]:
    """The stats dict that ``train_stats.json`` holds (MONAI Label shows it in ``/info``)."""
    return {
        "status": "running",
        "epoch": 0,
        "total_epochs": settings.epochs,
        "start_ts": int(time.time()),
        "key_metric_name": f"val_{settings.key_metric}",
        "best_metric": None,
        "best_metric_epoch": None,
        "metrics": {},
        "train_size": len(train_list),
        "val_size": len(val_list),
        "class_counts": {"train": class_counts(train_list), "val": class_counts(val_list)},
        "device": str(device),
        "amp": str(dtype).replace("torch.", "") if dtype else "off",
        "model": None,
        "history": [],
    }


def _write_stats(stats: dict, paths: Sequence[Path]) -> None:
    """Write ``stats`` to ``paths`` (none on ranks other than 0), with the elapsed time:
    ``current_time`` while running, else ``total_time``."""
    if not paths:
        return
    elapsed = str(datetime.timedelta(seconds=int(time.time() - stats["start_ts"])))
    running = stats["status"] == "running"
    stats.pop("total_time" if running else "current_time", None)
    stats["current_time" if running else "total_time"] = elapsed
    for path in paths:
        atomic_write_json(path, stats)


def _key_score(metrics: Mapping[str, float], key_metric: str, one_class_offset: float = 0.0) -> float:
    """The key metric, or minus the loss (less ``one_class_offset``) where it is undefined
    (validation data with one class)."""
    score = metrics.get(key_metric, float("nan"))
    return score if math.isfinite(score) else -metrics["loss"] - one_class_offset


class _EpochLoss:
    """Means of the loss parts over each epoch (:meth:`means`); a non-finite loss fails the run;
    a ``[train]`` line every ``log_every`` steps (0: none)."""

    def __init__(self, log_every: int) -> None:
        self.log_every = log_every
        self.sums: dict[str, float] = {}
        self.count = 0
        self.started = time.time()

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.EPOCH_STARTED, self.reset)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self.update)

    def reset(self, engine: Engine) -> None:
        self.sums, self.count, self.started = {}, 0, time.time()

    def update(self, engine: Engine) -> None:
        output = engine.state.output
        for k, v in output.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1
        if not math.isfinite(output["loss"]):
            raise FloatingPointError(f"the loss became {output['loss']} at epoch {engine.state.epoch}")
        if self.log_every and engine.state.iteration % self.log_every == 0:
            step = (engine.state.iteration - 1) % engine.state.epoch_length + 1
            print(f"[train] epoch {engine.state.epoch}/{engine.state.max_epochs} step {step}/{engine.state.epoch_length} "
                  f"loss {output['loss']:.4f}", flush=True)

    def means(self) -> dict[str, float]:
        return {k: v / max(1, self.count) for k, v in self.sums.items()}


@dataclass
class _ModelPublisher:
    """Saves the model (``model.pt`` and ``metrics.json`` in ``out``, and ``publish_path``)."""

    out: Path
    network: nn.Module
    network_def: dict
    image_size: int
    info: dict
    stats: dict
    publish_path: Optional[os.PathLike | str] = None
    on_publish: Optional[Callable[[str], None]] = None

    def __call__(self, epoch: int, metrics: Mapping[str, float], predictions: Optional[Predictions]) -> None:
        validation = (predictions.prob_malignant.tolist(), predictions.labels.tolist()) if metrics and predictions else None
        self.stats["model"] = save_checkpoint(self.out / "model.pt", self.network, self.network_def, self.image_size, metrics,
                                              {**self.info, "epoch": epoch}, threshold=metrics.get("threshold"), validation=validation)
        atomic_write_json(self.out / "metrics.json", {k: metrics.get(k) for k in OPERATING_POINT_METRICS})
        if self.publish_path:
            atomic_write_bytes(self.publish_path, (self.out / "model.pt").read_bytes())
            if self.on_publish:
                self.on_publish(str(self.publish_path))


class _BestModelSelection:
    """On validation epochs: predictions and metrics on the validation data
    (``engine.state.last_val``), and on rank 0 publication of the model when the key metric
    improves. Without validation data every epoch's model is published."""

    def __init__(self, network: nn.Module, val_loader, device: torch.device, dtype: Optional[torch.dtype], settings: TrainSettings,
                 publish: Optional[_ModelPublisher], stats: dict) -> None:
        self.network, self.val_loader, self.device, self.dtype = network, val_loader, device, dtype
        self.settings, self.publish, self.stats = settings, publish, stats
        self.best_score = float(stats["best_metric"]) if stats["best_metric"] is not None else -math.inf

    def is_validation_epoch(self, engine: Engine, event: Any = None) -> bool:
        epoch = engine.state.epoch
        return self.val_loader is not None and (epoch % self.settings.val_interval == 0 or epoch == engine.state.max_epochs)

    def __call__(self, engine: Engine) -> None:
        engine.state.validated = self.is_validation_epoch(engine)
        if not engine.state.validated:
            if self.val_loader is None and self.publish is not None:
                self.publish(engine.state.epoch, {}, None)  # nothing to choose with: the last epoch is the model
            return
        predictions = predict(self.network, self.val_loader, self.device, self.dtype, self.settings.channels_last)
        metrics = engine.state.last_val = predictions.metrics()
        score = _key_score(metrics, self.settings.key_metric, one_class_offset=1e3)
        if score > self.best_score and self.publish is not None:
            self.best_score = score
            self.stats["best_metric"] = metrics.get(self.settings.key_metric)
            self.stats["best_metric_epoch"] = engine.state.epoch
            self.stats["metrics"] = {k: metrics[k] for k in OPERATING_POINT_METRICS}
            self.publish(engine.state.epoch, metrics, predictions)


class _EpochReport:
    """At the end of an epoch: the history record in ``stats``; on rank 0 also the stats files,
    a ``[train]`` line for MONAI Label's task log and TensorBoard scalars."""

    def __init__(self, stats: dict, stats_paths: Sequence[Path], loss: _EpochLoss, tensorboard=None, is_main: bool = True) -> None:
        self.stats, self.stats_paths, self.loss, self.tensorboard, self.is_main = stats, stats_paths, loss, tensorboard, is_main

    def __call__(self, engine: Engine) -> None:
        means, epoch = self.loss.means(), engine.state.epoch
        val = engine.state.last_val if engine.state.validated else {}
        record: dict[str, Any] = {"epoch": epoch, "time_s": round(time.time() - self.loss.started, 1)}
        record.update({f"train_{k}": round(v, 5) for k, v in means.items()})
        record.update({f"val_{k}": v for k, v in val.items()})
        self.stats["epoch"] = epoch
        self.stats["history"].append(json_safe(record))
        _write_stats(self.stats, self.stats_paths)
        if not self.is_main:
            return
        val_text = " ".join(f"val_{k} {val[k]:.4f}" for k in ("auc", "balanced_accuracy", "loss") if k in val and math.isfinite(val[k]))
        print(f"[train] epoch {epoch}/{engine.state.max_epochs} done in {record['time_s']}s loss {means.get('loss', float('nan')):.4f} "
              f"{val_text} best {self.stats['best_metric']} (epoch {self.stats['best_metric_epoch']})", flush=True)
        if self.tensorboard is not None:
            for group, values in (("train", means), ("val", val)):
                for k, v in values.items():
                    if math.isfinite(v):
                        self.tensorboard.add_scalar(f"{group}/{k}", v, epoch)
            self.tensorboard.flush()


def _tensorboard(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # TensorBoard is optional
        return None
    return SummaryWriter(log_dir=str(log_dir))


def _attach_resume_checkpoints(trainer: Engine, to_save: dict, ckpt_dir: Path, is_main: bool) -> None:
    """The last epoch's full state in ``ckpt_dir`` (one file), for ``resume``."""
    # created on every rank: ignite's DiskSaver synchronises the ranks and writes on rank 0 only
    saver = Checkpoint(to_save, DiskSaver(str(ckpt_dir), require_empty=False, atomic=True), filename_prefix="last", n_saved=1)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, saver)

    def drop_stale_checkpoints(engine: Engine) -> None:
        # the saver removes its own older file, not one left by an earlier (resumed) process
        keep = saver.last_checkpoint
        for old_file in ckpt_dir.glob("last_checkpoint_*.pt"):
            if keep and old_file.name != Path(str(keep)).name:
                old_file.unlink(missing_ok=True)

    if is_main:
        trainer.add_event_handler(Events.EPOCH_COMPLETED, drop_stale_checkpoints)


def _resume(out: Path, to_load: dict, stats: dict, device: torch.device) -> bool:
    """Load the last checkpoint in ``out/checkpoints`` into ``to_load`` and the previous run's
    record into ``stats``; whether there was one."""
    ckpt_dir = out / "checkpoints"
    last = sorted(ckpt_dir.glob("last_checkpoint_*.pt"), key=os.path.getmtime) if ckpt_dir.is_dir() else []
    if not last:
        return False
    Checkpoint.load_objects(to_load=to_load, checkpoint=torch.load(last[-1], map_location=device, weights_only=True))
    if (out / "train_stats.json").is_file():
        previous = json.loads((out / "train_stats.json").read_text())
        stats.update({k: previous[k] for k in ("best_metric", "best_metric_epoch", "metrics", "history", "model", "start_ts")
                      if previous.get(k) is not None})
        # epochs recorded after the checkpoint (the process died between the two writes) are run again
        epoch = to_load["trainer"].state.epoch
        stats["history"] = [h for h in stats.get("history") or [] if h.get("epoch", 0) <= epoch]
    logger.info("resumed from %s at epoch %d", last[-1].name, to_load["trainer"].state.epoch)
    return True


def _prepare_network(network: nn.Module, loss_fn: nn.Module, train_list: Sequence[Mapping], device: torch.device,
                     settings: TrainSettings, world_size: int) -> nn.Module:
    """Move ``network`` and ``loss_fn`` to ``device``; the module that runs forward (DDP-wrapped
    with several processes, compiled when asked)."""
    network.to(device)
    if settings.channels_last:
        network.to(memory_format=torch.channels_last)
    if hasattr(loss_fn, "set_class_balance"):
        loss_fn.set_class_balance(class_counts(train_list))
    loss_fn.to(device)
    model = network
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model) if settings.compile else model


def _training_loaders(train_list: Sequence[Mapping], val_list: Sequence[Mapping], settings: TrainSettings, rank: int, world_size: int,
                      train_transforms: Optional[list], val_transforms: Optional[list]):
    """``(train loader, its distributed sampler or None, validation loader or None)``."""
    size = settings.image_size
    train_tf = list(train_transforms) if train_transforms is not None else (
        preprocess_transforms(size) + augmentation_transforms(size, settings.augmentation))
    val_tf = list(val_transforms) if val_transforms is not None else preprocess_transforms(size)
    train_ds = _dataset(train_list, train_tf, settings)  # built (decoded, resized, cached) once
    sampler = None
    if world_size > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(train_ds, num_replicas=world_size, rank=rank, shuffle=True, seed=settings.seed)
    train_loader = _batches(train_ds, settings, settings.batch_size, shuffle=True, sampler=sampler)
    val_loader = make_loader(val_list, val_tf, settings, settings.val_batch_size, shuffle=False)[1] if val_list else None
    return train_loader, sampler, val_loader


def fit(
    network: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_list: Sequence[Mapping],
    val_list: Sequence[Mapping],
    output_dir: os.PathLike | str,
    settings: TrainSettings | Mapping[str, Any] | None = None,
    *,
    device: Optional[torch.device | str] = None,
    publish_path: Optional[os.PathLike | str] = None,
    stats_path: Optional[os.PathLike | str] = None,
    resume: bool = False,
    rank: int = 0,
    world_size: int = 1,
    train_info: Optional[Mapping[str, Any]] = None,
    on_publish: Optional[Callable[[str], None]] = None,
    train_transforms: Optional[list] = None,
    val_transforms: Optional[list] = None,
) -> dict:
    """Train ``network`` and keep the best model on ``val_list``.

    Args:
        network: a :class:`~thyroid_plugin.networks.SaliencyGuidedClassifier` (with
            ``network_def()``).
        loss_fn: a :class:`~thyroid_plugin.losses.SaliencyGuidedLoss`.
        optimizer: over ``network``'s parameters.
        train_list, val_list: datalists (see :mod:`thyroid_plugin.data`); the validation list
            chooses the best epoch and must not be the test set.
        output_dir: where ``model.pt``, ``metrics.json``, ``train_stats.json``, checkpoints and
            TensorBoard logs go.
        settings: :class:`TrainSettings` or a mapping of its fields.
        device: default :func:`default_device`.
        publish_path: also publish each new best model here (atomically), e.g. the served model.
        stats_path: also write the stats here (MONAI Label reads them for ``/info``).
        resume: continue from ``output_dir/checkpoints`` if a checkpoint is there.
        rank, world_size: for distributed data-parallel training (the process group must be
            initialised by the caller); only rank 0 writes files.
        train_info: extra facts recorded in the model file.
        on_publish: called with the published path after each publication.
        train_transforms, val_transforms: dictionary transforms from a file path to a
            ``(3, S, S)`` tensor; default :func:`~thyroid_plugin.transforms.preprocess_transforms`
            (plus :func:`~thyroid_plugin.transforms.augmentation_transforms` for training).

    Returns:
        the final stats dict (also in ``train_stats.json``).
    """
    settings = settings if isinstance(settings, TrainSettings) else TrainSettings.from_mapping(settings)
    if not train_list:
        raise ValueError("no training images")
    if settings.average_from_epoch < 0 or settings.average_from_epoch > settings.epochs:
        raise ValueError(f"average_from_epoch must lie in 0..epochs ({settings.epochs}), got {settings.average_from_epoch}")
    if settings.average_from_epoch and settings.early_stop_patience > 0:
        raise ValueError("weight averaging (average_from_epoch) trains every epoch: set early_stop_patience to 0")
    device = torch.device(device) if device is not None else default_device()
    out, is_main = Path(output_dir), rank == 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    set_determinism(seed=settings.seed + rank)
    meta_tracking = get_track_meta()
    set_track_meta(False)  # plain tensors: the metadata is not needed in training and costs time
    train_loader = val_loader = None
    try:
        forward_model = _prepare_network(network, loss_fn, train_list, device, settings, world_size)
        train_loader, sampler, val_loader = _training_loaders(train_list, val_list, settings, rank, world_size, train_transforms, val_transforms)
        dtype = amp_dtype(device, settings.amp)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        trainer = Engine(make_train_step(forward_model, network, loss_fn, optimizer, scaler, device, settings))
        stats = _initial_stats(settings, train_list, val_list, device, dtype)
        to_save = {"trainer": trainer, "network": network, "optimizer": optimizer, "scaler": scaler}
        info = {**dict(train_info or {}), "train_size": len(train_list), "val_size": len(val_list),
                "loss_form": getattr(loss_fn, "form", ""), "settings": asdict(settings)}
        stats_paths = [out / "train_stats.json"] + ([Path(stats_path)] if stats_path else []) if is_main else []
        if resume and _resume(out, to_save, stats, device) and (trainer.state.epoch >= settings.epochs or _stopped_early(
                stats, trainer.state.epoch, settings, val_loader is not None) or _budget_spent(stats, settings)):
            # a finished run stays finished (ignite would start a finished engine afresh), and so
            # does one that early stopping ended (its last checkpoint is of the stop epoch)
            logger.info("the run in %s already finished at epoch %d; nothing to resume", out, trainer.state.epoch)
            finished = {**stats, **json.loads((out / "train_stats.json").read_text())} if (out / "train_stats.json").is_file() else stats
            if is_main and settings.average_from_epoch and not finished.get("averaged_epochs"):
                # the process ended between the last epoch and the average's publication
                publisher = _ModelPublisher(out, network, network.network_def(), settings.image_size, info, finished,
                                            publish_path, on_publish)
                _publish_average(out, network, val_loader, device, dtype, settings, publisher, finished)
                _write_stats(finished, stats_paths)
            return finished
        if sampler is not None:
            trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: sampler.set_epoch(e.state.epoch))
        publisher = _ModelPublisher(out, network, network.network_def(), settings.image_size, info, stats, publish_path, on_publish)
        selection = _BestModelSelection(network, val_loader, device, dtype, settings, publisher if is_main else None, stats)
        tensorboard = _attach_handlers(trainer, selection, settings, stats, stats_paths, is_main, out)
        _attach_resume_checkpoints(trainer, to_save, out / "checkpoints", is_main)
        if is_main and settings.average_from_epoch:
            trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: _keep_epoch_weights(out, network, engine.state.epoch,
                                                                                                   settings.average_from_epoch))
        stats = _run(trainer, train_loader, settings.epochs, stats, stats_paths, tensorboard)
        if is_main and settings.average_from_epoch:
            _publish_average(out, network, val_loader, device, dtype, settings, publisher, stats)
            _write_stats(stats, stats_paths)
        return stats
    finally:
        set_track_meta(meta_tracking)
        _release_workers(train_loader, val_loader)


def _keep_epoch_weights(out: Path, network: nn.Module, epoch: int, first: int) -> None:
    """The weights after ``epoch`` (from epoch ``first`` on) in ``out/epoch_weights/``, for the average."""
    if epoch < first:
        return
    module = network.module if hasattr(network, "module") else network
    payload = io.BytesIO()
    torch.save({k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}, payload)
    (out / "epoch_weights").mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "epoch_weights" / f"epoch_{epoch:04d}.pt", payload.getvalue())


def average_state_dicts(states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The mean of ``states`` (floating tensors, BatchNorm's running statistics included, averaged
    in float64 and returned in their own dtype; integer ones, e.g. BatchNorm's batch counter, from
    the last state)."""
    if not states:
        raise ValueError("no weights to average")
    averaged = {}
    for key, last in states[-1].items():
        if last.is_floating_point():
            averaged[key] = (sum(state[key].double() for state in states) / len(states)).to(last.dtype)
        else:
            averaged[key] = last.clone()
    return averaged


def _publish_average(out: Path, network: nn.Module, val_loader, device: torch.device, dtype: Optional[torch.dtype],
                     settings: TrainSettings, publisher: "_ModelPublisher", stats: dict) -> None:
    """Load the mean of the kept epochs' weights (``average_from_epoch`` to the last epoch run)
    into ``network``, predict the validation data with it and publish it as the run's model; the
    kept weights are then removed. Without a kept epoch (the run stopped before
    ``average_from_epoch``) the best validation epoch's model stays, with a warning."""
    last = int(stats.get("epoch") or 0)
    files = [out / "epoch_weights" / f"epoch_{e:04d}.pt" for e in range(settings.average_from_epoch, last + 1)]
    missing = [f.name for f in files if not f.is_file()]
    if not files or missing:
        logger.warning("no weights to average in %s (missing %s): the best validation epoch's model stays", out, missing or "all")
        return
    module = network.module if hasattr(network, "module") else network
    module.load_state_dict(average_state_dicts([torch.load(f, map_location="cpu", weights_only=True) for f in files]))
    module.to(device)
    if settings.channels_last:
        module.to(memory_format=torch.channels_last)
    metrics, predictions = {}, None
    if val_loader is not None:
        predictions = predict(module, val_loader, device, dtype, settings.channels_last)
        metrics = predictions.metrics()
    averaged = [settings.average_from_epoch, last]
    publisher.info = {**publisher.info, "averaged_epochs": averaged}
    publisher(last, metrics, predictions)
    stats.update({"averaged_epochs": averaged, "best_metric": metrics.get(settings.key_metric), "best_metric_epoch": last,
                  "metrics": {k: metrics[k] for k in OPERATING_POINT_METRICS if k in metrics}})
    for f in files:
        f.unlink(missing_ok=True)


def _release_workers(*loaders) -> None:
    """End the loaders' worker processes now. Persistent workers otherwise live on until the
    garbage collector reaches their iterator, at an arbitrary later point: a protocol of many runs
    piled up hundreds of idle workers, and each collection then stalled in torch's shutdown
    (seconds per worker)."""
    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)  # None: no loader, or no persistent workers
        if iterator is not None:
            if hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()
            loader._iterator = None


def _attach_handlers(trainer: Engine, selection: _BestModelSelection, settings: TrainSettings, stats: dict, stats_paths: Sequence[Path],
                     is_main: bool, out: Path):
    """Loss means and progress, validation and best-model selection, the epoch report and early
    stopping, in this order; returns the TensorBoard writer (or ``None``)."""
    show_bar = is_main and _progress_enabled(settings.progress)
    loss = _EpochLoss(settings.log_every if is_main and not show_bar else 0)
    loss.attach(trainer)
    if show_bar:
        from ignite.handlers import ProgressBar

        ProgressBar(persist=False).attach(trainer, output_transform=lambda o: {"loss": o["loss"]})
    trainer.add_event_handler(Events.EPOCH_COMPLETED, selection)
    tensorboard = _tensorboard(out / "tensorboard") if is_main and settings.tensorboard else None
    trainer.add_event_handler(Events.EPOCH_COMPLETED, _EpochReport(stats, stats_paths, loss, tensorboard, is_main))
    if selection.val_loader is not None and settings.early_stop_patience > 0:
        stopper = EarlyStopping(settings.early_stop_patience, lambda engine: _key_score(engine.state.last_val, settings.key_metric),
                                trainer)
        # a resumed run continues counting where it stopped (a new handler would start from
        # scratch and train up to `patience` epochs more than the same run uninterrupted)
        stopper.best_score, stopper.counter = early_stopping_state(stats.get("history") or [], trainer.state.epoch,
                                                                   settings.key_metric)
        trainer.add_event_handler(Events.EPOCH_COMPLETED(event_filter=selection.is_validation_epoch), stopper)
    if settings.time_budget_s is not None:
        def stop_when_spent(engine: Engine) -> None:
            if _budget_spent(stats, settings):
                stats["stopped_by"] = "time budget"
                engine.terminate()

        trainer.add_event_handler(Events.EPOCH_COMPLETED, stop_when_spent)
    return tensorboard


def _budget_spent(stats: Mapping[str, Any], settings: "TrainSettings") -> bool:
    """Whether the run's recorded epochs (``history`` ``time_s``) have used ``time_budget_s``."""
    if settings.time_budget_s is None:
        return False
    return sum(float(h.get("time_s") or 0.0) for h in stats.get("history") or []) >= settings.time_budget_s


def _stopped_early(stats: Mapping[str, Any], epoch: int, settings: "TrainSettings", validated: bool) -> bool:
    """Whether early stopping had ended the run by ``epoch`` (its count replayed from the history)."""
    if not validated or settings.early_stop_patience <= 0:
        return False
    return early_stopping_state(stats.get("history") or [], epoch, settings.key_metric)[1] >= settings.early_stop_patience


def early_stopping_state(history: Sequence[Mapping[str, Any]], epoch: int, key_metric: str) -> tuple[Optional[float], int]:
    """``(best score, validations without improvement)`` of early stopping after ``epoch``,
    replayed from the run's history records (those with validation figures, ``val_*``), by
    ignite's ``EarlyStopping`` rule (a score not above the best counts; ``None``: no validation yet)."""
    best, counter = None, 0
    for record in history:
        if record.get("epoch", 0) > epoch:
            break  # written after the checkpoint the run resumes from
        metrics = {k[4:]: (float("nan") if v is None else v) for k, v in record.items() if k.startswith("val_")}
        if "loss" not in metrics:
            continue  # not a validation epoch
        score = _key_score(metrics, key_metric)
        if best is None or not score <= best:  # ignite's test: a NaN score counts as an improvement
            best, counter = score, 0
        else:
            counter += 1
    return best, counter


def _run(trainer: Engine, train_loader, epochs: int, stats: dict, stats_paths: Sequence[Path], tensorboard) -> dict:
    """Run ``trainer``; the final status (and error) in ``stats``, written."""
    try:
        trainer.run(train_loader, max_epochs=epochs)
        stats["status"] = "stopped early" if trainer.state.epoch < epochs else "done"
    except BaseException as e:
        stats["status"] = "failed" if not isinstance(e, KeyboardInterrupt) else "stopped"
        stats["error"] = f"{type(e).__name__}: {e}"
        _write_stats(stats, stats_paths)
        raise
    finally:
        if tensorboard is not None:
            tensorboard.close()
    _write_stats(stats, stats_paths)
    return stats


def evaluate_network(
    network: nn.Module, datalist: Sequence[Mapping], image_size: int, device: Optional[torch.device] = None,
    batch_size: int = 32, amp: str = "off", threshold: Optional[float] = None, transforms: Optional[list] = None,
) -> tuple[dict, np.ndarray, np.ndarray]:
    """Metrics of ``network`` on ``datalist``: ``(metrics, prob_malignant (N,), labels (N,))``;
    the thresholded metrics at ``threshold`` (the one the network serves with; default the
    operating point chosen on these predictions). ``transforms`` make each item's input (default
    :func:`~thyroid_plugin.transforms.preprocess_transforms`: its ``roi`` crop or the whole frame)."""
    device = device or default_device()
    settings = TrainSettings(image_size=image_size, amp=amp, cache=False, val_batch_size=batch_size, channels_last=True)
    network.to(device).to(memory_format=torch.channels_last)
    transforms = list(transforms) if transforms is not None else preprocess_transforms(image_size)
    _, loader = make_loader(datalist, transforms, settings, batch_size, shuffle=False)
    meta_tracking = get_track_meta()
    set_track_meta(False)
    try:
        predictions = predict(network, loader, device, amp_dtype(device, amp), channels_last=True)
    finally:
        set_track_meta(meta_tracking)
    return predictions.metrics(threshold), predictions.prob_malignant, predictions.labels


def train_bundle(
    network: nn.Module,
    loss: nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: str,
    output_dir: str,
    training: Mapping[str, Any],
    image_size: int,
    val_fraction: float = 0.2,
    seed: int = 0,
    device: Optional[torch.device | str] = None,
    resume: bool = False,
    recipe: Optional[Mapping[str, Any]] = None,
) -> dict:
    """Entry point of ``configs/train.json`` (``python -m monai.bundle run`` and
    ``thyroid-nodule train``): datalist from ``dataset`` (CSV, class folders or a studies folder),
    a stratified case-grouped ``val_fraction`` split, then :func:`fit`; with the config's
    ``recipe``, on crops around each case's box (:func:`thyroid_plugin.recipe.training_inputs`)."""
    from .recipe import box_sources, training_inputs

    settings = TrainSettings.from_mapping(training, image_size=image_size, seed=seed)
    inputs = training_inputs(recipe, settings.image_size, settings.augmentation)
    datalist = load_datalist(dataset)
    train_list, val_list = grouped_split(datalist, val_fraction, seed)
    info = {"dataset": str(dataset), "val_fraction": val_fraction, "seed": seed, "split": "stratified case-grouped"}
    transforms = {}
    if inputs is not None:
        info.update(recipe=dict(recipe), boxes={"train": box_sources(inputs, train_list), "val": box_sources(inputs, val_list)})
        transforms = {"train_transforms": inputs.train_transforms(), "val_transforms": inputs.val_transforms()}
    return fit(network, loss, optimizer, train_list, val_list, output_dir, settings, device=device, train_info=info, resume=resume,
               **transforms)
