"""Task config of ``classify_nodule``: where the models are and how the tasks are built.

``--conf`` values (all optional):

- ``model_dir``: folder of the model files (default ``<app>/model``); training publishes
  ``classify_nodule.pt`` there;
- ``pretrained``: the model served until a trained one exists (default
  ``<model_dir>/pretrained_classify_nodule.pt``, the shipped model);
- ``device``: ``auto`` (GPU if present), ``cpu``, ``cuda``, ``cuda:N``;
- ``precision``, ``compile``, ``threshold``: inference settings (default ``configs/inference.json``;
  ``compile`` is ``off``, ``on`` or ``background``; ``threshold`` defaults to the operating point
  stored in the model file);
- ``max_pixels``: largest frame accepted (width x height x frames);
- ``localiser``: the nodule localiser that boxes frames sent without a box (default
  ``<model_dir>/pretrained_nodule_localiser.pt`` where that file exists, the shipped one);
  ``none``: classify such frames whole; ``localiser_margin``: the margin added to its box
  (default ``configs/inference.json``, 0.25 of the nodule's size).
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Dict, Optional

from monailabel.interfaces.config import TaskConfig

from thyroid_plugin.checkpoint import load_checkpoint, model_identity, network_from_checkpoint, validation_metrics
from thyroid_plugin.config import load_config
from thyroid_plugin.errors import InvalidModelError
from thyroid_plugin.inference import check_localiser_margin, compile_mode
from thyroid_plugin.io import atomic_copy_file, json_safe

from ..activelearning import MostUncertain
from ..infers import ClassifyNodule
from ..trainers import ClassifyNoduleTrainer


def batch_sizes(value: Any) -> tuple:
    """Batch sizes from ``--conf compile_batch_sizes 1,8,32`` (or a list in the config)."""
    items = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    try:
        sizes = tuple(int(v) for v in items)
    except (TypeError, ValueError):
        sizes = ()
    if not sizes or any(s < 1 for s in sizes):
        raise ValueError(f"compile_batch_sizes must be positive whole numbers such as 1,8,32, not {value!r}")
    return sizes


def localiser_file(value: Optional[str], model_dir: str) -> Optional[str]:
    """The nodule localiser's file from ``--conf localiser`` (a path, or ``none``); by default the
    shipped ``pretrained_nodule_localiser.pt`` of ``model_dir`` where it exists.

    Raises:
        ValueError: a named file that does not exist."""
    if value is None:
        shipped = os.path.join(model_dir, "pretrained_nodule_localiser.pt")
        return shipped if os.path.isfile(shipped) else None
    if str(value).strip().lower() in ("", "none", "off", "false"):
        return None
    if not os.path.isfile(value):
        raise ValueError(f"--conf localiser {value}: no such file (give a localiser file or none)")
    return str(value)


class ClassifyNoduleConfig(TaskConfig):
    def init(self, name: str, model_dir: str, conf: Dict[str, str], planner: Any, **kwargs) -> None:
        super().init(name, model_dir, conf, planner, **kwargs)
        self.model_dir = conf.get("model_dir", model_dir)
        self.trained_path = os.path.join(self.model_dir, f"{name}.pt")
        self.pretrained_path = conf.get("pretrained", os.path.join(self.model_dir, f"pretrained_{name}.pt"))
        self.path = [self.pretrained_path, self.trained_path]
        cfg = load_config("inference")
        inference = dict(cfg["inference"])
        for key, cast in (("precision", str), ("compile", compile_mode), ("compile_batch_sizes", batch_sizes),
                          ("threshold", float), ("max_pixels", int), ("batch_size", int)):
            if key in conf:
                inference[key] = cast(conf[key])
        self.inference = inference
        self.network_def = cfg.get_parsed_content("network_def").network_def()
        self.device = conf.get("device", "auto")
        # refused at start, not at the first request
        inference["localiser_margin"] = check_localiser_margin(conf.get("localiser_margin", inference["localiser_margin"]))
        self.localiser_path = localiser_file(conf.get("localiser"), self.model_dir)
        self._infer: Optional[ClassifyNodule] = None

    def infer(self) -> ClassifyNodule:
        if self._infer is None:
            i = self.inference
            self._infer = ClassifyNodule(
                path=self.path,
                predictor_args={
                    "precision": i["precision"],
                    "channels_last": bool(i["channels_last"]),
                    "compile": i["compile"],
                    "compile_batch_sizes": batch_sizes(i["compile_batch_sizes"]),
                    "threshold": None if i["threshold"] is None else float(i["threshold"]),
                    "mask_threshold": float(i["mask_threshold"]),
                    "network_def": self.network_def,
                    "localiser_path": self.localiser_path,
                    "localiser_margin": float(i["localiser_margin"]),
                },
                device=self.device,
                max_pixels=int(i["max_pixels"]),
            )
        return self._infer

    def trainer(self) -> ClassifyNoduleTrainer:
        os.makedirs(self.model_dir, exist_ok=True)
        return ClassifyNoduleTrainer(self.model_dir, publish_path=self.trained_path, served_path=self.infer().get_path,
                                     threshold=self.inference["threshold"])

    def install_model(self, src: str) -> Dict[str, Any]:
        """Publish a model file as the served (trained) model: it must be a thyroid_plugin model
        of the served network whose weights load; it is copied atomically, so inference sees the
        old model or the new one, never a half-written file.

        Raises:
            InvalidModelError: not such a model.
        """
        payload = load_checkpoint(src)
        network_from_checkpoint(payload)  # the weights fit the network they claim
        want = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.network_def.items()}
        if dict(payload["network_def"]) != want:
            raise InvalidModelError(f"it holds network {payload['network_def']}, the server serves {want}")
        os.makedirs(self.model_dir, exist_ok=True)
        atomic_copy_file(src, self.trained_path)
        return {"model": model_identity(self.trained_path), "path": os.path.basename(self.trained_path),
                "metrics": json_safe(validation_metrics(payload, self.inference["threshold"])), "created": payload.get("created")}

    def remove_model(self) -> Dict[str, Any]:
        """Set the trained model aside (``<name>.pt.<time>.deleted``, as MONAI Label does); the
        shipped pretrained model is served again."""
        stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
        aside = f"{self.trained_path}.{stamp}.deleted"
        os.replace(self.trained_path, aside)
        served = self.infer().get_path()
        return {"removed": os.path.basename(aside), "model": model_identity(served) if served else None}

    def strategy(self) -> Dict[str, MostUncertain]:
        return {"uncertain": MostUncertain(self.infer())}
