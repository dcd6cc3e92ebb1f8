"""Classify image files and write each result next to a mask, as ``thyroid-nodule predict`` and the
MONAI bundle's ``configs/inference.json`` (``run``) do."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from .io import atomic_write_json, image_id, load_image, mask_suffix, write_mask

if TYPE_CHECKING:
    from .inference import NodulePredictor

__all__ = ["predict_files"]


def predict_files(predictor: NodulePredictor, files: Sequence[os.PathLike | str], output_dir: os.PathLike | str,
                  rois: Optional[Sequence] = None) -> list[dict]:
    """Classify files with ``predictor`` and write, per input ``X.ext``, ``X.json`` (the result
    fields plus ``image`` and ``mask``) and the saliency mask ``X_saliency<suffix>`` in the
    input's format and geometry. ``X`` is the image id (:func:`thyroid_plugin.io.image_id`:
    ``x.nii.gz`` -> ``x``); ``rois``, if given, one box or ``None`` per file. Returns the JSON dicts."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rois = list(rois) if rois is not None else [None] * len(files)
    results = []
    for f, roi in zip(files, rois):
        image = load_image(f)
        pred = predictor.predict(image, roi)
        mask_path = out / f"{image_id(f)}_saliency{mask_suffix(image)}"
        write_mask(image, pred.saliency_uint8(), mask_path)
        record = {"image": os.fspath(f), **pred.to_json(), "mask": str(mask_path)}
        atomic_write_json(out / f"{image_id(f)}.json", record)
        results.append(record)
    return results
