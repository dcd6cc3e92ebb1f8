"""Inference: an ultrasound frame (and optional nodule box) -> class probabilities and a
saliency mask on the frame's own grid.

The saliency mask is returned as probabilities in ``[0, 1]`` for every pixel of the input frame;
pixels outside the box are 0. Written to a file it is 8-bit: ``value = round(255 * p)``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Compose

from .checkpoint import load_checkpoint, model_identity, network_from_checkpoint, validation_metrics
from .compiled import CompiledNetworks, freeze_for_serving
from .constants import CLASS_NAMES, POSITIVE_CLASS
from .errors import InvalidModelError
from .io import UltrasoundImage, load_image
from .runtime import amp_dtype, autocast, default_device
from .transforms import normalize_roi, preprocess_transforms

__all__ = [
    # serving a model file
    "LoadedModel", "ModelThread", "NodulePredictor", "check_network_def", "load_model", "model_file_stat",
    # pure pre- and post-processing
    "Prediction", "PreparedFrame", "class_probabilities", "label_of", "postprocess", "preprocess", "saliency_on_frame",
    # running the network
    "batch_plan", "compile_mode", "run_network", "tune_allocator",
]

logger = logging.getLogger(__name__)

ImageInput = Union[str, os.PathLike, UltrasoundImage]

#: the answer's warning when no box was given (measured in docs/evaluation.md, "Whole frames
#: without a box": a whole clinical frame is classified far less accurately than a boxed nodule,
#: and the saliency map does not find the nodule reliably enough to crop by it)
NO_BOX_WARNING = ("no nodule box was given, so the whole image was classified: on whole ultrasound frames the model "
                  "is much less accurate than with a box around the nodule; draw a box unless the image is already "
                  "cropped to the nodule")
#: the answer's note when the server's nodule localiser drew the box (``roi_source: "localiser"``;
#: measured in docs/evaluation.md, "A nodule localiser trained with the masks")
LOCALISER_NOTE = ("no nodule box was given, so the nodule localiser drew one (roi): check that it is on the nodule "
                  "and draw your own box if it is not")
#: added to :data:`NO_BOX_WARNING` when the localiser ran and found nothing
NO_NODULE_FOUND = "the nodule localiser found no nodule in this image"


@dataclass
class Prediction:
    """The result for one frame.

    Attributes:
        label: ``"benign"`` or ``"malignant"``.
        probabilities: class name -> probability (sums to 1).
        saliency: ``(H, W)`` float32 saliency probability on the full input frame.
        roi: the box used ``[x0, y0, x1, y1]`` (clipped to the frame), or ``None``.
        roi_source: who drew ``roi``: ``"request"`` (the user), ``"localiser"`` (the server's nodule
            localiser, for a frame sent without a box) or ``None`` (no box: the whole frame).
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
    roi_source: Optional[str] = None
    localiser_ran: bool = False

    def warnings(self) -> list:
        """What the user should know about how the answer was made."""
        if self.roi_source == "localiser":
            return [LOCALISER_NOTE]
        if self.roi is None:
            return [NO_BOX_WARNING] + ([NO_NODULE_FOUND] if self.localiser_ran else [])
        return []

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
            "roi_source": self.roi_source,
            "model": self.model,
            "warnings": self.warnings(),
            "saliency": {
                "encoding": "uint8, value = round(255 * saliency probability); 0 outside the roi",
                "mask_threshold": self.mask_threshold,
                "area_fraction": round(float(binary.mean()), 6),
                "max": round(float(self.saliency.max()), 6) if self.saliency.size else 0.0,
            },
        }


@dataclass
class LoadedModel:
    """A model file loaded for serving: the network and what the file says about it.

    ``network`` is in evaluation mode with no parameter requiring grad; ``compiled`` holds its
    compiled copies (see :class:`thyroid_plugin.compiled.CompiledNetworks`)."""

    network: torch.nn.Module
    compiled: CompiledNetworks
    dtype: Optional[torch.dtype]
    image_size: int
    identity: str
    threshold: float
    network_def: dict
    transforms: Compose
    metrics: dict = field(default_factory=dict)
    created: Optional[str] = None
    train: dict = field(default_factory=dict)
    calibration: Optional[dict] = None


def load_model(
    path: Union[str, os.PathLike],
    device: torch.device,
    dtype: Optional[torch.dtype],
    channels_last: bool = True,
    compile_batch_sizes: Sequence[int] = (),
    network_def: Optional[Mapping[str, Any]] = None,
    threshold: Optional[float] = None,
) -> LoadedModel:
    """Load a model file for serving (nothing is compiled yet: see :class:`CompiledNetworks`).

    Args:
        path: a file written by :func:`thyroid_plugin.checkpoint.save_checkpoint`.
        device: where the network runs.
        dtype: autocast dtype (``None``: fp32).
        channels_last: keep the weights in NHWC layout.
        compile_batch_sizes: the batch sizes its :class:`CompiledNetworks` will compile.
        network_def: when given, the file must have been trained with exactly this network.
        threshold: an operating point that overrides the file's, for the reported metrics.

    Raises:
        ModelNotFoundError, InvalidModelError: no file, an unreadable one, or another network.
    """
    payload = load_checkpoint(path)
    check_network_def(payload["network_def"], network_def, os.path.basename(os.fspath(path)))
    network = network_from_checkpoint(payload).to(device)
    if channels_last:
        network = network.to(memory_format=torch.channels_last)
    freeze_for_serving(network)
    size = int(payload["image_size"])
    return LoadedModel(
        network=network,
        compiled=CompiledNetworks(network, device, dtype, size, tuple(compile_batch_sizes), channels_last),
        dtype=dtype, image_size=size, identity=model_identity(path),
        threshold=float(payload.get("threshold", 0.5)), network_def=dict(payload["network_def"]),
        transforms=Compose(preprocess_transforms(size)), metrics=validation_metrics(payload, threshold),
        created=payload.get("created"), train=dict(payload.get("train", {})),
        calibration=dict(payload["calibration"]) if isinstance(payload.get("calibration"), Mapping) else None,
    )


def check_network_def(got: Mapping[str, Any], expected: Optional[Mapping[str, Any]], name: str) -> None:
    """Raise :class:`InvalidModelError` unless the network a model file ``name`` was trained with
    (``got``) is ``expected`` (tuples compare as lists, as JSON stores them); ``None``: any."""
    if expected is None:
        return
    got = dict(got)
    want = {k: (list(v) if isinstance(v, tuple) else v) for k, v in expected.items()}
    if got != want:
        raise InvalidModelError(f"{name} was trained with network {got}, the served configuration is {want}")


def model_file_stat(path: str) -> Optional[tuple]:
    """``(inode, size, mtime)`` of a model file, ``None`` if there is none: a replaced file
    (training publishes by an atomic rename) has another."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class ModelThread:
    """The one thread that runs a predictor's model work, one call after the other.

    On a CPU every thread that runs PyTorch operators gets its own OpenMP team, and an idle
    team's spinning threads compete with the busy one for the cores (with
    ``OMP_WAIT_POLICY=ACTIVE`` a forward pass from a second thread took twice as long here); one
    model thread keeps one team.
    It holds no reference to the predictor (which could then never be freed)."""

    def __init__(self) -> None:
        idents: list = []
        self._idents = idents
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nodule-model",
                                            initializer=lambda: idents.append(threading.get_ident()))

    def run(self, fn: Callable, *args):
        """``fn(*args)`` on the model thread (directly when called from it); its result or error."""
        if threading.get_ident() in self._idents:
            return fn(*args)
        return self._executor.submit(fn, *args).result()

    def shutdown(self) -> None:
        """Stop after the work already submitted, without waiting for it."""
        self._executor.shutdown(wait=False)


def check_localiser_margin(value: Any) -> float:
    """The margin added to the localiser's box, as a fraction of the nodule's size: 0 to 2
    (NaN and anything else refused with a ValueError naming the setting)."""
    try:
        margin = float(value)
    except (TypeError, ValueError):
        margin = float("nan")
    if not 0.0 <= margin <= 2.0:  # NaN fails too
        raise ValueError(f"localiser_margin is a fraction of the nodule's size from 0 to 2, not {value!r}")
    return margin


class NodulePredictor:
    """Loads a model file and classifies frames; follows the file when it is replaced.

    Args:
        model_path: a model file written by :func:`thyroid_plugin.checkpoint.save_checkpoint`.
        device: default: the first GPU if any, else the CPU.
        precision: ``"fp32"``, ``"bf16"``, ``"fp16"`` or ``"auto"`` (the rule of
            :func:`thyroid_plugin.runtime.amp_dtype`).
        channels_last: run convolutions in NHWC layout (faster on CPUs and tensor cores).
        compile: ``torch.compile`` the network (inductor, frozen weights) for the batch sizes
            ``compile_batch_sizes``: ``False``/``"off"`` (eager only), ``True``/``"on"`` (compiled
            before the constructor returns: about a minute of 2 CPU cores per batch size, less
            with inductor's disk cache warm) or ``"background"`` (eager answers at once; a thread
            compiles, and each batch size switches to its compiled network when it is warmed).
            No request waits for a compilation. If compilation fails (no C++ compiler, an
            unsupported operator), the eager network keeps serving and :meth:`info` says why.
        compile_batch_sizes: batch sizes compiled, in this order; a batch of another size runs
            as chunks of the compiled sizes (largest first) and eagerly for what none covers.
        network_def: when given, the model file must have been trained with exactly this network
            configuration (the served config), else :class:`InvalidModelError`.
        threshold: malignant probability at or above which the label is malignant; ``None``
            (default) uses the operating point stored in the model file (chosen on validation
            data when it was trained; 0.5 if it has none).
        mask_threshold: saliency level reported as the binary mask's threshold.
        num_threads: intra-op CPU threads (default: torch's choice).
        localiser_path: a nodule localiser (:mod:`thyroid_plugin.localiser`) that boxes frames sent
            without a box: its tight box grown by ``localiser_margin`` (of the nodule's size, as a
            user's loose box) is classified instead of the whole frame; ``None``: whole frames.

    ``predict`` and ``predict_batch`` may be called from several threads: the model's work
    (loading, preprocessing, the forward pass, the mask) runs on one thread that the predictor
    owns (:class:`ModelThread`), one request after the other. A compilation works on a copy of the network
    in its own thread (why that is safe: :mod:`thyroid_plugin.compiled`). A new model file at
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
        compile_batch_sizes: Sequence[int] = (1,),
        network_def: Optional[Mapping[str, Any]] = None,
        threshold: Optional[float] = None,
        mask_threshold: float = 0.5,
        num_threads: Optional[int] = None,
        localiser_path: Union[None, str, os.PathLike] = None,
        localiser_margin: float = 0.25,
    ) -> None:
        self.model_path = os.fspath(model_path)
        self.localiser_path = None if localiser_path is None else os.fspath(localiser_path)
        self.localiser_margin = check_localiser_margin(localiser_margin)
        self._localiser = None
        self._localiser_id: Optional[str] = None
        self.device = torch.device(device) if device not in (None, "auto") else default_device()
        self.precision = precision
        self.channels_last = channels_last
        self.compile = compile_mode(compile)
        self.compile_batch_sizes = tuple(int(b) for b in compile_batch_sizes)
        if any(b < 1 for b in self.compile_batch_sizes):
            raise ValueError(f"compile_batch_sizes must be positive, got {compile_batch_sizes!r}")
        self.expected_network_def = dict(network_def) if network_def else None
        self.threshold_override = None if threshold is None else float(threshold)
        self.mask_threshold = float(mask_threshold)
        if num_threads:
            torch.set_num_threads(int(num_threads))
        self._lock = threading.Lock()
        self._model: Optional[LoadedModel] = None
        self._stat: Optional[tuple] = None
        tune_allocator()
        self._worker = ModelThread()
        weakref.finalize(self, self._worker.shutdown)
        self._on_worker(self._load)
        if self.localiser_path is not None:
            self._on_worker(self._load_localiser)

    def _on_worker(self, fn, *args):
        """Run ``fn(*args)`` on the predictor's model thread and return its result."""
        return self._worker.run(fn, *args)

    def close(self) -> None:
        """Stop the model thread (after the work it has) and any compilation; the predictor
        cannot be used after."""
        if self._model is not None:
            self._model.compiled.cancel()
        self._worker.shutdown()

    # ------------------------------------------------------------------------------- model file
    def _load(self) -> None:
        stat = model_file_stat(self.model_path)
        model = load_model(self.model_path, self.device, self._dtype(), channels_last=self.channels_last,
                           compile_batch_sizes=() if self.compile == "off" else self.compile_batch_sizes,
                           network_def=self.expected_network_def, threshold=self.threshold_override)
        if self.compile == "on":
            model.compiled.compile_all()
        previous, self._model = self._model, model  # one reference swap: readers see the old or the new model
        self._stat = stat
        if previous is not None:
            previous.compiled.cancel()  # a superseded model is not compiled further
        logger.info("loaded model %s (%s)", self.model_path, model.identity)
        if self.compile == "background":
            model.compiled.start()

    def _load_localiser(self) -> None:
        from .localiser import NoduleLocaliser

        try:
            self._localiser = NoduleLocaliser.load(self.localiser_path)
        except Exception as exc:  # unreadable, not a torch file (UnpicklingError), not a localiser, wrong weights
            raise InvalidModelError(f"nodule localiser {self.localiser_path}: {exc}") from exc
        self._localiser_id = model_identity(self.localiser_path)
        logger.info("loaded nodule localiser %s (%s)", self.localiser_path, self._localiser_id)

    def forward(self, x: torch.Tensor, model: Optional[LoadedModel] = None):
        """The served forward pass of a preprocessed batch ``(N, 3, S, S)``: compiled networks
        for the batch sizes that are ready, the eager one for the rest; precision as configured."""
        return self._on_worker(self._forward, x, model or self._model)

    def _forward(self, x: torch.Tensor, model: LoadedModel):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        pieces = []
        for start, stop, runner in batch_plan(x.shape[0], model.compiled):
            network = model.network if runner is None else runner
            pieces.append(run_network(network, x if (start, stop) == (0, x.shape[0]) else x[start:stop], self.device, model.dtype))
        if len(pieces) == 1:
            return pieces[0]
        return type(pieces[0])(*(None if parts[0] is None else torch.cat(parts) for parts in zip(*pieces)))

    def wait_compiled(self, timeout: float = 900.0) -> str:
        """Block until the compilation of the loaded model ends (or ``timeout`` seconds pass);
        returns the compile status (``ready``, ``off``, ``failed: ...``, ``compiling``)."""
        return self._model.compiled.wait(timeout)

    def _dtype(self) -> Optional[torch.dtype]:
        p = str(self.precision).lower()
        if p == "fp32":
            return None
        return amp_dtype(self.device, p)

    def reload_if_changed(self) -> bool:
        """Load the model file again if it was replaced since it was loaded; ``True`` if so.

        If the new file cannot be read, the current model stays and the error is raised."""
        stat = model_file_stat(self.model_path)
        if stat == self._stat:
            return False
        with self._lock:
            if model_file_stat(self.model_path) == self._stat:
                return False
            self._on_worker(self._load)
        return True

    @property
    def loaded(self) -> LoadedModel:
        """The model being served now."""
        return self._model

    @property
    def threshold(self) -> float:
        """Malignant probability at or above which the label is malignant."""
        return self.threshold_override if self.threshold_override is not None else self._model.threshold

    @property
    def model_id(self) -> str:
        return self._model.identity

    @property
    def image_size(self) -> int:
        return self._model.image_size

    def info(self) -> dict:
        """What the loaded model is: identity, validation metrics, creation time, input size,
        precision, device, how its probabilities were calibrated (``calibration``: the record of
        :func:`thyroid_plugin.calibration.calibrate_model_file`, method, scale, shift, the
        validation ECE before and after; ``None`` if never) and compilation (``compiled``:
        status; ``compiled_batch_sizes``: the batch sizes served by a compiled network now; ``compiled_ms_per_image`` and
        ``compiled_cost_vs_eager``: what an image costs in each, measured at its warm-up, which
        decides how batches are split, :func:`batch_plan`)."""
        m = self._model
        return {"model": m.identity, "metrics": m.metrics, "created": m.created, "image_size": m.image_size,
                "threshold": self.threshold, "network": m.network_def,
                "precision": str(m.dtype).replace("torch.", "") if m.dtype else "fp32",
                "device": str(self.device), "train": m.train, "calibration": m.calibration,
                "compiled": m.compiled.status, "compiled_batch_sizes": m.compiled.ready_sizes(),
                "compiled_ms_per_image": {str(b): m.compiled.ms_per_image[b] for b in m.compiled.ready_sizes()
                                          if b in m.compiled.ms_per_image},
                "compiled_cost_vs_eager": {str(b): c for b, c in sorted(m.compiled.costs().items())},
                "localiser": self.localiser_info()}

    def localiser_info(self) -> Optional[dict]:
        """The nodule localiser that boxes frames sent without a box (``None``: there is none):
        identity, input size, the margin added to its box, its validation box IoU and epochs."""
        if self._localiser is None:
            return None
        r = self._localiser.record
        return {"model": self._localiser_id, "image_size": self._localiser.image_size, "margin": self.localiser_margin,
                "val_box_iou": r.get("val_box_iou"), "best_epoch": r.get("best_epoch"),
                "train_frames": r.get("train_frames"), "val_frames": r.get("val_frames")}

    # ------------------------------------------------------------------------------- inference
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
        model = self._model
        rois = list(rois) if rois is not None else [None] * len(images)
        if len(rois) != len(images):
            raise ValueError(f"{len(rois)} rois for {len(images)} images")
        t0 = time.perf_counter()
        sources: list = ["request" if r is not None else None for r in rois]
        localised = self._localiser is not None and any(r is None for r in rois)
        if localised:
            images = [im if isinstance(im, UltrasoundImage) else load_image(im) for im in images]
            rois, sources = self._localise(images, rois, sources)
        t_loc = time.perf_counter()
        frames = [preprocess(im, r, model.transforms) for im, r in zip(images, rois)]
        x = torch.stack([f.input for f in frames]).to(self.device)
        t1 = time.perf_counter()
        out = self._forward(x, model)
        t2 = time.perf_counter()
        threshold = self.threshold_override if self.threshold_override is not None else model.threshold
        results = postprocess(frames, out.logits, out.saliency_logits, model=model.identity, threshold=threshold,
                              mask_threshold=self.mask_threshold)
        t3 = time.perf_counter()
        per = len(images)
        for r, source in zip(results, sources):
            r.roi_source = source if r.roi is not None else None
            r.localiser_ran = localised
            r.timings = {"preprocess": (t1 - t_loc) / per, "network": (t2 - t1) / per, "postprocess": (t3 - t2) / per}
            if localised:  # only where the localiser ran for this batch
                r.timings["localise"] = (t_loc - t0) / per
        return results

    def _localise(self, images: Sequence[UltrasoundImage], rois: list, sources: list) -> tuple[list, list]:
        """The localiser's boxes (grown by ``localiser_margin``) for the frames without a roi."""
        from .lesion import margin_box

        todo = [i for i, r in enumerate(rois) if r is None]
        rois, sources = list(rois), list(sources)
        for i, box in zip(todo, self._localiser.boxes([images[i].array for i in todo])):
            if box is not None:
                rois[i] = list(margin_box(box, self.localiser_margin, images[i].shape))
                sources[i] = "localiser"
        return rois, sources


# ------------------------------------------------------------------------ pre- and post-processing
@dataclass(frozen=True)
class PreparedFrame:
    """One frame made ready for the network (:func:`preprocess`).

    Attributes:
        image: the frame as read, with its geometry.
        input: ``(3, S, S)`` float32 network input (the ``box`` crop, resized and scaled).
        box: ``[x0, y0, x1, y1]`` pixels of the frame the network sees (the whole frame without a roi).
        roi: the box as reported in the result: ``None`` when no roi was given and the whole frame
            is used, else ``box``.
    """

    image: UltrasoundImage
    input: torch.Tensor = field(repr=False)
    box: list
    roi: Optional[list]


def preprocess(image: ImageInput, roi: Optional[Sequence[float]], transforms: Compose) -> PreparedFrame:
    """A frame (a file or an :class:`UltrasoundImage`) and an optional nodule box ``[x0, y0, x1,
    y1]`` (see :func:`thyroid_plugin.transforms.normalize_roi`) -> the network input made by
    ``transforms`` (:func:`thyroid_plugin.transforms.preprocess_transforms`).

    Raises:
        InvalidImageError: the file cannot be read; InvalidROIError: the box is not in the frame.
    """
    img = image if isinstance(image, UltrasoundImage) else load_image(image)
    box = normalize_roi(roi, img.shape)  # checked here: MONAI would wrap the error
    d = transforms({"image": img, "roi": box})
    box = [int(v) for v in d["image_meta_dict"]["roi"]]
    x = d["image"]
    x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)  # a plain tensor, not MONAI's MetaTensor
    full = box == [0, 0, img.shape[1], img.shape[0]]
    return PreparedFrame(img, x.float(), box, None if full and roi is None else box)


def class_probabilities(logits: torch.Tensor) -> np.ndarray:
    """``(N, C)`` logits -> ``(N, C)`` float32 softmax probabilities (computed in fp32)."""
    with torch.inference_mode():
        return torch.softmax(logits.float(), dim=1).cpu().numpy()


def label_of(probabilities: Mapping[str, float], threshold: float) -> str:
    """The class name: malignant when its probability is at or above ``threshold``, else benign."""
    positive = CLASS_NAMES[POSITIVE_CLASS]
    return positive if probabilities[positive] >= threshold else CLASS_NAMES[1 - POSITIVE_CLASS]


def postprocess(frames: Sequence[PreparedFrame], logits: torch.Tensor, saliency_logits: Optional[torch.Tensor], *,
                model: str, threshold: float, mask_threshold: float) -> list[Prediction]:
    """The network's output for a batch of ``frames`` -> one :class:`Prediction` each.

    Args:
        frames: what :func:`preprocess` made of each frame, in batch order.
        logits: ``(N, C)`` class logits.
        saliency_logits: ``(N, 1, S, S)`` saliency logits, or ``None`` (a network without saliency).
        model: the model's identity, reported with each result.
        threshold: malignant probability at or above which the label is malignant.
        mask_threshold: saliency probability reported as the binary mask's threshold.
    """
    probs = class_probabilities(logits)
    with torch.inference_mode():
        sal = torch.sigmoid(saliency_logits.float()) if saliency_logits is not None else None
    results = []
    for n, frame in enumerate(frames):
        p = {name: float(probs[n, i]) for i, name in enumerate(CLASS_NAMES)}
        results.append(Prediction(label_of(p, threshold), p, saliency_on_frame(sal, n, frame.image.shape, frame.box),
                                  frame.roi, model, threshold, mask_threshold))
    return results


def run_network(network: Callable, x: torch.Tensor, device: torch.device, dtype: Optional[torch.dtype]):
    """``network(x)`` without autograd, under autocast to ``dtype`` on ``device`` (``None``: fp32)."""
    with torch.inference_mode(), autocast(device, dtype):
        return network(x)


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


def saliency_on_frame(saliency: Optional[torch.Tensor], index: int, shape: tuple, box: Sequence[int]) -> np.ndarray:
    """Item ``index`` of a batch of saliency probabilities ``(N, 1, S, S)``, resized into the
    ``box`` of a ``shape = (H, W)`` frame: ``(H, W)`` float32, 0 outside the box (and everywhere
    for a network without saliency, ``saliency=None``)."""
    out = np.zeros(shape, dtype=np.float32)
    if saliency is not None:
        x0, y0, x1, y1 = box
        crop = F.interpolate(saliency[index : index + 1], size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)
        out[y0:y1, x0:x1] = crop[0, 0].cpu().numpy()
    return out


def batch_plan(n: int, compiled: CompiledNetworks) -> list[tuple[int, int, Optional[Callable]]]:
    """How a batch of ``n`` runs: ``(start, stop, compiled network or None for eager)`` chunks.

    Chunks of the ready compiled sizes, the size whose image costs least first (its measured
    cost, :meth:`CompiledNetworks.costs`; the larger size on a tie and where no cost was
    measured), so an image in a batch never costs more than in the cheapest compiled size: on a
    CPU where batching does not pay (the activations of a batch of 8 outgrow the caches), a
    batch runs as compiled batch-1 calls; where it pays (bf16 on AMX), in batches of 8. What no
    ready size covers runs eagerly in one chunk (all of it while nothing is compiled yet)."""
    ready = compiled.ready_sizes()
    costs = compiled.costs()
    plan, start = [], 0
    for size in sorted(ready, key=lambda s: (costs.get(s, 0.0), -s)):
        while n - start >= size:
            plan.append((start, start + size, compiled.runner(size)))
            start += size
    if start < n:
        plan.append((start, n, None))
    return plan
