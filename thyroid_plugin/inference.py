"""Inference: an ultrasound frame (and optional nodule box) -> class probabilities and a
saliency mask on the frame's own grid.

The saliency mask is returned as probabilities in ``[0, 1]`` for every pixel of the input frame;
pixels outside the box are 0. Written to a file it is 8-bit: ``value = round(255 * p)``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Compose

from .checkpoint import load_checkpoint, model_identity, network_from_checkpoint, validation_metrics
from .constants import CLASS_NAMES, POSITIVE_CLASS
from .engine import amp_dtype, default_device
from .errors import InvalidModelError
from .io import UltrasoundImage, atomic_write_bytes, load_image, mask_suffix, write_mask
from .transforms import normalize_roi, preprocess_transforms

__all__ = ["NodulePredictor", "Prediction"]

logger = logging.getLogger(__name__)

ImageInput = Union[str, os.PathLike, UltrasoundImage]


@dataclass
class Prediction:
    """The result for one frame.

    Attributes:
        label: ``"benign"`` or ``"malignant"``.
        probabilities: class name -> probability (sums to 1).
        saliency: ``(H, W)`` float32 saliency probability on the full input frame.
        roi: the box used ``[x0, y0, x1, y1]`` (clipped to the frame), or ``None``.
        model: identity of the model that produced it (``sha256:...``).
        threshold: malignant probability at or above which the label is malignant.
        mask_threshold: saliency probability at or above which a pixel is in the binary mask.
        timings: seconds spent in ``preprocess``, ``network`` and ``postprocess``.
    """

    label: str
    probabilities: dict
    saliency: np.ndarray = field(repr=False)
    roi: Optional[list]
    model: str
    threshold: float = 0.5
    mask_threshold: float = 0.5
    timings: dict = field(default_factory=dict)

    def saliency_uint8(self) -> np.ndarray:
        """The mask as written to files: ``round(255 * p)``, uint8."""
        return np.clip(np.rint(self.saliency * 255.0), 0, 255).astype(np.uint8)

    def to_json(self) -> dict:
        """The result fields (documented in the README's REST contract)."""
        binary = self.saliency >= self.mask_threshold
        return {
            "label": self.label,
            "probabilities": {k: round(float(v), 6) for k, v in self.probabilities.items()},
            "threshold": self.threshold,
            "roi": self.roi,
            "model": self.model,
            "saliency": {
                "encoding": "uint8, value = round(255 * saliency probability); 0 outside the roi",
                "mask_threshold": self.mask_threshold,
                "area_fraction": round(float(binary.mean()), 6),
                "max": round(float(self.saliency.max()), 6) if self.saliency.size else 0.0,
            },
        }


class NodulePredictor:
    """Loads a model file and classifies frames; follows the file when it is replaced.

    Args:
        model_path: a model file written by :func:`thyroid_plugin.checkpoint.save_checkpoint`.
        device: default: the first GPU if any, else the CPU.
        precision: ``"fp32"``, ``"bf16"``, ``"fp16"`` or ``"auto"`` (the training rule of
            :func:`thyroid_plugin.engine.amp_dtype`).
        channels_last: run convolutions in NHWC layout (faster on CPUs and tensor cores).
        compile: ``torch.compile`` the network for single-frame requests (batch 1 at the model's
            input size) with inductor freezing (weights folded as constants, prepacked for the
            CPU's kernels): ``False``/``"off"`` (eager only), ``True``/``"on"`` (compiled before the
            constructor returns: about a minute on 2 CPU cores, less with inductor's disk cache
            warm) or ``"background"`` (eager answers at once; a thread compiles and warms the
            network, then batch-1 requests switch to it). Other batch shapes always run eagerly, so
            a request never waits for a compilation. If compilation fails (no C++ compiler, an
            unsupported operator), the eager network keeps serving and :meth:`info` says why.
        network_def: when given, the model file must have been trained with exactly this network
            configuration (the served config), else :class:`InvalidModelError`.
        threshold: malignant probability at or above which the label is malignant; ``None``
            (default) uses the operating point stored in the model file (chosen on validation
            data when it was trained; 0.5 if it has none).
        mask_threshold: saliency level reported as the binary mask's threshold.
        num_threads: intra-op CPU threads (default: torch's choice).

    ``predict`` and ``predict_batch`` may be called from several threads: the model's work
    (loading, preprocessing, the forward pass, the mask) runs on one thread that the predictor
    owns, one request after the other. On a CPU every thread that runs PyTorch operators gets
    its own OpenMP team, and an idle team's spinning threads compete with the busy one for the
    cores (with ``OMP_WAIT_POLICY=ACTIVE`` a forward pass from a second thread took twice as
    long here); one model thread keeps one team. A new model file at
    ``model_path`` (written atomically by training) is picked up by :meth:`reload_if_changed`,
    which loads it completely before swapping, so a request never sees a half-loaded model.
    """

    def __init__(
        self,
        model_path: Union[str, os.PathLike],
        device: Union[None, str, torch.device] = None,
        precision: str = "fp32",
        channels_last: bool = True,
        compile: Union[bool, str] = False,
        network_def: Optional[Mapping[str, Any]] = None,
        threshold: Optional[float] = None,
        mask_threshold: float = 0.5,
        num_threads: Optional[int] = None,
    ) -> None:
        self.model_path = os.fspath(model_path)
        self.device = torch.device(device) if device not in (None, "auto") else default_device()
        self.precision = precision
        self.channels_last = channels_last
        self.compile = compile_mode(compile)
        self.expected_network_def = dict(network_def) if network_def else None
        self.threshold_override = None if threshold is None else float(threshold)
        self.mask_threshold = float(mask_threshold)
        if num_threads:
            torch.set_num_threads(int(num_threads))
        self._lock = threading.Lock()
        self._state: Optional[dict] = None
        self._stat: Optional[tuple] = None
        tune_allocator()
        # the worker must not hold a reference to the predictor (or it would never be freed)
        worker_ident: list = []
        self._worker_ident = worker_ident
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nodule-model",
                                          initializer=lambda: worker_ident.append(threading.get_ident()))
        weakref.finalize(self, self._worker.shutdown, wait=False)
        self._on_worker(self._load)

    def _on_worker(self, fn, *args):
        """Run ``fn(*args)`` on the predictor's model thread and return its result."""
        if threading.get_ident() in self._worker_ident:
            return fn(*args)
        return self._worker.submit(fn, *args).result()

    def close(self) -> None:
        """Stop the model thread (after the work it has); the predictor cannot be used after."""
        self._worker.shutdown(wait=False)

    # ------------------------------------------------------------------------------- model file
    def _file_stat(self) -> Optional[tuple]:
        try:
            st = os.stat(self.model_path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _load(self) -> None:
        stat = self._file_stat()
        payload = load_checkpoint(self.model_path)
        if self.expected_network_def is not None:
            got = {k: v for k, v in payload["network_def"].items()}
            want = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.expected_network_def.items()}
            if got != want:
                raise InvalidModelError(
                    f"{os.path.basename(self.model_path)} was trained with network {got}, the served configuration is {want}"
                )
        network = network_from_checkpoint(payload).to(self.device)
        if self.channels_last:
            network = network.to(memory_format=torch.channels_last)
        dtype = self._dtype()
        network.eval()
        state = {
            "network": network,
            "compiled": {},  # input shape -> compiled network, filled once warmed up
            "compile_status": "off" if self.compile == "off" else "compiling",
            "dtype": dtype,
            "image_size": int(payload["image_size"]),
            "model": model_identity(self.model_path),
            "metrics": validation_metrics(payload, self.threshold_override),  # at the served threshold
            "created": payload.get("created"),
            "train": dict(payload.get("train", {})),
            "network_def": dict(payload["network_def"]),
            "threshold": float(payload.get("threshold", 0.5)),
            "transforms": Compose(preprocess_transforms(int(payload["image_size"]))),
        }
        if self.compile == "on":
            self._compile(state)
        self._state = state  # one reference swap: readers see the old or the new model
        self._stat = stat
        logger.info("loaded model %s (%s)", self.model_path, state["model"])
        if self.compile == "background":
            threading.Thread(target=self._compile, args=(state,), name="compile-model", daemon=True).start()

    def _compile(self, state: dict) -> None:
        """Compile ``state``'s network for batch-1 inputs and warm it up; on success batch-1
        forwards use it. Runs once per loaded model (in a thread for ``"background"``)."""
        size = state["image_size"]
        shape = (1, 3, size, size)
        t0 = time.perf_counter()
        try:
            import torch._inductor.config as inductor_config

            compiled = torch.compile(state["network"], dynamic=False)
            # the input is built as requests build theirs (a normal tensor, made outside
            # inference mode, same layout), so the compiled guards match real requests
            x = torch.zeros(shape, device=self.device)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            # freezing (weights as constants: batch norms folded into the convolutions, weights
            # prepacked for oneDNN, conv+activation fused; measured 14% faster) is set while the
            # first call traces: dynamo reads the process-wide setting to treat the parameters as
            # constants (guarded by identity, so a reloaded model gets its own compilation), and
            # ``torch.compile(options={"freezing": True})`` alone is silently ignored (torch 2.14).
            # Only no-grad compilations freeze; training compiles (off by default) with gradients.
            with inductor_config.patch(freezing=True):
                self._run(compiled, state["dtype"], x)
            self._run(compiled, state["dtype"], x.clone())  # a second input: no recompilation
        except Exception as e:  # the eager network keeps serving
            state["compile_status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            logger.warning("torch.compile of %s failed, serving eagerly: %s", self.model_path, e)
            return
        state["compiled"] = {shape: compiled}
        state["compile_status"] = "ready"
        state["compile_seconds"] = round(time.perf_counter() - t0, 1)
        logger.info("compiled model %s for %s in %.1f s", state["model"], shape, state["compile_seconds"])

    def _run(self, runner, dtype: Optional[torch.dtype], x: torch.Tensor):
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            return runner(x)

    def forward(self, x: torch.Tensor, state: Optional[dict] = None):
        """The served forward pass of a preprocessed batch ``(N, 3, S, S)``: the compiled network
        for the shapes it was compiled for, the eager one otherwise; precision as configured."""
        return self._on_worker(self._forward, x, state or self._state)

    def _forward(self, x: torch.Tensor, state: dict):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        runner = state["compiled"].get(tuple(x.shape), state["network"])
        return self._run(runner, state["dtype"], x)

    def wait_compiled(self, timeout: float = 600.0) -> str:
        """Block until the background compilation of the loaded model ends (or ``timeout``
        seconds pass); returns the compile status (``ready``, ``off``, ``failed: ...``, ``compiling``)."""
        end = time.monotonic() + timeout
        while self._state["compile_status"] == "compiling" and time.monotonic() < end:
            time.sleep(0.1)
        return self._state["compile_status"]

    def _dtype(self) -> Optional[torch.dtype]:
        p = str(self.precision).lower()
        if p == "fp32":
            return None
        return amp_dtype(self.device, p)

    def reload_if_changed(self) -> bool:
        """Load the model file again if it was replaced since it was loaded; ``True`` if so.

        If the new file cannot be read, the current model stays and the error is raised."""
        stat = self._file_stat()
        if stat == self._stat:
            return False
        with self._lock:
            if self._file_stat() == self._stat:
                return False
            self._on_worker(self._load)
        return True

    @property
    def threshold(self) -> float:
        """Malignant probability at or above which the label is malignant."""
        return self.threshold_override if self.threshold_override is not None else self._state["threshold"]

    @property
    def model_id(self) -> str:
        return self._state["model"]

    @property
    def image_size(self) -> int:
        return self._state["image_size"]

    def info(self) -> dict:
        """What the loaded model is: identity, validation metrics, creation time, input size."""
        s = self._state
        return {"model": s["model"], "metrics": s["metrics"], "created": s["created"], "image_size": s["image_size"],
                "threshold": self.threshold,
                "network": s["network_def"], "precision": str(s["dtype"]).replace("torch.", "") if s["dtype"] else "fp32",
                "device": str(self.device), "train": s["train"],
                "compiled": s["compile_status"]}

    # ------------------------------------------------------------------------------- inference
    def _prepare(self, state: dict, image: ImageInput, roi) -> tuple[UltrasoundImage, torch.Tensor, list]:
        img = image if isinstance(image, UltrasoundImage) else load_image(image)
        box = normalize_roi(roi, img.shape)  # checked here: MONAI would wrap the error
        d = state["transforms"]({"image": img, "roi": box})
        box = [int(v) for v in d["image_meta_dict"]["roi"]]
        x = d["image"]
        x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)  # a plain tensor, not MONAI's MetaTensor
        return img, x.float(), box

    def predict(self, image: ImageInput, roi: Optional[Sequence[float]] = None) -> Prediction:
        """Classify one frame. ``roi`` is ``[x0, y0, x1, y1]`` in pixels (see
        :func:`thyroid_plugin.transforms.normalize_roi`)."""
        return self.predict_batch([image], [roi])[0]

    def predict_batch(
        self, images: Sequence[ImageInput], rois: Optional[Sequence[Optional[Sequence[float]]]] = None
    ) -> list[Prediction]:
        """Classify several frames in one forward pass (frames may differ in size)."""
        return self._on_worker(self._predict_batch, images, rois)

    def _predict_batch(self, images: Sequence[ImageInput], rois) -> list[Prediction]:
        state = self._state
        rois = list(rois) if rois is not None else [None] * len(images)
        if len(rois) != len(images):
            raise ValueError(f"{len(rois)} rois for {len(images)} images")
        t0 = time.perf_counter()
        prepared = [self._prepare(state, im, r) for im, r in zip(images, rois)]
        x = torch.stack([p[1] for p in prepared]).to(self.device)
        t1 = time.perf_counter()
        out = self._forward(x, state)
        with torch.inference_mode():
            probs = torch.softmax(out.logits.float(), dim=1).cpu().numpy()
            sal = torch.sigmoid(out.saliency_logits.float()) if out.saliency_logits is not None else None
        t2 = time.perf_counter()
        results = []
        for n, (img, _, box) in enumerate(prepared):
            saliency = np.zeros(img.shape, dtype=np.float32)
            if sal is not None:
                x0, y0, x1, y1 = box
                crop = F.interpolate(sal[n : n + 1], size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)
                saliency[y0:y1, x0:x1] = crop[0, 0].cpu().numpy()
            p = {name: float(probs[n, i]) for i, name in enumerate(CLASS_NAMES)}
            threshold = self.threshold_override if self.threshold_override is not None else state["threshold"]
            label = CLASS_NAMES[POSITIVE_CLASS] if p[CLASS_NAMES[POSITIVE_CLASS]] >= threshold else CLASS_NAMES[1 - POSITIVE_CLASS]
            full = box == [0, 0, img.shape[1], img.shape[0]]
            results.append(Prediction(label, p, saliency, None if full and rois[n] is None else box, state["model"],
                                      threshold, self.mask_threshold))
        t3 = time.perf_counter()
        per = len(images)
        for r in results:
            r.timings = {"preprocess": (t1 - t0) / per, "network": (t2 - t1) / per, "postprocess": (t3 - t2) / per}
        return results

    def predict_files(self, files: Sequence[Union[str, os.PathLike]], output_dir: Union[str, os.PathLike],
                      rois: Optional[Sequence] = None) -> list[dict]:
        """Classify files and write, per input ``X.ext``, ``X.json`` (the result fields plus
        ``image`` and ``mask``) and the saliency mask ``X_saliency<suffix>`` in the input's
        format and geometry. Returns the JSON dicts."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        rois = list(rois) if rois is not None else [None] * len(files)
        results = []
        for f, roi in zip(files, rois):
            image = load_image(f)
            pred = self.predict(image, roi)
            stem = _stem(Path(f).name)
            mask_path = out / f"{stem}_saliency{mask_suffix(image)}"
            write_mask(image, pred.saliency_uint8(), mask_path)
            record = {"image": os.fspath(f), **pred.to_json(), "mask": str(mask_path)}
            atomic_write_bytes(out / f"{stem}.json", json.dumps(record, indent=2).encode())
            results.append(record)
        return results


_ALLOCATOR_TUNED = False


def tune_allocator() -> bool:
    """Keep glibc's malloc from giving freed activation memory back to the OS after every forward
    pass (and faulting it in again, zero-filled, on the next): allocations up to 64 MiB stay on
    the heap and up to 256 MiB of free heap is kept. Measured on this machine: about 10,400 page
    faults per served frame without it, none with it, and a batch-1 ``predict`` 59-63 ms instead of
    83-90 ms. Process-wide; once; a no-op where the C library is not glibc. Returns whether it is set."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        _ALLOCATOR_TUNED = bool(libc.mallopt(m_mmap_threshold, 64 << 20)) and bool(libc.mallopt(m_trim_threshold, 256 << 20))
    except (OSError, AttributeError):
        _ALLOCATOR_TUNED = False
    return _ALLOCATOR_TUNED


def compile_mode(value: Union[bool, str, None]) -> str:
    """``"off"``, ``"on"`` or ``"background"`` from a bool or one of those words (or true/false)."""
    if isinstance(value, bool) or value is None:
        return "on" if value else "off"
    v = str(value).strip().lower()
    if v in ("off", "false", "0", "no", ""):
        return "off"
    if v in ("on", "true", "1", "yes"):
        return "on"
    if v == "background":
        return "background"
    raise ValueError(f"compile must be off, on or background, not {value!r}")


def _stem(name: str) -> str:
    for suffix in (".nii.gz", ".nii", ".nrrd", ".dcm", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem
