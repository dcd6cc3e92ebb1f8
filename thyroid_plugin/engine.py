"""Training and evaluation on pytorch-ignite.

:func:`fit` trains a network with the combined loss and keeps the model that scores best on a
validation split (ROC-AUC by default). Behaviour lives in ignite event handlers: validation,
classification metrics, best-model publication, resume checkpoints, early stopping, tqdm
progress, progress lines for MONAI Label's task log and TensorBoard.

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
    device = torch.device(device) if device is not None else default_device()
    out = Path(output_dir)
    is_main = rank == 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    set_determinism(seed=settings.seed + rank)
    meta_tracking = get_track_meta()
    set_track_meta(False)  # plain tensors: the metadata is not needed in training and costs time

    network.to(device)
    if settings.channels_last:
        network.to(memory_format=torch.channels_last)
    network_def = network.network_def()
    if hasattr(loss_fn, "set_class_balance"):
        loss_fn.set_class_balance(class_counts(train_list))
    loss_fn.to(device)
    model = network
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None)
    forward_model = torch.compile(model) if settings.compile else model

    size = settings.image_size
    train_tf = list(train_transforms) if train_transforms is not None else (
        preprocess_transforms(size) + augmentation_transforms(size, settings.augmentation))
    val_tf = list(val_transforms) if val_transforms is not None else preprocess_transforms(size)
    train_ds = _dataset(train_list, train_tf, settings)  # built (decoded, resized, cached) once
    sampler = None
    if world_size > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(train_ds, num_replicas=world_size, rank=rank, shuffle=True, seed=settings.seed)
    train_loader = _batches(train_ds, settings, settings.batch_size, shuffle=True, sampler=sampler)
    val_loader = None
    if val_list:
        _, val_loader = make_loader(val_list, val_tf, settings, settings.val_batch_size, shuffle=False)

    dtype = amp_dtype(device, settings.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    train_step = make_train_step(forward_model, network, loss_fn, optimizer, scaler, device, settings)

    def _validates(engine: Engine, epoch: int) -> bool:
        return engine.state.epoch % settings.val_interval == 0 or engine.state.epoch == engine.state.max_epochs

    trainer = Engine(train_step)

    stats: dict[str, Any] = {
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
    best = {"score": -math.inf}
    ckpt_dir = out / "checkpoints"
    to_save = {"trainer": trainer, "network": network, "optimizer": optimizer, "scaler": scaler}

    if resume:
        last = sorted(ckpt_dir.glob("last_checkpoint_*.pt"), key=os.path.getmtime) if ckpt_dir.is_dir() else []
        if last:
            state = torch.load(last[-1], map_location=device, weights_only=True)
            Checkpoint.load_objects(to_load=to_save, checkpoint=state)
            old = out / "train_stats.json"
            if old.is_file():
                previous = json.loads(old.read_text())
                for key in ("best_metric", "best_metric_epoch", "metrics", "history", "model", "start_ts"):
                    if previous.get(key) is not None:
                        stats[key] = previous[key]
                if previous.get("best_metric") is not None:
                    best["score"] = float(previous["best_metric"])
            logger.info("resumed from %s at epoch %d", last[-1].name, trainer.state.epoch)
            if trainer.state.epoch >= settings.epochs:
                # a finished run stays finished (ignite would start a finished engine afresh)
                if (out / "train_stats.json").is_file():
                    stats.update(json.loads((out / "train_stats.json").read_text()))
                logger.info("the run in %s already finished %d epochs; nothing to resume", out, trainer.state.epoch)
                set_track_meta(meta_tracking)
                return stats

    if sampler is not None:
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: sampler.set_epoch(e.state.epoch))

    # ---- running means of the loss parts, for logs and TensorBoard
    @trainer.on(Events.EPOCH_STARTED)
    def _reset_running(engine: Engine) -> None:
        engine.state.sums = {}
        engine.state.count = 0
        engine.state.epoch_start = time.time()

    @trainer.on(Events.ITERATION_COMPLETED)
    def _accumulate(engine: Engine) -> None:
        for k, v in engine.state.output.items():
            engine.state.sums[k] = engine.state.sums.get(k, 0.0) + v
        engine.state.count += 1
        if not math.isfinite(engine.state.output["loss"]):
            raise FloatingPointError(f"the loss became {engine.state.output['loss']} at epoch {engine.state.epoch}")
        if is_main and settings.log_every and engine.state.iteration % settings.log_every == 0 and not _progress_enabled(settings.progress):
            it = (engine.state.iteration - 1) % engine.state.epoch_length + 1
            print(
                f"[train] epoch {engine.state.epoch}/{engine.state.max_epochs} step {it}/{engine.state.epoch_length} "
                f"loss {engine.state.output['loss']:.4f}",
                flush=True,
            )

    if is_main and _progress_enabled(settings.progress):
        from ignite.handlers import ProgressBar

        ProgressBar(persist=False).attach(trainer, output_transform=lambda o: {"loss": o["loss"]})

    tb = None
    if is_main and settings.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(log_dir=str(out / "tensorboard"))
        except ImportError:  # TensorBoard is optional
            tb = None

    def _publish(engine_epoch: int, metrics: Mapping[str, float]) -> None:
        info = {**dict(train_info or {}), "epoch": engine_epoch, "train_size": len(train_list), "val_size": len(val_list),
                "loss_form": getattr(loss_fn, "form", ""), "settings": asdict(settings)}
        last = getattr(trainer.state, "last_predictions", None)
        validation = (last.prob_malignant.tolist(), last.labels.tolist()) if metrics and last is not None else None
        identity = save_checkpoint(out / "model.pt", network, network_def, size, metrics, info,
                                   threshold=metrics.get("threshold"), validation=validation)
        atomic_write_json(out / "metrics.json", {k: metrics.get(k) for k in OPERATING_POINT_METRICS})
        stats["model"] = identity
        if publish_path:
            atomic_write_bytes(publish_path, (out / "model.pt").read_bytes())
            if on_publish:
                on_publish(str(publish_path))

    def _write_stats() -> None:
        if not is_main:
            return
        elapsed = str(datetime.timedelta(seconds=int(time.time() - stats["start_ts"])))
        running = stats["status"] == "running"
        stats.pop("total_time" if running else "current_time", None)
        stats["current_time" if running else "total_time"] = elapsed
        atomic_write_json(out / "train_stats.json", stats)
        if stats_path:
            atomic_write_json(Path(stats_path), stats)

    @trainer.on(Events.EPOCH_COMPLETED)
    def _end_epoch(engine: Engine) -> None:
        means = {k: v / max(1, engine.state.count) for k, v in engine.state.sums.items()}
        record: dict[str, Any] = {"epoch": engine.state.epoch, "time_s": round(time.time() - engine.state.epoch_start, 1)}
        record.update({f"train_{k}": round(v, 5) for k, v in means.items()})
        validate = _validates(engine, 0) if val_loader is not None else False
        if validate:
            engine.state.last_predictions = predict(network, val_loader, device, dtype, settings.channels_last)
            metrics = engine.state.last_predictions.metrics()
            record.update({f"val_{k}": v for k, v in metrics.items()})
            score = metrics.get(settings.key_metric, float("nan"))
            score = score if math.isfinite(score) else -metrics["loss"] - 1e3  # one class in val: use the loss
            if score > best["score"] and is_main:
                best["score"] = score
                stats["best_metric"] = metrics.get(settings.key_metric)
                stats["best_metric_epoch"] = engine.state.epoch
                stats["metrics"] = {k: metrics[k] for k in OPERATING_POINT_METRICS}
                _publish(engine.state.epoch, metrics)
            engine.state.last_val = metrics
        elif val_loader is None and is_main:
            # nothing to choose with: the last epoch is the model
            _publish(engine.state.epoch, {})
        stats["epoch"] = engine.state.epoch
        stats["history"].append(json_safe(record))
        _write_stats()
        if is_main:
            val_text = ""
            if validate:
                m = engine.state.last_val
                val_text = " ".join(f"val_{k} {m[k]:.4f}" for k in ("auc", "balanced_accuracy", "loss") if math.isfinite(m[k]))
            print(
                f"[train] epoch {engine.state.epoch}/{engine.state.max_epochs} done in {record['time_s']}s "
                f"loss {means.get('loss', float('nan')):.4f} {val_text} best {stats['best_metric']} (epoch {stats['best_metric_epoch']})",
                flush=True,
            )
            if tb is not None:
                for k, v in means.items():
                    tb.add_scalar(f"train/{k}", v, engine.state.epoch)
                if validate:
                    for k, v in engine.state.last_val.items():
                        if math.isfinite(v):
                            tb.add_scalar(f"val/{k}", v, engine.state.epoch)
                tb.flush()

    if val_loader is not None and settings.early_stop_patience > 0:
        def _score(engine: Engine) -> float:
            v = engine.state.last_val.get(settings.key_metric, float("nan"))
            return v if math.isfinite(v) else -engine.state.last_val["loss"]

        trainer.add_event_handler(Events.EPOCH_COMPLETED(event_filter=_validates),
                                  EarlyStopping(settings.early_stop_patience, _score, trainer))

    # created on every rank: ignite's DiskSaver synchronises the ranks and writes on rank 0 only
    saver = Checkpoint(to_save, DiskSaver(str(ckpt_dir), require_empty=False, atomic=True), filename_prefix="last", n_saved=1)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, saver)

    if is_main:
        @trainer.on(Events.EPOCH_COMPLETED)
        def _drop_stale_checkpoints(engine: Engine) -> None:
            # the saver removes its own older file, not one left by an earlier (resumed) process
            keep = saver.last_checkpoint
            for old_file in ckpt_dir.glob("last_checkpoint_*.pt"):
                if keep and old_file.name != Path(str(keep)).name:
                    old_file.unlink(missing_ok=True)

    try:
        trainer.run(train_loader, max_epochs=settings.epochs)
        stats["status"] = "stopped early" if trainer.state.epoch < settings.epochs else "done"
    except BaseException as e:
        stats["status"] = "failed" if not isinstance(e, KeyboardInterrupt) else "stopped"
        stats["error"] = f"{type(e).__name__}: {e}"
        _write_stats()
        raise
    finally:
        set_track_meta(meta_tracking)
        if tb is not None:
            tb.close()
    _write_stats()
    return stats


def evaluate_network(
    network: nn.Module, datalist: Sequence[Mapping], image_size: int, device: Optional[torch.device] = None,
    batch_size: int = 32, amp: str = "off", threshold: Optional[float] = None,
) -> tuple[dict, np.ndarray, np.ndarray]:
    """Metrics of ``network`` on ``datalist``: ``(metrics, prob_malignant (N,), labels (N,))``;
    the thresholded metrics at ``threshold`` (the one the network serves with; default the
    operating point chosen on these predictions)."""
    device = device or default_device()
    settings = TrainSettings(image_size=image_size, amp=amp, cache=False, val_batch_size=batch_size, channels_last=True)
    network.to(device).to(memory_format=torch.channels_last)
    _, loader = make_loader(datalist, preprocess_transforms(image_size), settings, batch_size, shuffle=False)
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
) -> dict:
    """Entry point of ``configs/train.json`` (``python -m monai.bundle run`` and
    ``thyroid-nodule train``): datalist from ``dataset`` (CSV, class folders or a studies folder),
    a stratified case-grouped ``val_fraction`` split, then :func:`fit`."""
    datalist = load_datalist(dataset)
    train_list, val_list = grouped_split(datalist, val_fraction, seed)
    settings = TrainSettings.from_mapping(training, image_size=image_size, seed=seed)
    info = {"dataset": str(dataset), "val_fraction": val_fraction, "seed": seed, "split": "stratified case-grouped"}
    return fit(network, loss, optimizer, train_list, val_list, output_dir, settings, device=device, train_info=info, resume=resume)
