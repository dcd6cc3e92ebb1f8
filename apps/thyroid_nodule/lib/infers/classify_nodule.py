"""``classify_nodule``: MONAI Label inference task over :class:`thyroid_plugin.inference.NodulePredictor`."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable, Dict, Optional, Sequence

from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from thyroid_plugin.constants import CLASS_NAMES
from thyroid_plugin.errors import InvalidImageError, ModelNotFoundError
from thyroid_plugin.inference import NodulePredictor, Prediction
from thyroid_plugin.studies import InvalidRequestError
from thyroid_plugin.io import DEFAULT_MAX_PIXELS, UltrasoundImage, encode_mask, json_safe, load_image, mask_suffix, transient_file

from ..http import http_errors

logger = logging.getLogger(__name__)


class _LoadFrame:
    """Pre-transform: read the request's image (upload or datastore file) with its geometry."""

    def __init__(self, max_pixels: int) -> None:
        self.max_pixels = max_pixels

    def __call__(self, data: Dict[str, Any]) -> Dict[str, Any]:
        path = data.get("image")
        if not isinstance(path, str) or not path or not os.path.isfile(path):
            raise_not_found(data.get("image_id") or path)
        if data.get("mask_format") not in (None, "", "native", "nrrd"):
            raise InvalidRequestError(f"mask_format must be 'native' or 'nrrd', not {data.get('mask_format')!r}"[:200])
        frame = data.get("frame")
        if frame is not None and (not isinstance(frame, int) or isinstance(frame, bool) or frame < 0):
            raise InvalidImageError(f"frame must be a non-negative integer, got {frame!r}")
        data["image_source"] = load_image(path, frame=frame, max_pixels=self.max_pixels)
        return data


def raise_not_found(image) -> None:
    from fastapi import HTTPException

    raise HTTPException(status_code=404, detail=f"image not found: {image!r}")


class ClassifyNodule(BasicInferTask):
    """Classify a thyroid nodule frame and return its saliency mask on the frame's grid.

    Request fields (MONAI Label ``params``): ``roi`` ``[x0, y0, x1, y1]`` (pixels, optional),
    ``frame`` (multi-frame DICOM, optional) and ``mask_format`` (``native``: the mask in the
    frame's own format, the default; ``nrrd``: an NRRD on the frame's grid whatever the frame's
    format, as 3D Slicer asks for an archive frame it names by UID). The result JSON and the mask are described in the
    README's REST contract.

    Args:
        path: model files, oldest first: the shipped pretrained model, then the trained one; the
            last that exists is served (MONAI Label's convention).
        predictor_args: keyword arguments of :class:`NodulePredictor` (``precision``,
            ``channels_last``, ``compile``, ``threshold``, ``mask_threshold``, ``network_def``,
            ``localiser_path``, ``localiser_margin``).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        max_pixels: refuse larger frames (decompression bombs included) with 413.

    Attributes:
        result_store: the app's datastore. Each finished classification is handed to its
            ``keep_result(image_path, mask_bytes, result)`` when it has one (the archive's, which
            writes the results of archive frames back in the background); others ignore it.
    """

    def __init__(
        self,
        path: Sequence[str],
        predictor_args: Optional[Dict[str, Any]] = None,
        device: str = "auto",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        description: str = "Benign/malignant thyroid nodule classification with a self-supervised saliency mask",
    ) -> None:
        super().__init__(
            path=list(path),
            network=None,
            type=InferType.CLASSIFICATION,
            labels=list(CLASS_NAMES),
            dimension=2,
            description=description,
        )
        self._config.pop("device", None)  # one server-side device choice, not a client option
        self.predictor_args = dict(predictor_args or {})
        self.device = device
        self.max_pixels = int(max_pixels)
        self._predictor: Optional[NodulePredictor] = None
        self._lock = threading.Lock()
        self.result_store = None

    # --------------------------------------------------------------------------------- model
    def is_valid(self) -> bool:
        # listed even before a model exists: requests then get a 503 that says so
        return True

    def predictor(self) -> NodulePredictor:
        """The predictor of the newest model file, loaded once and followed when replaced."""
        path = self.get_path()
        if path is None:
            raise ModelNotFoundError(f"no model file among {self.path}")
        with self._lock:
            if self._predictor is None or self._predictor.model_path != path:
                self._predictor = NodulePredictor(path, device=self.device, **self.predictor_args)
            else:
                self._predictor.reload_if_changed()
            return self._predictor

    def info(self) -> Dict[str, Any]:
        info = super().info()
        try:
            with http_errors():
                p = self.predictor()
            model = p.info()
            # a metric can be NaN (e.g. AUC on a one-class validation split): JSON has no NaN
            keys = ("model", "metrics", "created", "image_size", "precision", "device", "calibration", "compiled",
                    "compiled_batch_sizes", "compiled_ms_per_image", "compiled_cost_vs_eager", "localiser")
            info["model"] = json_safe({k: model[k] for k in keys})
            info["model"]["path"] = os.path.basename(p.model_path)
        except Exception as e:  # /info must answer even when the model is missing or damaged
            info["model"] = None
            info["model_error"] = getattr(e, "detail", str(e))
        return info

    # ------------------------------------------------------------------------------ pipeline
    def pre_transforms(self, data=None) -> Sequence[Callable]:
        return [_LoadFrame(self.max_pixels)]

    def post_transforms(self, data=None) -> Sequence[Callable]:
        return []

    def __call__(self, request, callbacks=None):
        with http_errors():
            return super().__call__(request, callbacks)

    def _hand_over(self, image_path, mask: bytes, result: Dict[str, Any]) -> None:
        """Give the finished result to the datastore's ``keep_result`` (see ``result_store``);
        the answer goes out whatever the datastore does with it."""
        keep_result = getattr(self.result_store, "keep_result", None)
        if keep_result is None or not isinstance(image_path, str):
            return
        try:
            keep_result(image_path, mask, result)
        except Exception:
            logger.exception("the datastore could not take the result of %s", os.path.basename(image_path))

    def run_inferer(self, data: Dict[str, Any], convert_to_batch=True, device="cuda"):
        image: UltrasoundImage = data["image_source"]
        data["pred"] = self.predictor().predict(image, data.get("roi"))
        return data

    def writer(self, data: Dict[str, Any], extension=None, dtype=None):
        image: UltrasoundImage = data["image_source"]
        pred: Prediction = data["pred"]
        native = encode_mask(image, pred.saliency_uint8())
        as_nrrd = data.get("mask_format") == "nrrd" and image.format != "nrrd"
        result = json_safe(result_json(pred, image, ".nrrd" if as_nrrd else mask_suffix(image)))  # JSON has no NaN
        self._hand_over(data.get("image"), native, result)  # the archive keeps the frame's own format
        # a transient file that MONAI Label streams back and deletes: no fsync, no rename
        mask = encode_mask(image, pred.saliency_uint8(), as_nrrd=True) if as_nrrd else native
        path = transient_file(mask, ".nrrd" if as_nrrd else mask_suffix(image), "saliency-")
        return path, result

    # ---------------------------------------------------------------------------- batch path
    def predict_batch(self, images: Sequence[UltrasoundImage], rois: Sequence) -> list:
        with http_errors():
            return self.predictor().predict_batch(images, rois)


def result_json(pred: Prediction, image: UltrasoundImage, mask_file_suffix: Optional[str] = None) -> Dict[str, Any]:
    """The result fields plus the grid of the returned mask (which is the input's grid) and its
    file format (``mask_file_suffix``, default: the input's own mask format)."""
    out = pred.to_json()
    out["image"] = {
        "size": [image.shape[1], image.shape[0]],
        "spacing": [round(v, 9) for v in image.spacing],
        "origin": [round(v, 9) for v in image.origin],
        "direction": [[round(float(v), 9) for v in row] for row in image.direction],
        "format": image.format,
        "mask_format": (mask_file_suffix or mask_suffix(image)).lstrip("."),
    }
    out["timings"] = {k: round(float(v), 4) for k, v in pred.timings.items()}
    return out
