"""What the Thyroid Nodule module does, in plain Python over MRML nodes and the REST client.

Each user action is split so that network work never touches the scene and scene work never
waits on the network:

========================  ==============================  ===========================  ==============================
action                    prepare (main thread, scene)     request (any thread, REST)   apply (main thread, scene)
========================  ==============================  ===========================  ==============================
Classify nodule           :meth:`prepare_frame`           :meth:`request_classification` :meth:`apply_classification`
Confirm benign/malignant  :meth:`prepare_confirmation`    :meth:`send_confirmation`      :meth:`apply_confirmation`
Next case                 -                               :meth:`request_next_case`      :meth:`load_next_case`
Train / progress / stop   -                               :meth:`start_training`, ...    -
Classify all              -                               :meth:`start_batch`, ...       :meth:`add_batch_rows`
========================  ==============================  ===========================  ==============================

The 3D Slicer widget runs the middle column in a worker thread; :meth:`classify`,
:meth:`confirm`, :meth:`next_case` and :meth:`classify_all` chain the three steps for headless
use (tests, the slicer-core example, Slicer's Python console).

Geometry: the frame is sent as an NRRD file that Slicer's storage node writes from the volume's
voxels and IJKToRAS (LPS in the file), so the server sees exactly Slicer's grid; the mask that comes back must be
on that grid (its NRRD header and the result's ``image`` fields are both checked) and is put into
nodes that copy the volume's IJKToRAS.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from . import display, results
from .client import InferResponse, MonaiLabelClient, Timeouts
from .errors import BadResponseError, GeometryMismatchError, InputError, ServerError, ThyroidNoduleError
from .geometry import FrameLayout, check_result_geometry, grid_of, lps_from_ras, pixel_box_from_corners
from .nrrd import NrrdError, read_nrrd
from .volumes import load_frame_file, node_to_world, volume_array, volume_ijk_to_ras, vtk_matrix, write_nrrd

__all__ = [
    "ATTR_IMAGE_ID",
    "ATTR_SERVER",
    "CLASS_NAMES",
    "TASK_NAME",
    "BatchProgress",
    "Classification",
    "ConnectionReport",
    "NextCase",
    "NoduleLogic",
    "PreparedConfirmation",
    "PreparedFrame",
    "TrainingProgress",
    "batch_progress_from",
    "training_progress_from",
]

TASK_NAME = "classify_nodule"
CLASS_NAMES = ("benign", "malignant")
#: volume attribute: the id of this frame in the server's datastore
ATTR_IMAGE_ID = "ThyroidNodule.ServerImageId"
#: volume attribute: the server (base URL) that id belongs to
ATTR_SERVER = "ThyroidNodule.ServerUrl"
#: volume attribute 3D Slicer's DICOM module sets: the SOP Instance UIDs the volume was loaded from
ATTR_DICOM_UIDS = "DICOM.instanceUIDs"
_ID_CHARS = re.compile(r"[^A-Za-z0-9._()+\- ]")
#: key of the JSON line a background batch prints after each chunk of images
BATCH_PROGRESS_KEY = "batch_progress"

#: loads an image file into the scene: ``loader(scene, path, name) -> volume node``
VolumeLoader = Callable[[Any, str, str], Any]


@dataclass
class PreparedFrame:
    """A frame ready to be sent (built on the main thread by :meth:`NoduleLogic.prepare_frame`).

    Attributes:
        volume_id: MRML ID of the input volume.
        volume_name: its name.
        layout: which volume axes are the frame's columns/rows.
        file_name: upload file name (``.nrrd``).
        data: the NRRD file's bytes.
        grid: the grid the server must report: ``size`` ``[W, H]``, LPS ``spacing``, ``origin``,
            ``direction``.
        roi: ``[x0, y0, x1, y1]`` pixel box or ``None``.
        server_image_id: the frame's datastore id on this server, if it has one.
        archive_id: the SOP Instance UID of a frame loaded from the PACS by Slicer's DICOM
            module: "Classify nodule" names it instead of sending the pixels.
    """

    volume_id: str
    volume_name: str
    layout: FrameLayout
    file_name: str
    data: bytes
    grid: Dict[str, Any]
    roi: Optional[List[int]] = None
    server_image_id: Optional[str] = None
    archive_id: Optional[str] = None


@dataclass
class Classification:
    """The answer to "Classify nodule", as shown to the user.

    Attributes:
        volume_name: the classified volume.
        label: ``"benign"`` or ``"malignant"``.
        probability: probability of ``label`` (0..1).
        prob_malignant: malignant probability (0..1).
        threshold: malignant probability at or above which the label is malignant.
        model: identity of the model that answered (``sha256:...``).
        roi: the box used after clipping, or ``None``.
        time: ISO 8601 local time of the answer.
        result: the whole result JSON.
        heat_volume: the saliency heat volume node (``None`` when no mask came back).
        mask_segmentation: the editable mask segmentation (``None`` when no mask came back).
        warning: a message about the mask when it could not be shown ("" otherwise).
        advice: the server's ``warnings`` about the answer, e.g. that no nodule box was given and
            the whole image was classified ("" when none).
        server_box: the markups ROI over the box the server's nodule localiser drew for a frame
            sent without a box (``None`` otherwise): to check, move, and classify again with it.
    """

    volume_name: str
    label: str
    probability: float
    prob_malignant: float
    threshold: float
    model: str
    roi: Optional[List[int]]
    time: str
    result: Dict[str, Any]
    heat_volume: Any = None
    mask_segmentation: Any = None
    warning: str = ""
    advice: str = ""
    server_box: Any = None

    def summary(self) -> str:
        """E.g. ``"Malignant (probability 0.73)"``."""
        return f"{self.label.capitalize()} (probability {self.probability:.2f})"


@dataclass
class PreparedConfirmation:
    """A diagnosis ready to be sent (see :meth:`NoduleLogic.prepare_confirmation`).

    Attributes:
        volume_id: MRML ID of the volume.
        diagnosis: ``"benign"`` or ``"malignant"``.
        image_id: the frame's datastore id (existing or to be created).
        image_on_server: whether the server already has that image.
        image_data: NRRD bytes of the frame (uploaded when not on the server).
        mask_data: NRRD bytes of the 0/1 nodule mask on the frame's grid, or ``None``.
        roi: ``[x0, y0, x1, y1]`` or ``None``.
    """

    volume_id: str
    diagnosis: str
    image_id: str
    image_on_server: bool
    image_data: bytes
    mask_data: Optional[bytes] = None
    roi: Optional[List[int]] = None


@dataclass
class NextCase:
    """The image proposed by active learning, downloaded.

    Attributes:
        image_id: its datastore id.
        sample: the strategy's answer (``uncertainty``, ``prob_malignant``, image info...).
        file_name: the file name the server gave.
        data: the file's bytes.
    """

    image_id: str
    sample: Dict[str, Any]
    file_name: str
    data: bytes


@dataclass
class ConnectionReport:
    """What "Test connection" found.

    Attributes:
        url: the server address.
        app: the app's name and version.
        model: the served model's identity, or ``None``.
        metrics: its validation metrics (``auc``, ``accuracy``, ...).
        model_error: why no model is usable ("" when one is).
        auth: whether the server uses authentication.
        datastore: the datastore counts (``total``, ``completed``, ``diagnoses``).
        info: the whole ``/info`` answer.
        calibration: how the model's probabilities were calibrated (the server's record:
            ``method``, ``val_ece_before``, ``val_ece_after``, ...); ``None``: never.
    """

    url: str
    app: str
    model: Optional[str]
    metrics: Dict[str, Any]
    model_error: str
    auth: bool
    datastore: Dict[str, Any]
    info: Dict[str, Any] = field(repr=False, default_factory=dict)
    calibration: Optional[Dict[str, Any]] = None

    def message(self) -> str:
        """One paragraph for the user."""
        parts = [f"Connected to {self.app} at {self.url}{' (logged in)' if self.auth else ''}."]
        if self.model:
            shown = validation_text(self.metrics)
            parts.append(f"Model {self.model}" + (f": validation {shown}." if shown else " (no validation metrics)."))
            parts.append(calibration_text(self.calibration))
        else:
            parts.append(f"No usable model: {self.model_error or 'none installed'}.")
        if self.datastore:
            d = self.datastore.get("diagnoses") or {}
            parts.append(f"{self.datastore.get('total', 0)} images, {self.datastore.get('completed', 0)} confirmed "
                         f"({d.get('benign', 0)} benign, {d.get('malignant', 0)} malignant).")
        return " ".join(parts)


CALIBRATION_METHODS = {"platt": "Platt scaling", "temperature": "temperature scaling"}


def calibration_text(calibration: Optional[Dict[str, Any]]) -> str:
    """Whether the malignancy probabilities a user reads are calibrated, e.g. ``Probabilities
    calibrated on validation cases (Platt scaling): calibration error 0.27 before, 0.03 after.``"""
    method = (calibration or {}).get("method")
    if not method or method == "none":
        return "Probabilities not calibrated: read them as scores, and the label by the threshold."
    text = f"Probabilities calibrated on validation cases ({CALIBRATION_METHODS.get(method, method)})"
    before, after = (calibration.get(k) for k in ("val_ece_before", "val_ece_after"))
    if isinstance(before, (int, float)) and isinstance(after, (int, float)):
        text += f": calibration error {float(before):.2f} before, {float(after):.2f} after"
    return text + "."


def validation_text(metrics: Dict[str, Any]) -> str:
    """The validation metrics a user reads, e.g. ``auc 0.90, accuracy 0.81, sensitivity 0.77,
    specificity 1.00 at threshold 0.88``: the thresholded ones at the threshold the model serves
    with, which the server sends as ``threshold``; "" when there are none."""
    shown = ", ".join(f"{k} {float(metrics[k]):.2f}" for k in ("auc", "accuracy", "sensitivity", "specificity")
                      if isinstance(metrics.get(k), (int, float)))
    threshold = metrics.get("threshold")
    thresholded = any(isinstance(metrics.get(k), (int, float)) for k in ("accuracy", "sensitivity", "specificity"))
    if shown and thresholded and isinstance(threshold, (int, float)):
        shown += f" at threshold {float(threshold):.2f}"
    return shown


@dataclass
class TrainingProgress:
    """Training state for display, read from declared fields only (see
    :func:`training_progress_from`).

    Attributes:
        status: ``NONE`` (never trained), ``SUBMITTED``, ``RUNNING``, ``DONE``, ``ERROR`` or
            ``STOPPED`` (MONAI Label's task states).
        epoch: epochs the run has completed; total_epochs: the epochs it was asked for
            (``None`` when unknown, e.g. before the run wrote its first stats).
        fraction: progress in ``[0, 1]``: ``epoch / total_epochs`` while running, 1 when done
            (``None`` when unknown).
        metrics: validation metrics of the finished run (``auc``, ``accuracy``, ...).
        best_metric: best validation AUC of the finished run.
        published: whether the finished run's model now serves.
        model: identity of the model served after the run.
        error: why the run failed ("" otherwise).
        whole_frames, cases: how many of the run's cases had no box (neither a confirmed box nor
            a mask) and were trained on the whole frame, of how many (``None`` when the server
            did not say).
    """

    status: str
    epoch: Optional[int] = None
    total_epochs: Optional[int] = None
    fraction: Optional[float] = None
    metrics: Dict[str, Any] = field(default_factory=dict)
    best_metric: Optional[float] = None
    published: Optional[bool] = None
    model: Optional[str] = None
    error: str = ""
    whole_frames: Optional[int] = None
    cases: Optional[int] = None

    @property
    def running(self) -> bool:
        """Whether training is submitted or running."""
        return self.status in ("SUBMITTED", "RUNNING", "QUEUED")

    def message(self) -> str:
        """One line for the user."""
        if self.status == "NONE":
            return "No training has run on this server yet."
        if self.running:
            if self.epoch is not None and self.total_epochs:
                return f"Training: {self.epoch} of {self.total_epochs} epochs done."
            return "Training is starting..."
        if self.status == "STOPPED":
            return "Training was stopped; the served model is unchanged."
        if self.status == "ERROR":
            return f"Training failed: {self.error or 'see the server log'}."
        shown = validation_text(self.metrics)
        published = ("the new model " + (self.model or "") + " now serves") if self.published else \
            "the served model was kept (the new one was not better)"
        text = f"Training finished ({self.epoch}/{self.total_epochs} epochs): validation {shown or 'metrics unavailable'}; {published}."
        if self.whole_frames and self.cases:
            text += (f" {self.whole_frames} of {self.cases} cases had no nodule box and were trained on the whole frame:"
                     " confirm with a box to train on the nodule.")
        return text


def _count(value: Any) -> Optional[int]:
    """``value`` when it is a non-negative whole number (JSON), else ``None``."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def training_progress_from(task_status: str, stats: Dict[str, Any], details: Optional[List[Any]] = None) -> TrainingProgress:
    """The training state from MONAI Label's task state and the run's declared stats.

    Args:
        task_status: ``GET /train/`` -> ``status`` (``RUNNING``, ``DONE``, ...).
        stats: ``/info`` -> ``train_stats.classify_nodule``: ``status`` (``running`` while a
            run goes on, then ``done``, ``stopped early``, ``stopped`` or ``failed``), ``epoch``
            (epochs completed), ``total_epochs``, and for a finished run ``metrics``,
            ``best_metric``, ``published``, ``model``, ``error`` (the module README,
            "Progress contract").
        details: ``GET /train/`` -> ``details``, the run's last log lines; only shown to the
            user (as the reason of a failure the stats do not explain), never parsed.
    """
    status = str(task_status or "").upper() or "NONE"
    progress = TrainingProgress(status=status)
    epoch, total = _count(stats.get("epoch")), _count(stats.get("total_epochs"))
    if progress.running:
        # stats not (yet) "running" are the previous run's: this one has not written its own
        if str(stats.get("status", "")).lower() == "running" and epoch is not None and total:
            progress.epoch, progress.total_epochs = epoch, total
            progress.fraction = min(1.0, epoch / total)
        return progress
    if status in ("DONE", "ERROR") and stats:
        progress.metrics = dict(stats.get("metrics") or {})
        progress.best_metric = stats.get("best_metric")
        progress.published = stats.get("published")
        progress.model = stats.get("model")
        progress.epoch, progress.total_epochs = epoch, total
        progress.error = str(stats.get("error") or "")
        boxes = stats.get("boxes")
        if isinstance(boxes, dict):  # {"train": {"roi": n, "mask": n, "none": n}, "val": {...}}
            parts = [b for b in boxes.values() if isinstance(b, dict)]
            counts = [[_count(b.get(k)) for k in ("roi", "mask", "none")] for b in parts]
            if parts and all(c is not None for row in counts for c in row):
                progress.whole_frames = sum(row[2] for row in counts)
                progress.cases = sum(sum(row) for row in counts)
        if status == "DONE":  # the process ended normally, but the run may not have
            progress.status = {"failed": "ERROR", "stopped": "STOPPED"}.get(str(stats.get("status", "")).lower(), status)
    if progress.status == "DONE":
        progress.fraction = 1.0
    if progress.status == "ERROR" and not progress.error and details:
        progress.error = str(details[-1]).strip()[-300:]
    return progress


@dataclass
class BatchProgress:
    """Batch inference state: ``status`` (as :class:`TrainingProgress`), ``done``/``total`` images
    (see :func:`batch_progress_from`)."""

    status: str
    done: Optional[int] = None
    total: Optional[int] = None

    @property
    def running(self) -> bool:
        return self.status in ("SUBMITTED", "RUNNING", "QUEUED")

    def message(self) -> str:
        if self.running:
            return f"Classifying the server's images: {self.done}/{self.total}." if self.total else "Batch classification is starting..."
        return {"DONE": "Batch classification finished.", "STOPPED": "Batch classification was stopped.",
                "ERROR": "Batch classification failed; see the server log.", "NONE": "No batch classification has run."}.get(
            self.status, f"Batch classification: {self.status.lower()}.")


def _json_object(line: Any) -> Dict[str, Any]:
    """``line`` as a JSON object, or ``{}`` when it is not one (an ordinary log line)."""
    text = str(line).strip()
    if not text.startswith("{"):
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def batch_progress_from(task: Dict[str, Any]) -> BatchProgress:
    """The batch state from ``GET /batch/infer``: ``status``, and the last progress record among
    ``details``: a line that is the JSON object ``{"batch_progress": {"done": D, "total": T,
    "unit": "images"}}`` (the module README, "Progress contract"); other lines are ignored."""
    progress = BatchProgress(status=str(task.get("status", "")).upper() or "NONE")
    for line in reversed(list(task.get("details") or [])):
        record = _json_object(line).get(BATCH_PROGRESS_KEY)
        if isinstance(record, dict):
            done, total = _count(record.get("done")), _count(record.get("total"))
            if done is not None and total is not None and done <= total:
                progress.done, progress.total = done, total
                break
    return progress


def _probability(result: Dict[str, Any], name: str) -> float:
    try:
        value = float(result["probabilities"][name])
    except (KeyError, TypeError, ValueError):
        raise BadResponseError(f"The server's answer has no {name} probability; is it running the thyroid_nodule app?",
                               detail=repr(result)[:300]) from None
    if not 0.0 <= value <= 1.0:
        raise BadResponseError(f"The server's answer has an invalid {name} probability ({value}).")
    return value


def _advice(result: Dict[str, Any]) -> str:
    """The answer's ``warnings`` (strings) as one sentence each, capitalised; "" when none."""
    notes = result.get("warnings")
    if not isinstance(notes, list):
        return ""
    texts = [str(n).strip()[:400] for n in notes[:5] if isinstance(n, str) and n.strip()]
    return " ".join(t[0].upper() + t[1:] + ("" if t.endswith(".") else ".") for t in texts)


def server_image_id(name: str, data: bytes) -> str:
    """A datastore id for a frame: its name made safe, plus 8 hex digits of the file's SHA-256
    (so two different frames with the same name never overwrite each other)."""
    base = _ID_CHARS.sub("_", name or "frame").strip(" .") or "frame"
    if not re.match(r"[A-Za-z0-9_(]", base[0]):
        base = "img_" + base
    return f"{base[:100]}-{hashlib.sha256(data).hexdigest()[:8]}"


def dicom_image_id(volume) -> Optional[str]:
    """The SOP Instance UID of a single frame loaded from DICOM (a PACS) in Slicer's DICOM
    module: the image id of that frame on a server that serves the archive (the server then
    needs no upload; a server with a studies folder answers 404 and the frame is uploaded under
    this id)."""
    uids = (volume.GetAttribute(ATTR_DICOM_UIDS) or "").split()
    if len(uids) == 1 and re.fullmatch(r"[0-9]+(\.[0-9]+)*", uids[0]) and len(uids[0]) <= 64:
        return uids[0]
    return None


class NoduleLogic:
    """The module's logic over one MRML scene and one server.

    Args:
        scene: the MRML scene (``slicer.mrmlScene`` in Slicer, ``slicer.vtkMRMLScene()`` headless).
        client: the REST client (see :meth:`connect`).
        loader: loads a downloaded image file into the scene (default:
            :func:`~ThyroidNoduleLib.volumes.load_frame_file`; Slicer passes
            ``slicer.util.loadVolume``).
    """

    def __init__(self, scene, client: Optional[MonaiLabelClient] = None, loader: Optional[VolumeLoader] = None) -> None:
        self.scene = scene
        self.client = client
        self.loader: VolumeLoader = loader or load_frame_file
        self.download_dir: Optional[str] = None

    # ------------------------------------------------------------------------------- server
    def connect(self, url: str, username: str = "", password: str = "", timeouts: Optional[Timeouts] = None) -> MonaiLabelClient:
        """Use the server at ``url`` from now on (no request is sent)."""
        self.client = MonaiLabelClient(url, timeouts=timeouts, username=username, password=password)
        return self.client

    def _require_client(self) -> MonaiLabelClient:
        if self.client is None:
            raise ThyroidNoduleError("Enter the MONAI Label server address first.")
        return self.client

    def test_connection(self) -> ConnectionReport:
        """Log in if credentials are set, then read ``/info`` and check it serves
        ``classify_nodule`` (network only; safe in a worker thread).

        Raises:
            ThyroidNoduleError: unreachable, login failed, or not the thyroid_nodule app.
        """
        client = self._require_client()
        auth = False
        if client.username:
            auth = client.login() is not None
        info = client.info()
        models = info.get("models")
        if not isinstance(models, dict):
            raise BadResponseError(f"The server at {client.base_url} answers, but not like a MONAI Label server (no model list).")
        app = " ".join(str(v) for v in (info.get("name") or "MONAI Label app", info.get("version") or "") if v)
        if TASK_NAME not in models:
            raise BadResponseError(f"The server at {client.base_url} runs '{app}', which has no {TASK_NAME} model "
                                   f"(it serves: {', '.join(sorted(models)) or 'nothing'}). Start it with the thyroid_nodule app.")
        task = models[TASK_NAME] or {}
        model = task.get("model") if isinstance(task.get("model"), dict) else {}
        calibration = model.get("calibration")
        return ConnectionReport(
            url=client.base_url, app=app, model=model.get("model"), metrics=dict(model.get("metrics") or {}),
            model_error=str(task.get("model_error") or ""), auth=auth, datastore=dict(info.get("datastore") or {}), info=info,
            calibration=calibration if isinstance(calibration, dict) else None)

    # ----------------------------------------------------------------------------- classify
    def _volume(self, volume):
        if volume is None:
            raise InputError("Select the ultrasound image to classify.")
        if volume.IsA("vtkMRMLLabelMapVolumeNode"):
            raise InputError(f"'{volume.GetName()}' is a label map; select the ultrasound image itself.")
        if not volume.IsA("vtkMRMLScalarVolumeNode"):
            raise InputError(f"'{volume.GetName()}' is not an image volume.")
        return volume

    def frame_file(self, volume) -> Tuple[bytes, FrameLayout, Dict[str, Any]]:
        """The NRRD bytes, layout and expected grid of a single-frame volume (main thread).

        Returns:
            ``(data, layout, grid)``: NRRD file bytes (scalar ``W H 1`` or RGB ``3 W H 1``,
            LPS), the :class:`FrameLayout` and the grid the server must report.

        Raises:
            InputError: no image data, several slices, or an unusable number of components.
        """
        volume = self._volume(volume)
        array = volume_array(volume)
        layout = FrameLayout.of(volume.GetImageData().GetDimensions())
        if array.ndim == 4 and array.shape[3] not in (3, 4):
            raise InputError(f"'{volume.GetName()}' has {array.shape[3]} components per pixel; the classifier takes gray "
                             "or RGB images.")
        if array.dtype == np.bool_:
            array = array.astype(np.uint8)
        file_matrix = layout.to_file_matrix(lps_from_ras(volume_ijk_to_ras(volume)))
        try:
            data = write_nrrd(layout.to_file_array(array), file_matrix)
        except NrrdError:
            raise InputError(f"'{volume.GetName()}' has pixels of type {array.dtype}, which cannot be sent; convert it "
                             "to an integer or float type first (Volumes module, Cast Scalar Volume).") from None
        return data, layout, grid_of(file_matrix, [layout.width, layout.height])

    def roi_box(self, volume, roi) -> List[int]:
        """The markups ROI as a pixel box ``[x0, y0, x1, y1]`` of the frame (pixels whose centre is
        inside the ROI; the ROI may be rotated and either node may be under a linear transform).

        Raises:
            InputError: the ROI is not placed, not on the image plane, or covers no pixel.
        """
        if roi.GetNumberOfControlPoints() == 0 and max(roi.GetSize()) <= 0:
            raise InputError(f"The ROI '{roi.GetName()}' has not been placed yet.")
        center = [0.0, 0.0, 0.0]
        roi.GetCenterWorld(center)
        size = [0.0, 0.0, 0.0]
        roi.GetSizeWorld(size)
        axes = []
        for getter in (roi.GetXAxisWorld, roi.GetYAxisWorld, roi.GetZAxisWorld):
            axis = [0.0, 0.0, 0.0]
            getter(axis)
            axes.append(np.asarray(axis, dtype=float))
        corners = []
        for sx in (-0.5, 0.5):
            for sy in (-0.5, 0.5):
                for sz in (-0.5, 0.5):
                    corners.append(np.asarray(center) + sx * size[0] * axes[0] + sy * size[1] * axes[1] + sz * size[2] * axes[2])
        world_to_ijk = np.linalg.inv(node_to_world(volume) @ volume_ijk_to_ras(volume))
        ijk = [(world_to_ijk @ np.append(c, 1.0))[:3] for c in corners]
        return pixel_box_from_corners(np.asarray(ijk), FrameLayout.of(volume.GetImageData().GetDimensions()))

    def show_box(self, volume, box: List[int], name: Optional[str] = None):
        """A markups ROI over the pixels ``box`` (``[x0, y0, x1, y1]``, ``x1``/``y1`` exclusive) of
        ``volume``'s frame, aligned with the frame's axes: :meth:`roi_box` reads exactly ``box``
        back from it. One such ROI per volume (``display.REF_SERVER_BOX``), updated in place."""
        volume = self._volume(volume)
        layout = FrameLayout.of(volume.GetImageData().GetDimensions())
        world = node_to_world(volume) @ volume_ijk_to_ras(volume)
        lo = (box[0] - 0.5, box[1] - 0.5, -0.5)  # pixel centres are at integer indices
        hi = (box[2] - 0.5, box[3] - 0.5, layout.dims[layout.axes[2]] - 0.5)
        centre = np.zeros(4)
        centre[3] = 1.0
        for n, axis in enumerate(layout.axes):
            centre[axis] = (lo[n] + hi[n]) / 2.0
        columns = [world[:3, axis] for axis in layout.axes]
        lengths = [float(np.linalg.norm(c)) for c in columns]
        object_to_node = np.eye(4)
        object_to_node[:3, :3] = np.stack([c / n for c, n in zip(columns, lengths)], axis=1)
        object_to_node[:3, 3] = (world @ centre)[:3]
        roi = volume.GetNodeReference(display.REF_SERVER_BOX)
        if roi is None:
            roi = self.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name or f"{volume.GetName()} nodule box")
            volume.SetNodeReferenceID(display.REF_SERVER_BOX, roi.GetID())
        roi.SetAndObserveObjectToNodeMatrix(vtk_matrix(object_to_node))
        roi.SetSize(*[(hi[n] - lo[n]) * lengths[n] for n in range(3)])
        return roi

    def prepare_frame(self, volume, roi=None) -> PreparedFrame:
        """Everything "Classify nodule" sends, read from the scene (main thread)."""
        volume = self._volume(volume)
        data, layout, grid = self.frame_file(volume)
        box = self.roi_box(volume, roi) if roi is not None else None
        return PreparedFrame(volume_id=volume.GetID(), volume_name=volume.GetName(), layout=layout, file_name="frame.nrrd",
                             data=data, grid=grid, roi=box, server_image_id=self._image_id_on_server(volume),
                             archive_id=dicom_image_id(volume))

    def request_classification(self, prepared: PreparedFrame) -> InferResponse:
        """Ask ``classify_nodule`` (network only; safe in a worker thread).

        A frame loaded from the PACS is classified by its SOP Instance UID, as the server's
        archive holds it (no pixels are sent, and the server writes its result back to the
        archive); a server that does not hold that UID (404: a server over a studies folder)
        gets the frame uploaded instead. Any other frame is uploaded."""
        client = self._require_client()
        params: Dict[str, Any] = {}
        if prepared.roi is not None:
            params["roi"] = prepared.roi
        if prepared.archive_id:
            try:
                return client.infer(TASK_NAME, params={**params, "mask_format": "nrrd"}, output="all",
                                    image_id=prepared.archive_id)
            except ServerError as e:
                if e.status != 404:
                    raise
        return client.infer(TASK_NAME, prepared.file_name, prepared.data, params, output="all")

    def _check_result(self, result: Dict[str, Any]) -> None:
        label = result.get("label")
        if label not in CLASS_NAMES:
            raise BadResponseError(f"The server answered without a benign/malignant label (got {label!r}); is it running "
                                   "the thyroid_nodule app?", detail=repr(result)[:300])

    def _mask_array(self, prepared: PreparedFrame, response: InferResponse) -> np.ndarray:
        """The returned mask as ``(K, J, I)`` uint8 on the volume's grid, after checking both the
        result's ``image`` grid and the mask file's own header against the volume.

        For a frame the server read from the archive by its UID (``response.image_id``), only
        the pixel size is checked: the pixels are that instance's own, placed pixel for pixel,
        while spacing and origin come from two DICOM readers with their own rules (the server
        takes the spacing from the Sequence of Ultrasound Regions, Slicer's reader may not)."""
        by_uid = response.image_id is not None and response.image_id == prepared.archive_id
        reported = dict(response.result.get("image") or {})
        if by_uid:
            reported = {**{k: prepared.grid[k] for k in ("spacing", "origin", "direction")}, "size": reported.get("size", [])}
        check_result_geometry(reported, prepared.grid, "the result's image fields")
        try:
            mask = read_nrrd(response.mask or b"")
        except NrrdError as e:
            raise GeometryMismatchError(f"The saliency mask from the server is not an NRRD file as expected ({e}); it was "
                                        "not displayed.") from None
        spatial = mask.spatial_axes()
        extra = [n for n in range(len(mask.sizes)) if n not in spatial]
        if extra or len(spatial) < 2:
            raise GeometryMismatchError(f"The saliency mask from the server has the layout {mask.kinds} instead of one "
                                        "scalar frame; it was not displayed.")
        sizes = [mask.sizes[n] for n in spatial]
        if sizes[:2] != [prepared.layout.width, prepared.layout.height] or any(s != 1 for s in sizes[2:]):
            raise GeometryMismatchError(f"The saliency mask from the server has {sizes} pixels, the image "
                                        f"{[prepared.layout.width, prepared.layout.height]}; it was not displayed.")
        if not by_uid:
            check_result_geometry(grid_of(mask.ijk_to_lps(), sizes[:2]), prepared.grid, "the mask file")
        array = mask.data.reshape(1, prepared.layout.height, prepared.layout.width)
        if array.dtype != np.uint8:
            array = np.clip(array, 0, 255).astype(np.uint8)
        return prepared.layout.from_file_array(array)

    def apply_classification(self, prepared: PreparedFrame, response: InferResponse, table=None,
                             heat_opacity: float = 0.5) -> Classification:
        """Show an answer: saliency heat volume and mask segmentation on the volume's grid, the
        overlay in the slice views, and a row in the results table (main thread).

        A missing mask (JSON-only answer) or a mask not on the image's grid leaves the
        classification shown and explains the problem in ``warning``.

        Raises:
            BadResponseError: the answer has no valid label or probabilities.
            InputError: the volume was removed from the scene meanwhile.
        """
        result = response.result
        self._check_result(result)
        label = result["label"]
        probability = _probability(result, label)
        prob_malignant = _probability(result, "malignant")
        volume = self.scene.GetNodeByID(prepared.volume_id)
        if volume is None:
            raise InputError(f"'{prepared.volume_name}' was closed before the server answered.")
        heat = mask_seg = None
        warning = ""
        if response.mask is None:
            warning = "The server sent the classification without a saliency mask, so no mask is shown."
            display.remove_saliency(self.scene, volume)
        else:
            try:
                saliency = self._mask_array(prepared, response)
            except GeometryMismatchError as e:
                warning = str(e)
                display.remove_saliency(self.scene, volume)
            else:
                threshold = float((result.get("saliency") or {}).get("mask_threshold", 0.5))
                binary, _ = display.mask_to_labelmap_array(saliency, threshold)
                heat = display.update_heat_volume(self.scene, volume, saliency)
                mask_seg = display.update_mask_segmentation(self.scene, volume, binary, f"Saliency >= {threshold:.2f}")
                display.set_overlay(self.scene, volume, heat, heat_opacity)
        server_box = None
        if result.get("roi_source") == "localiser" and result.get("roi"):
            server_box = self.show_box(volume, [int(v) for v in result["roi"]])
        classification = Classification(
            volume_name=volume.GetName(), label=label, probability=probability, prob_malignant=prob_malignant,
            threshold=float(result.get("threshold", 0.5)), model=str(result.get("model", "")),
            roi=result.get("roi"), time=results.now_iso(), result=result, heat_volume=heat, mask_segmentation=mask_seg,
            warning=warning, advice=_advice(result), server_box=server_box)
        row = results.result_row(volume.GetName(), prepared.server_image_id, result, "classify")
        row["Time"] = classification.time
        results.add_row(results.ensure_table(self.scene, table), row)
        return classification

    def classify(self, volume, roi=None, table=None, heat_opacity: float = 0.5) -> Classification:
        """Classify ``volume`` (optionally inside ``roi``) and show the answer (blocking)."""
        prepared = self.prepare_frame(volume, roi)
        return self.apply_classification(prepared, self.request_classification(prepared), table, heat_opacity)

    def set_heat_opacity(self, volume, opacity: float) -> int:
        """Show ``volume`` with its saliency heat overlay at ``opacity`` (0..1); returns the number
        of slice views changed (0 when the volume has no saliency yet)."""
        if volume is None:
            return 0
        heat = volume.GetNodeReference(display.REF_HEAT)
        if heat is None:
            return 0
        return display.set_overlay(self.scene, volume, heat, opacity)

    # ------------------------------------------------------------------------------ confirm
    def _image_id_on_server(self, volume) -> Optional[str]:
        image_id = volume.GetAttribute(ATTR_IMAGE_ID)
        server = volume.GetAttribute(ATTR_SERVER)
        if image_id and self.client is not None and server == self.client.base_url:
            return image_id
        return dicom_image_id(volume)

    def prepare_confirmation(self, volume, diagnosis: str, segmentation=None, roi=None) -> PreparedConfirmation:
        """Everything a confirmation sends, read from the scene (main thread).

        Args:
            volume: the frame.
            diagnosis: ``"benign"`` or ``"malignant"``.
            segmentation: a segmentation whose segments (merged) are the nodule mask, e.g. the
                edited saliency mask; ignored when it paints no pixel.
            roi: a markups ROI around the nodule, sent as ``roi``.
        """
        diagnosis = str(diagnosis).strip().lower()
        if diagnosis not in CLASS_NAMES:
            raise InputError(f"The diagnosis must be benign or malignant, not {diagnosis!r}.")
        volume = self._volume(volume)
        data, layout, _ = self.frame_file(volume)
        mask_data = None
        if segmentation is not None:
            mask = display.segmentation_mask_array(self.scene, segmentation, volume)
            if mask is not None:
                file_matrix = layout.to_file_matrix(lps_from_ras(volume_ijk_to_ras(volume)))
                mask_data = write_nrrd(layout.to_file_array(mask), file_matrix)
        box = self.roi_box(volume, roi) if roi is not None else None
        existing = self._image_id_on_server(volume)
        return PreparedConfirmation(volume_id=volume.GetID(), diagnosis=diagnosis,
                                    image_id=existing or server_image_id(volume.GetName(), data),
                                    image_on_server=existing is not None, image_data=data, mask_data=mask_data, roi=box)

    def send_confirmation(self, prepared: PreparedConfirmation) -> Dict[str, Any]:
        """Record the diagnosis on the server (network only; safe in a worker thread): the image
        is uploaded first when the server lacks it, then the mask is saved as the ``final``
        label with the diagnosis, or the diagnosis is written to the image info. The stored
        info is read back and checked.

        Returns:
            the image's info as stored on the server (with ``diagnosis``).
        """
        client = self._require_client()
        info: Dict[str, Any] = {"diagnosis": prepared.diagnosis}
        if prepared.roi is not None:
            info["roi"] = prepared.roi

        def record() -> None:
            if prepared.mask_data is not None:
                client.save_label(prepared.image_id, "mask.nrrd", prepared.mask_data, info, tag="final")
            else:
                client.update_image_info(prepared.image_id, info)

        if not prepared.image_on_server:
            client.add_image(prepared.image_id, "frame.nrrd", prepared.image_data, {"source": "3D Slicer"})
            record()
        else:
            try:
                record()
            except ServerError as e:
                if e.status != 404:
                    raise
                client.add_image(prepared.image_id, "frame.nrrd", prepared.image_data, {"source": "3D Slicer"})
                record()
        stored = client.image_info(prepared.image_id)
        if stored.get("diagnosis") != prepared.diagnosis:
            raise BadResponseError(f"The server did not record the diagnosis of '{prepared.image_id}' (it holds "
                                   f"{stored.get('diagnosis')!r}); check the server log.")
        return stored

    def apply_confirmation(self, prepared: PreparedConfirmation, stored: Dict[str, Any], table=None) -> str:
        """Remember the frame's server id on the volume and note the diagnosis in the results
        table (main thread). Returns the image id."""
        volume = self.scene.GetNodeByID(prepared.volume_id)
        name = volume.GetName() if volume is not None else ""
        if volume is not None:
            volume.SetAttribute(ATTR_IMAGE_ID, prepared.image_id)
            volume.SetAttribute(ATTR_SERVER, self._require_client().base_url)
        table = results.ensure_table(self.scene, table)
        diagnosis = prepared.diagnosis + (" (with mask)" if prepared.mask_data is not None else "")
        # rows of this volume classified before it had a server id, and rows of that id
        updated = results.update_rows(table, {"Volume": name, "Image ID": ""},
                                      {"Image ID": prepared.image_id, "Diagnosis": diagnosis})
        updated += results.update_rows(table, {"Volume": name, "Image ID": prepared.image_id}, {"Diagnosis": diagnosis})
        if not updated:
            results.add_row(table, {"Volume": name, "Image ID": prepared.image_id, "Time": results.now_iso(),
                                    "Source": "confirm", "Diagnosis": diagnosis})
        return prepared.image_id

    def confirm(self, volume, diagnosis: str, segmentation=None, roi=None, table=None) -> str:
        """Record the diagnosis of ``volume`` on the server (blocking); returns its image id."""
        prepared = self.prepare_confirmation(volume, diagnosis, segmentation, roi)
        return self.apply_confirmation(prepared, self.send_confirmation(prepared), table)

    # ---------------------------------------------------------------------------- next case
    def request_next_case(self, strategy: str = "uncertain") -> Optional[NextCase]:
        """Ask active learning for the next unconfirmed image and download it (network only).

        Returns:
            the case, or ``None`` when the server has no unconfirmed image left.
        """
        client = self._require_client()
        sample = client.next_sample(strategy)
        image_id = sample.get("id") if isinstance(sample, dict) else None
        if not image_id:
            return None
        file_name, data = client.download_image(str(image_id))
        return NextCase(image_id=str(image_id), sample=sample, file_name=file_name, data=data)

    def load_next_case(self, case: NextCase):
        """Load a downloaded case into the scene (main thread); the volume remembers its server
        id, so confirming it updates that image instead of uploading a copy."""
        directory = self.download_dir or tempfile.mkdtemp(prefix="ThyroidNodule-")
        self.download_dir = directory
        base = os.path.basename(case.file_name) or case.image_id
        suffix = ".nii.gz" if base.lower().endswith(".nii.gz") else os.path.splitext(base)[1]
        safe = _ID_CHARS.sub("_", case.image_id)
        path = os.path.join(directory, f"{safe}{suffix}")
        with open(path, "wb") as fp:
            fp.write(case.data)
        volume = self.loader(self.scene, path, case.image_id)
        if volume is None:
            raise InputError(f"The image '{case.image_id}' from the server could not be loaded.")
        volume.SetAttribute(ATTR_IMAGE_ID, case.image_id)
        volume.SetAttribute(ATTR_SERVER, self._require_client().base_url)
        return volume

    def next_case(self, strategy: str = "uncertain"):
        """Fetch and load the next case (blocking); ``None`` when none is left."""
        case = self.request_next_case(strategy)
        return self.load_next_case(case) if case is not None else None

    # ----------------------------------------------------------------------------- training
    def start_training(self, max_epochs: int, publish: str = "if_better", options: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Start retraining on the server's confirmed cases (network only).

        Args:
            max_epochs: epochs to train (>= 1).
            publish: ``"if_better"`` or ``"always"``.
            options: further training options of the REST contract.
        """
        if int(max_epochs) < 1:
            raise InputError("Train for at least one epoch.")
        if publish not in ("if_better", "always"):
            raise InputError(f"publish must be 'if_better' or 'always', not {publish!r}.")
        params = {"max_epochs": int(max_epochs), "publish": publish, **(options or {})}
        return self._require_client().train_start(TASK_NAME, params)

    def training_progress(self) -> TrainingProgress:
        """Training state (network only): the task's state from ``GET /train/``, the run's
        epochs, metrics, publication and errors from ``/info`` -> ``train_stats``."""
        client = self._require_client()
        task = client.train_status()
        if task is None:
            return TrainingProgress(status="NONE")
        status = str(task.get("status", "")).upper() or "NONE"
        stats = {}
        if status in ("RUNNING", "DONE", "ERROR"):
            stats = (client.info().get("train_stats") or {}).get(TASK_NAME) or {}
        return training_progress_from(status, stats if isinstance(stats, dict) else {}, task.get("details"))

    def stop_training(self) -> None:
        """Stop the running training (network only)."""
        self._require_client().train_stop()

    # -------------------------------------------------------------------------------- batch
    def start_batch(self, images: str = "all") -> Dict[str, Any]:
        """Start classifying the server's images in the background on the server (network only).

        Args:
            images: ``all``, ``labeled`` (confirmed) or ``unlabeled``.
        """
        if images not in ("all", "labeled", "unlabeled"):
            raise InputError(f"images must be all, labeled or unlabeled, not {images!r}.")
        return self._require_client().batch_infer(TASK_NAME, images=images, params={}, run_sync=False)

    def batch_progress(self) -> BatchProgress:
        """Batch state from ``GET /batch/infer`` (network only)."""
        task = self._require_client().batch_status()
        return BatchProgress(status="NONE") if task is None else batch_progress_from(task)

    def batch_results(self, label_tag: str = "original") -> Dict[str, Dict[str, Any]]:
        """The stored batch result JSON of every image that has one (network only).

        Returns:
            image id -> result JSON (``label``, ``probabilities``, ``model``, ...).
        """
        store = self._require_client().datastore("all")
        out: Dict[str, Dict[str, Any]] = {}
        for image_id, obj in (store.get("objects") or {}).items():
            label = ((obj or {}).get("labels") or {}).get(label_tag) or {}
            params = (label.get("info") or {}).get("params")
            if isinstance(params, dict) and params.get("label") in CLASS_NAMES:
                out[str(image_id)] = params
        return out

    def add_batch_rows(self, batch: Dict[str, Dict[str, Any]], table=None) -> int:
        """One results-table row per image result (main thread); returns the number of rows."""
        table = results.ensure_table(self.scene, table)
        count = 0
        for image_id in sorted(batch):
            result = batch[image_id]
            if "error" in result:
                results.add_row(table, {"Image ID": image_id, "Label": "error: " + str(result["error"])[:200],
                                        "Time": results.now_iso(), "Source": "batch"})
            else:
                results.add_row(table, results.result_row("", image_id, result, "batch"))
            count += 1
        return count

    def classify_all(self, images: str = "all", table=None, poll_s: float = 2.0, timeout_s: float = 1800.0,
                     on_progress: Optional[Callable[[BatchProgress], None]] = None) -> Dict[str, Dict[str, Any]]:
        """Classify the server's images and add them to the results table (blocking: starts the
        background batch, polls it every ``poll_s`` seconds, reads the stored results).

        Raises:
            ThyroidNoduleError: the batch failed, was stopped, or took longer than ``timeout_s``.
        """
        started = time.monotonic()
        self.start_batch(images)
        while True:
            progress = self.batch_progress()
            if on_progress is not None:
                on_progress(progress)
            if not progress.running:
                break
            if time.monotonic() - started > timeout_s:
                raise ThyroidNoduleError(f"Batch classification did not finish within {timeout_s:g} s; it goes on on the server.")
            time.sleep(poll_s)
        if progress.status != "DONE":
            raise ThyroidNoduleError(progress.message())
        batch = self.batch_results()
        self.add_batch_rows(batch, table)
        return batch
