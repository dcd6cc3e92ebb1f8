"""``classify_nodule`` training: MONAI Label's train task over :func:`thyroid_plugin.engine.fit`.

Trains on every confirmed case of the datastore with the shipped model's recipe
(``configs/train.json`` ``recipe``, :func:`thyroid_plugin.recipe.training_inputs`): each case
is cut around its box (the ``roi`` confirmed with the diagnosis, else the box of the ``final``
label's mask when one was saved or imported) with a random margin and jitter, a share of whole frames, ultrasound
augmentation, at the config's ``image_size`` (the shipped model's 96 px); cases without a box are
trained on their whole frame. Validation cuts each case at ``val_margin`` around its box, and the
served model is scored on the very same inputs. The validation split is grouped by case and
fixed across retrains (``model/classify_nodule_split.json``). The best model of a run is
published only when the run completes (and, by default, only if it scores at least as well as
the served model on the same validation cases); a failed or stopped run leaves the served model
as it was. Before it is published, the run's model is calibrated (Platt scaling by default,
``calibration`` in ``configs/train.json``) on its best epoch's predictions for the validation
cases: the site's own confirmed cases, the calibration that carries to its scanners
(docs/evaluation.md, "Calibrating at the site").
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch
from monai.inferers import SimpleInferer
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.train.basic_train import BasicTrainTask, Context

from thyroid_plugin.calibration import CALIBRATION_METHODS, calibrate_on_kept_validation
from thyroid_plugin.checkpoint import load_checkpoint, model_identity, network_from_checkpoint, validation_metrics
from thyroid_plugin.config import load_config
from thyroid_plugin.data import FixedGroupSplit, class_counts, datalist_from_datastore
from thyroid_plugin.engine import TrainSettings, evaluate_network, fit
from thyroid_plugin.errors import DatalistError, short_repr
from thyroid_plugin.io import atomic_write_bytes, atomic_write_json, json_safe
from thyroid_plugin.metrics import OPERATING_POINT_METRICS
from thyroid_plugin.recipe import CropInputs, box_sources, training_inputs
from thyroid_plugin.studies import InvalidRequestError
from thyroid_plugin.transforms import augmentation_transforms, preprocess_transforms

logger = logging.getLogger(__name__)

#: fewest confirmed cases a training run accepts (and it needs both classes)
MIN_CASES = 4


class ClassifyNoduleTrainer(BasicTrainTask):
    """Retrain ``classify_nodule`` on the confirmed cases.

    Request options (``POST /train/classify_nodule`` body; defaults from ``configs/train.json``):
    ``max_epochs``, ``train_batch_size``, ``val_batch_size``, ``learning_rate``, ``val_split``,
    ``early_stop_patience``, ``pretrained`` (start from the served model), ``publish``
    (``"if_better"`` or ``"always"``), ``calibration`` (``"platt"``, ``"temperature"`` or
    ``"none"``), ``device``, ``multi_gpu``, ``gpus`` (MONAI Label's
    distributed data-parallel training over several GPUs).
    """

    def __init__(self, model_dir: str, publish_path: str, served_path, description: str = "Retrain classify_nodule on confirmed cases",
                 threshold: Optional[float] = None, **kwargs) -> None:
        self._train_cfg = load_config("train")
        training = self._train_cfg["training"]
        config = {
            "max_epochs": int(training["epochs"]),
            "train_batch_size": int(training["batch_size"]),
            "val_batch_size": int(training["val_batch_size"]),
            "learning_rate": float(self._train_cfg["optimizer"]["lr"]),
            "val_split": float(self._train_cfg["val_fraction"]),
            "early_stop_patience": int(training["early_stop_patience"]),
            "pretrained": True,
            "publish": "if_better",
            "calibration": str(self._train_cfg.get("calibration", "platt")),
        }
        super().__init__(model_dir, description, config=config, publish_path=publish_path,
                         tracking=None, **kwargs)
        for unused in ("dataset", "dataloader", "tracking", "tracking_uri", "tracking_experiment_name"):
            self._config.pop(unused, None)  # BasicTrainTask options this trainer does not read
        self._served_path = served_path  # callable -> path of the model being served, or None
        self._threshold = threshold  # the served threshold when configured (else each model's own)
        self._split_path = os.path.join(model_dir, "classify_nodule_split.json")
        self.inputs(int(self._train_cfg["image_size"]))  # a bad recipe in the config stops the app at start

    # --------------------------------------------------- the objects training is built from
    def network(self, context: Context):
        network = self._train_cfg.get_parsed_content("network_def", instantiate=True)
        served = self._served_path() if context.request.get("pretrained", True) else None
        if served:
            payload = load_checkpoint(served)
            if payload["network_def"] == network.network_def():
                network.load_state_dict(network_from_checkpoint(payload).state_dict())
                logger.info("starting from the served model %s", model_identity(served))
        return network

    def optimizer(self, context: Context):
        return torch.optim.Adam(context.network.parameters(), lr=float(context.request["learning_rate"]),
                                weight_decay=float(self._train_cfg["optimizer"].get("weight_decay", 0.0)))

    def loss_function(self, context: Context):
        return self._train_cfg.get_parsed_content("loss", instantiate=True)

    def inputs(self, image_size: int) -> Optional[CropInputs]:
        """The recipe's inputs at ``image_size`` (``configs/train.json`` ``recipe``: crops around
        each case's box, the ``roi`` its user confirmed, else its ``final`` mask's), or ``None``
        without a recipe."""
        return training_inputs(self._train_cfg.get("recipe"), image_size, self._train_cfg["training"].get("augmentation"))

    def train_pre_transforms(self, context: Context):
        inputs = getattr(context, "inputs", None)
        if inputs is not None:
            return inputs.train_transforms()
        size = int(self._train_cfg["image_size"])
        return preprocess_transforms(size) + augmentation_transforms(size, self._train_cfg["training"].get("augmentation"))

    def val_pre_transforms(self, context: Context):
        inputs = getattr(context, "inputs", None)
        return inputs.val_transforms() if inputs is not None else preprocess_transforms(int(self._train_cfg["image_size"]))

    def train_post_transforms(self, context: Context):
        return []  # classification needs no post-processing of the logits

    def val_inferer(self, context: Context):
        return SimpleInferer()  # validation runs each case's input (its box's crop, or the whole frame) at once

    def stats(self):
        """``/info`` -> ``train_stats.classify_nodule``: the last run's state, rewritten by the run
        at its start and after every epoch. This is the declared training-progress contract
        (3D Slicer's module reads it; the ``[train]`` log lines are for people only):

        - ``status``: ``"running"`` (from the moment a run starts), then ``"done"``,
          ``"stopped early"`` (early stopping: done before ``total_epochs``), ``"stopped"`` or
          ``"failed"`` (with ``error`` and ``error_type``);
        - ``epoch``: epochs completed by the current run (integer, 0 until the first ends);
          ``total_epochs``: the epochs it was asked for (``max_epochs``); progress while running
          is ``epoch / total_epochs``;
        - ``start_ts``: when the run started (Unix seconds);
        - ``best_metric`` (validation AUC), ``metrics``, ``published``, ``model`` of the finished
          run (see the README's REST section).
        """
        stats = super().stats()
        if stats.get("status") == "running":
            from monailabel.utils.async_tasks.utils import processes, tasks

            if not processes("train"):  # the run ended without writing its result: say why
                last = (tasks("train") or [{}])[-1]
                if last.get("status") == "STOPPED":
                    stats["status"] = "stopped"
                    stats["error"] = "stopped on request (DELETE /train/); the served model was kept"
                else:
                    stats["status"] = "failed"
                    stats["error"] = ("the training process ended before finishing (killed, out of memory, crashed, or "
                                      "the server stopped); the served model was kept. Its last lines: GET /train/ "
                                      "and the server log")
        return json_safe(stats)  # /info must stay JSON (a metric can be NaN)

    # ------------------------------------------------------------------------------- data
    def pre_process(self, request, datastore: Datastore):
        return datalist_from_datastore(datastore)

    def partition_datalist(self, context: Context, shuffle: bool = False):
        split = FixedGroupSplit(self._split_path, float(context.request.get("val_split", 0.2)), seed=0)
        return split.split(context.datalist)

    # ---------------------------------------------------------------------------- training
    def train(self, rank, world_size, request, datalist):
        start = time.time()
        context = Context()
        context.request = request
        context.datalist = datalist
        context.local_rank = rank
        context.world_size = world_size
        context.run_id = request["run_id"]
        context.multi_gpu = bool(request.get("multi_gpu")) and world_size > 1
        stats_path = Path(self._stats_path)
        check_train_options(request)  # before anything is written (the server checked them too)
        if rank == 0:
            _write_started(stats_path, context.run_id, int(request["max_epochs"]))
        try:
            _check_datalist(datalist)
            if context.multi_gpu:
                os.environ["LOCAL_RANK"] = str(rank)
                torch.distributed.init_process_group(
                    backend=request.get("distributed_backend", "nccl"),
                    init_method=request.get("distributed_url", "env://"),
                    world_size=world_size,
                    rank=rank,
                )
            context.device = self._device(context)
            context.output_dir = os.path.join(self._model_dir, "train_runs", context.run_id)
            context.train_datalist, context.val_datalist = self.partition_datalist(context)
            if not context.val_datalist:
                raise DatalistError("no case fell into the validation split yet; confirm more cases")
            context.inputs = self.inputs(int(self._train_cfg["image_size"]))
            context.network = self.network(context)
            context.optimizer = self.optimizer(context)
            settings = TrainSettings.from_mapping(
                self._train_cfg["training"],
                epochs=int(request["max_epochs"]),
                batch_size=int(request["train_batch_size"]),
                val_batch_size=int(request["val_batch_size"]),
                early_stop_patience=int(request.get("early_stop_patience", 0)),
                image_size=int(self._train_cfg["image_size"]),
                progress=False,
                log_every=5,
            )
            train_info = {"source": "MONAI Label datastore", "run_id": context.run_id, "split": "fixed case-grouped"}
            if context.inputs is not None:  # what the recipe trained on: how many cases had a box, and from where
                boxes = {"train": box_sources(context.inputs, context.train_datalist),
                         "val": box_sources(context.inputs, context.val_datalist)}
                train_info.update(recipe=dict(self._train_cfg.get("recipe")), boxes=boxes)
                if rank == 0:
                    print(f"[train] boxes of the training cases {boxes['train']}, of the validation cases {boxes['val']} "
                          "(roi: the confirmed box; mask: the final label's mask; none: the whole frame)", flush=True)
            baseline = self._baseline(context, settings) if rank == 0 else None
            stats = fit(
                context.network,
                self.loss_function(context),
                context.optimizer,
                context.train_datalist,
                context.val_datalist,
                context.output_dir,
                settings,
                device=context.device,
                stats_path=stats_path,
                rank=rank,
                world_size=world_size,
                train_info=train_info,
                train_transforms=self.train_pre_transforms(context),
                val_transforms=self.val_pre_transforms(context),
            )
            if rank == 0:
                run_model = Path(context.output_dir) / "model.pt"
                method = request.get("calibration", self._config.get("calibration", "platt"))
                if method != "none" and run_model.is_file():
                    # honest probabilities on this site's held-out confirmed cases; the ranking (AUC)
                    # and the cut between cases stay, the threshold moves with the probabilities
                    stats["calibration"] = calibrate_on_kept_validation(str(run_model), method)
                    if stats["calibration"] is not None:
                        stats["model"] = stats["calibration"]["model"]
                        print(f"[train] calibrated ({method}) on {stats['calibration']['n']} validation frames: "
                              f"ECE {stats['calibration']['val_ece_before']:.3f} -> "
                              f"{stats['calibration']['val_ece_after']:.3f}", flush=True)
                if run_model.is_file():
                    # the run's metrics where its model will serve: at the configured threshold, else its own
                    at = validation_metrics(load_checkpoint(run_model), self._threshold)
                    stats["metrics"] = {k: at.get(k) for k in OPERATING_POINT_METRICS}
                if context.inputs is not None:
                    stats["boxes"] = train_info["boxes"]
                stats = self._publish(context, stats, baseline, request.get("publish", "if_better"))
                _write_stats(stats_path, stats)
            return stats
        except BaseException as e:
            if rank == 0:
                _write_failure(stats_path, e, start)
            raise
        finally:
            if context.multi_gpu and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()

    def _baseline(self, context: Context, settings: TrainSettings) -> Optional[Dict[str, Any]]:
        """The served model's metrics on this run's validation cases (for ``publish=if_better``),
        each case given to it as the run validates it (the same box, at the served model's own
        input size); the thresholded ones at the threshold it serves with."""
        served = self._served_path()
        if not served:
            return None
        payload = load_checkpoint(served)
        network = network_from_checkpoint(payload)
        threshold = self._threshold if self._threshold is not None else float(payload.get("threshold", 0.5))
        size = int(payload["image_size"])
        inputs = context.inputs if context.inputs is None or context.inputs.size == size else self.inputs(size)
        metrics, _, _ = evaluate_network(network, context.val_datalist, size, context.device, settings.val_batch_size,
                                         threshold=threshold, transforms=inputs.val_transforms() if inputs else None)
        return {"model": model_identity(served), "metrics": metrics}

    def _publish(self, context: Context, stats: Dict[str, Any], baseline, policy: str) -> Dict[str, Any]:
        run_model = Path(context.output_dir) / "model.pt"
        new = stats.get("best_metric")
        old = (baseline or {}).get("metrics", {}).get("auc") if baseline else None
        stats["baseline"] = baseline
        publish = run_model.is_file() and (
            policy == "always" or old is None or (new is not None and (not _finite(old) or new >= old))
        )
        stats["run_model"] = stats.get("model")
        if publish:
            atomic_write_bytes(self._publish_path, run_model.read_bytes())
            stats["published"] = True
            stats["model"] = model_identity(self._publish_path)
            print(f"[train] published {stats['model']} (val auc {new}; served model had {old})", flush=True)
        else:
            stats["published"] = False
            served = self._served_path()
            stats["model"] = model_identity(served) if served else None
            print(f"[train] not published: val auc {new} is below the served model's {old} on the same cases", flush=True)
        # the run's resume checkpoint is only needed while it runs
        shutil.rmtree(Path(context.output_dir) / "checkpoints", ignore_errors=True)
        return stats


def _number(options: Mapping, key: str, low: float, high: float, integer: bool, low_open: bool = False,
            high_open: bool = False) -> None:
    value = options[key]
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    ok = ok and (not isinstance(value, float) or math.isfinite(value)) and (value > low if low_open else value >= low)
    ok = ok and (value < high if high_open else value <= high)
    if not ok:
        lo, hi = ("(" if low_open else "[") + f"{low:g}", f"{high:g}" + (")" if high_open else "]")
        raise InvalidRequestError(f"{key} must be {kind} in {lo}, {hi}, got {short_repr(value)}")


#: request options this trainer reads: (lowest, highest, integer, lowest excluded, highest excluded)
_NUMERIC_OPTIONS = {
    "max_epochs": (1, 100_000, True, False, False),
    "train_batch_size": (1, 4096, True, False, False),
    "val_batch_size": (1, 4096, True, False, False),
    "early_stop_patience": (0, 100_000, True, False, False),
    "learning_rate": (0.0, 10.0, False, True, False),
    "val_split": (0.0, 1.0, False, True, True),
}


def check_train_options(options: Any) -> None:
    """Refuse a training request whose options would fail later or mislead (``max_epochs: -1``
    reported "done" after no epoch; ``val_split: 2`` was written into the fixed split file before
    the run failed): called by the server before a run starts, and by the run before it writes
    anything.

    Raises:
        InvalidRequestError: the first bad option, in one line.
    """
    if not isinstance(options, Mapping):
        raise InvalidRequestError(f"training options must be a JSON object, got {short_repr(options)}")
    for key, bounds in _NUMERIC_OPTIONS.items():
        if key in options:
            _number(options, key, *bounds)
    for key in ("pretrained", "multi_gpu"):
        if key in options and not isinstance(options[key], bool):
            raise InvalidRequestError(f"{key} must be true or false, got {short_repr(options[key])}")
    if "publish" in options and options["publish"] not in ("if_better", "always"):
        raise InvalidRequestError(f"publish must be 'if_better' or 'always', got {short_repr(options['publish'])}")
    if "calibration" in options and options["calibration"] not in (*CALIBRATION_METHODS, "none"):
        raise InvalidRequestError(f"calibration must be one of {', '.join((*CALIBRATION_METHODS, 'none'))}, "
                                  f"got {short_repr(options['calibration'])}")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _check_datalist(datalist) -> None:
    counts = class_counts(datalist)
    if len(datalist) < MIN_CASES or min(counts) == 0:
        raise DatalistError(
            f"training needs at least {MIN_CASES} confirmed cases of both classes; the datastore has "
            f"{counts[0]} benign and {counts[1]} malignant"
        )


def _write_stats(path: Path, stats: Dict[str, Any]) -> None:
    atomic_write_json(path, stats)


def _read_stats(path: Path) -> Dict[str, Any]:
    import json

    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}


def _write_started(path: Path, run_id: str, epochs: int) -> None:
    """Say at once that a run started (a run stopped before its first epoch must not leave the
    previous run's "done" in place); the previous results stay until new ones replace them."""
    stats = _read_stats(path)
    stats.pop("error", None)
    stats.update({"status": "running", "run_id": run_id, "epoch": 0, "total_epochs": epochs, "start_ts": int(time.time())})
    _write_stats(path, stats)


def _write_failure(path: Path, error: BaseException, start: float) -> None:
    """Keep the last good stats and say why this run failed."""
    stats = _read_stats(path)
    stats["status"] = "stopped" if isinstance(error, KeyboardInterrupt) else "failed"
    stats["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:500]
    stats["error_type"] = type(error).__name__
    stats["failed_ts"] = int(time.time())
    stats["run_time_s"] = round(time.time() - start, 1)
    _write_stats(path, stats)
