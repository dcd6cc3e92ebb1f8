"""Active learning: the unconfirmed image the model is least sure about."""

from __future__ import annotations

import logging
import random
from typing import Any, Dict, Optional

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.strategy import Strategy

from thyroid_plugin.constants import CLASS_NAMES, POSITIVE_CLASS
from thyroid_plugin.errors import ThyroidPluginError
from thyroid_plugin.io import load_image

from ..infers.classify_nodule import ClassifyNodule

logger = logging.getLogger(__name__)


class MostUncertain(Strategy):
    """Pick the unconfirmed image whose malignant probability is closest to the decision
    threshold (uncertainty ``1 - |p - t| / max(t, 1 - t)``, 1 at the threshold).

    Probabilities come from the stored batch results of the *served* model when there are any
    (label tag ``original``), else they are computed, for at most ``max_compute`` images per
    request (a random sample, so every image gets its turn). Images handed out by this strategy
    in the last ``skip_recent_s`` seconds are skipped, so two users do not get the same case.
    """

    def __init__(self, task: ClassifyNodule, max_compute: int = 32, skip_recent_s: int = 300) -> None:
        super().__init__("The unconfirmed image the model is least sure about")
        self.task = task
        self.max_compute = max_compute
        self.skip_recent_s = skip_recent_s

    def __call__(self, request: Dict[str, Any], datastore: Datastore) -> Optional[Dict[str, Any]]:
        import time

        candidates = datastore.get_unlabeled_images()
        if not candidates:
            return None
        now = time.time()
        fresh = []
        for image_id in candidates:
            info = datastore.get_image_info(image_id)
            ts = info.get("strategy", {}).get("uncertain", {}).get("ts", 0)
            if now - ts >= self.skip_recent_s:
                fresh.append(image_id)
        candidates = fresh or candidates
        predictor = self.task.predictor()
        threshold = predictor.threshold
        scores: Dict[str, float] = {}
        for image_id in candidates:
            stored = datastore.get_label_info(image_id, DefaultLabelTag.ORIGINAL.value) if hasattr(datastore, "get_label_info") else {}
            params = (stored or {}).get("params") or {}
            if params.get("model") == predictor.model_id and "probabilities" in params:
                scores[image_id] = float(params["probabilities"][CLASS_NAMES[POSITIVE_CLASS]])
        missing = [i for i in candidates if i not in scores]
        rng = random.Random(int(now))
        rng.shuffle(missing)
        for image_id in missing[: self.max_compute]:
            try:
                image = load_image(datastore.get_image_uri(image_id), max_pixels=self.task.max_pixels)
                roi = datastore.get_image_info(image_id).get("roi")
                pred = predictor.predict(image, roi)
            except ThyroidPluginError as e:
                logger.warning("active learning skips %s: %s", image_id, e)
                continue
            scores[image_id] = pred.probabilities[CLASS_NAMES[POSITIVE_CLASS]]
        if not scores:
            return None
        span = max(threshold, 1 - threshold)
        uncertainty = {k: 1.0 - abs(p - threshold) / span for k, p in scores.items()}
        best = max(uncertainty, key=lambda k: (uncertainty[k], k))
        return {
            "id": best,
            "uncertainty": round(uncertainty[best], 6),
            "prob_malignant": round(scores[best], 6),
            "model": predictor.model_id,
            "candidates_scored": len(scores),
            "unconfirmed": len(datastore.get_unlabeled_images()),
        }
