"""Batch inference that keeps every result in the datastore.

MONAI Label's default batch task runs the images one by one; here the images go through the
network in batches, and each image's mask and result JSON are saved as a label (tag
``original`` by default, MONAI Label's tag for model output) with ``params`` holding the result,
both when the batch runs in the request (``run_sync=true``) and as a background task. A failed
image is reported and skipped; the batch goes on.

Progress of a background batch (the declared contract; 3D Slicer's module reads it): after each
chunk of images the task prints one line that is a JSON object,
``{"batch_progress": {"done": 16, "total": 40, "unit": "images"}}`` (``done``: images processed
so far, failed ones included; ``total``: images this run classifies, those whose result is
stored already not counted), which MONAI Label shows among the last lines of ``GET /batch/infer``
-> ``details``. The ``[batch] ...`` lines beside it are for people only.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable, Dict

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.batch_infer import BatchInferTask

from thyroid_plugin.constants import TASK_NAME
from thyroid_plugin.errors import ThyroidPluginError
from thyroid_plugin.io import encode_mask, load_image, mask_suffix, transient_file
from thyroid_plugin.studies import InvalidRequestError, check_tag

from .infers.classify_nodule import ClassifyNodule, result_json

logger = logging.getLogger(__name__)


class PersistingBatchInfer(BatchInferTask):
    """Batch ``classify_nodule`` over all / labelled / unlabelled images, results persisted.

    Request fields: ``images`` (``all``, ``labeled``, ``unlabeled`` or a list of ids),
    ``label_tag`` (default ``original``), ``batch_size`` (default: ``configs/inference.json``
    ``inference.batch_size``, a batch size the served network is compiled for), ``max_batch_size``
    (at most this many images, 0 for all).
    """

    def __init__(self, task: ClassifyNodule, max_pixels: int, batch_size: int = 8) -> None:
        self.task = task
        self.max_pixels = max_pixels
        self.batch_size = int(batch_size)

    def __call__(self, request: Dict[str, Any], datastore: Datastore, infer: Callable) -> Dict[str, Any]:
        model = request.get("model", TASK_NAME)
        if model != TASK_NAME:
            from fastapi import HTTPException

            raise HTTPException(status_code=404, detail=f"unknown model {model!r}; this app serves {TASK_NAME!r}")
        images = request.get("images", "all")
        if not (isinstance(images, str) or (isinstance(images, list) and all(isinstance(i, str) for i in images))):
            raise InvalidRequestError("images must be 'all', 'labeled', 'unlabeled' or a list of image ids")
        limit = _count_option(request, "max_batch_size", 0)
        batch_size = max(1, _count_option(request, "batch_size", self.batch_size))
        tag = check_tag(request.get("label_tag") or DefaultLabelTag.ORIGINAL.value)
        image_ids = sorted(self.get_images(request, datastore))
        if limit > 0:
            image_ids = image_ids[:limit]
        start = time.time()
        results: Dict[str, Any] = {}
        stored = _results_already_stored(datastore, self.task, image_ids)
        for image_id in stored:
            results[image_id] = {"skipped": "the archive holds this model's result for the frame already"}
        image_ids = [i for i in image_ids if i not in stored]
        done = 0
        phases = {"read": 0.0, "classify": 0.0, "save": 0.0}
        for offset in range(0, len(image_ids), batch_size):
            chunk = image_ids[offset : offset + batch_size]
            loaded = []
            t0 = time.perf_counter()
            for image_id in chunk:
                try:
                    info = datastore.get_image_info(image_id)
                    loaded.append((image_id, load_image(datastore.get_image_uri(image_id), max_pixels=self.max_pixels), info.get("roi")))
                except (ThyroidPluginError, OSError) as e:
                    results[image_id] = {"error": str(e)}
            t1 = time.perf_counter()
            phases["read"] += t1 - t0
            if loaded:
                try:
                    preds = self.task.predict_batch([im for _, im, _ in loaded], [roi for _, _, roi in loaded])
                except ThyroidPluginError:  # e.g. a stored roi that no longer fits: go one by one
                    preds = []
                    for image_id, im, roi in loaded:
                        try:
                            preds.extend(self.task.predict_batch([im], [roi]))
                        except ThyroidPluginError as err:
                            preds.append(err)
                t2 = time.perf_counter()
                phases["classify"] += t2 - t1
                done_preds = []
                for (image_id, image, _), pred in zip(loaded, preds):
                    if isinstance(pred, Exception):
                        results[image_id] = {"error": str(pred)}
                    else:
                        done_preds.append((image_id, image, pred))
                results.update(_save_results(datastore, done_preds, tag, model))
                phases["save"] += time.perf_counter() - t2
            done += len(chunk)
            print(f"[batch] {done}/{len(image_ids)} images", flush=True)
            print(progress_line(done, len(image_ids)), flush=True)
        failed = sum(1 for r in results.values() if "error" in r)
        logger.info("batch inference of %d images in %.1fs, %d failed", len(image_ids), time.time() - start, failed)
        return {"total": len(image_ids) + len(stored), "failed": failed, "skipped": len(stored), "label_tag": tag,
                "results": results, "seconds": round(time.time() - start, 2),
                "phase_seconds": {k: round(v, 3) for k, v in phases.items()}}


#: key of the JSON progress line a background batch prints (see the module docstring)
PROGRESS_KEY = "batch_progress"


def progress_line(done: int, total: int) -> str:
    """The batch's progress record: one line of JSON, ``done`` of ``total`` images."""
    return json.dumps({PROGRESS_KEY: {"done": int(done), "total": int(total), "unit": "images"}})


def _save_results(datastore: Datastore, preds, tag: str, model: str) -> Dict[str, Any]:
    """Store each ``(image_id, image, prediction)``'s mask and result JSON as its label ``tag``,
    with one datastore write for the chunk where the datastore can (``save_labels``); an image
    whose label is not saved gets an ``error`` instead of its result."""
    results: Dict[str, Any] = {}
    labels = []  # the masks go to transient files the datastore copies atomically and durably: no fsync here
    try:
        for image_id, image, pred in preds:
            results[image_id] = result_json(pred, image)
            path = transient_file(encode_mask(image, pred.saliency_uint8()), mask_suffix(image), "batch-")
            labels.append((image_id, path, {"model": model, "params": results[image_id]}))
        save_labels = getattr(datastore, "save_labels", None)
        if save_labels is not None:
            errors = save_labels(labels, tag)
        else:  # e.g. the archive: its labels are objects in the archive, written one by one
            errors = {}
            for image_id, path, info in labels:
                datastore.save_label(image_id, path, tag, info)
    finally:
        for _, path, _ in labels:
            os.unlink(path)
    for image_id, reason in errors.items():
        results[image_id] = {"error": f"the result could not be saved: {reason}"}
    return results


def _results_already_stored(datastore: Datastore, task: ClassifyNodule, image_ids) -> set:
    """Images whose result by the served model the datastore holds already: an archive
    (``lib.archive``) writes a result once per model and frame, so those are not classified again."""
    has_result = getattr(datastore, "has_result", None)
    if has_result is None or not image_ids:
        return set()
    model = task.predictor().model_id
    return {image_id for image_id in image_ids if has_result(image_id, model)}


def _count_option(request: Dict[str, Any], key: str, default: int) -> int:
    value = request.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequestError(f"{key} must be a non-negative whole number, got {value!r}"[:200])
    return value
