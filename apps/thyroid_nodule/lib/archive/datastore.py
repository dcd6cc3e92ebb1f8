"""MONAI Label's datastore interface over a DICOMweb archive (see the package docstring).

What each datastore call does here:

- ``list_images``: the archive's ultrasound frames (QIDO-RS: instances of modality US whose SOP
  class is US Image or US Multi-frame Image Storage; one id per frame of a clip), listed again
  when older than ``archive_refresh_s``;
- ``get_image_uri``: the frame as a local file from the bounded cache (fetched once);
- ``get_image_info``: the archive UIDs and frame, the patient id as ``case`` (so training splits
  keep a patient's frames together), and the confirmed ``diagnosis``/``roi`` read back from the
  archive's confirmation SRs;
- ``update_image_info`` with a ``diagnosis``, or ``save_label`` with tag ``final`` and a
  diagnosis: a confirmation SR stored in the archive (observer: the confirming user);
- ``save_label`` with tag ``original`` and a result in ``params`` (batch inference): the result
  SR and the saliency object stored in the archive, once per model and frame;
- ``keep_result`` (not MONAI Label's: ``classify_nodule`` hands it each finished single
  classification): the same objects, written by the background :class:`.results.ResultWriter` so
  that the answer does not wait for the archive;
- ``status`` (``/info``): from what is already known, never waiting for the archive (a stale
  listing is refreshed in the background).

The archive's own objects are never deleted or changed from this server: removing images or
labels, changing other info fields and downloading the dataset zip answer 422 with a message.
"""

from __future__ import annotations

import copy
import io
import logging
import threading
import time
from typing import Any, Dict, List, Optional

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException

from thyroid_plugin.constants import CLASS_NAMES, DIAGNOSIS_FIELD
from thyroid_plugin.studies import InvalidRequestError, check_id, validate_image_info

from . import reports
from .client import ArchiveClient, ArchiveError, ArchiveNotFound
from .frames import US_CLASSES, FrameCache, FrameRef, is_uid, parse_image_id, refs_of_instance, single_frame_file
from .results import DEFAULT_MAX_WAITING, ResultWriter

logger = logging.getLogger(__name__)

_LIST_FIELDS = ("00280008", "00100020", "00080016")  # NumberOfFrames, PatientID, SOPClassUID


class ArchiveDatastore(Datastore):
    """The archive at ``url`` as MONAI Label's datastore.

    Args:
        url: the DICOMweb root.
        cache_dir: local cache folder; ``cache_mb`` its size bound.
        timeout: seconds to wait for any archive answer (connections: at most 3 s).
        refresh_s: a listing older than this is listed again.
        software_version: written into the objects stored in the archive.
        result_queue: single results waiting to be written, at most (see :mod:`.results`).
    """

    def __init__(self, url: str, cache_dir: str, cache_mb: int = 1024, timeout: float = 20.0, refresh_s: float = 30.0,
                 software_version: str = "", result_queue: int = DEFAULT_MAX_WAITING) -> None:
        self.client = ArchiveClient(url, connect_timeout=min(3.0, timeout), read_timeout=timeout)
        self.cache = FrameCache(cache_dir, cache_mb << 20)
        self.refresh_s = float(refresh_s)
        self.software_version = software_version
        self._name, self._description = "Archive", f"DICOMweb archive {self.client.url}"
        self._refs: Dict[str, FrameRef] = {}
        self._patients: Dict[str, str] = {}
        self._confirmed: Dict[str, reports.Finding] = {}
        self._listed_at = 0.0
        self._error: Optional[str] = None
        self._lock = threading.RLock()
        self._refreshing = threading.Lock()
        self.results = ResultWriter(lambda image_id, result, mask: self.store_result(image_id, result, io.BytesIO(mask)),
                                    max_waiting=result_queue)

    # ------------------------------------------------------------------------ the listing
    def refresh(self) -> None:
        """List the archive's ultrasound frames and its confirmed diagnoses again."""
        with self._refreshing:
            try:
                rows = self.client.search_instances(filters={"Modality": "US"}, fields=_LIST_FIELDS)
                refs, patients = {}, {}
                for row in rows:
                    for ref in refs_of_instance(row):
                        refs[ref.image_id] = ref
                        patients[ref.image_id] = _value(row, "00100020")
                confirmed = self._read_confirmations()
            except ArchiveError as e:
                with self._lock:
                    self._error = e.detail
                raise
            with self._lock:
                self._refs, self._patients, self._confirmed = refs, patients, confirmed
                self._listed_at, self._error = time.time(), None
            logger.info("archive %s: %d ultrasound frames, %d confirmed", self.client.url, len(refs), len(confirmed))

    def _fresh(self) -> None:
        if time.time() - self._listed_at > self.refresh_s:
            self.refresh()

    def _read_confirmations(self) -> Dict[str, reports.Finding]:
        """The latest confirmation per frame, from the archive's confirmation SRs (each SR file
        is cached: an SOP instance never changes)."""
        latest: Dict[str, reports.Finding] = {}
        # series filtered here: archives differ in matching a description with spaces (Orthanc finds none)
        uids = []
        for series_row in self.client.search_series(filters={"Modality": "SR"}, fields=("0008103E",)):
            if _value(series_row, "0008103E") == reports.CONFIRMED_SERIES:
                study, series = _value(series_row, "0020000D"), _value(series_row, "0020000E")
                uids += [(study, series, _value(row, "00080018")) for row in self.client.search_instances(study, series)]
        for study, series, sop in uids:
            if not all(is_uid(u) for u in (study, series, sop)):
                continue
            path = self.cache.get("reports", sop, lambda: self.client.retrieve_instance(study, series, sop))
            try:
                import pydicom

                findings = reports.parse_sr(pydicom.dcmread(str(path), force=True))
            except Exception as e:  # an SR this app did not write, or a damaged one: not ground truth
                logger.warning("confirmation SR %s cannot be read: %s", sop, e)
                continue
            for f in findings:  # a frame of a clip is referenced with its number, a single frame without
                image_id = f.sop if f.frame is None else f"{f.sop}-f{f.frame}"
                if f.label in CLASS_NAMES and (image_id not in latest or f.when >= latest[image_id].when):
                    latest[image_id] = f
        return latest

    def ref(self, image_id: str) -> FrameRef:
        """Where ``image_id`` lives; an id not in the last listing is looked up in the archive
        (a frame stored a moment ago, or named by a Slicer user from its UIDs)."""
        check_id(image_id)
        try:
            sop, frame = parse_image_id(image_id)
        except ValueError as e:
            raise ImageNotFoundException(str(e)) from None
        with self._lock:
            ref = self._refs.get(image_id)
        if ref is not None:
            return ref
        rows = self.client.search_instances(filters={"SOPInstanceUID": sop}, fields=_LIST_FIELDS)
        for row in rows:
            for candidate in refs_of_instance(row):
                with self._lock:
                    self._refs.setdefault(candidate.image_id, candidate)
                if candidate.image_id == image_id:
                    return candidate
        raise ImageNotFoundException(f"the archive has no ultrasound frame {image_id!r}")

    # --------------------------------------------------------------------------- reading
    def list_images(self) -> List[str]:
        self._fresh()
        with self._lock:
            return sorted(self._refs)

    def _instance_path(self, ref: FrameRef):
        return self.cache.get("instances", ref.sop, lambda: self.client.retrieve_instance(ref.study, ref.series, ref.sop))

    def get_image_uri(self, image_id: str) -> str:
        ref = self.ref(image_id)
        path = self._instance_path(ref)
        if ref.frame is None:
            return str(path)

        def cut() -> bytes:
            with open(path, "rb") as fp:
                return single_frame_file(fp.read(), ref.frame)

        return str(self.cache.get("frames", image_id, cut))

    def get_image(self, image_id: str, params=None) -> Any:
        with open(self.get_image_uri(image_id), "rb") as fp:
            return io.BytesIO(fp.read())

    def get_image_info(self, image_id: str) -> Dict[str, Any]:
        self._fresh()  # the confirmations too
        ref = self.ref(image_id)
        info = ref.info()
        info["case"] = self._patients.get(image_id) or ref.study
        confirmed = self._confirmed.get(image_id)
        if confirmed is not None:
            info[DIAGNOSIS_FIELD] = confirmed.label
            info["confirmed_by"] = (confirmed.observer or "").rstrip("^")
            if confirmed.roi is not None:
                info["roi"] = confirmed.roi
        return info

    def is_confirmed(self, image_id: str) -> bool:
        return image_id in self._confirmed

    def get_labeled_images(self, label_tag: Optional[str] = None, labels: Optional[List[str]] = None) -> List[str]:
        return [i for i in self.list_images() if self.is_confirmed(i)]

    def get_unlabeled_images(self, label_tag: Optional[str] = None, labels: Optional[List[str]] = None) -> List[str]:
        return [i for i in self.list_images() if not self.is_confirmed(i)]

    def datalist(self) -> List[Dict[str, Any]]:
        return [{"image": self.get_image_uri(i), "label": CLASS_NAMES.index(self._confirmed[i].label)}
                for i in self.get_labeled_images()]

    def get_labels_by_image_id(self, image_id: str) -> Dict[str, str]:
        return {}

    def get_label_by_image_id(self, image_id: str, tag: str) -> str:
        return ""

    def get_label(self, label_id: str, label_tag: str, params=None) -> Any:
        raise LabelNotFoundException(_RESULTS_IN_ARCHIVE)

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        raise LabelNotFoundException(_RESULTS_IN_ARCHIVE)

    def get_label_info(self, label_id: str, label_tag: str) -> Dict[str, Any]:
        raise LabelNotFoundException(_RESULTS_IN_ARCHIVE)

    # --------------------------------------------------------------------------- writing
    def _source(self, ref: FrameRef):
        import pydicom

        return pydicom.dcmread(str(self._instance_path(ref)), stop_before_pixels=True, force=True)

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> None:
        info = validate_image_info(info)
        if info.get(DIAGNOSIS_FIELD) is None:
            raise InvalidRequestError("the archive keeps confirmed diagnoses only: give {\"diagnosis\": \"benign\" or "
                                      "\"malignant\"} (and optionally \"roi\")")
        self.confirm(image_id, info[DIAGNOSIS_FIELD], info.get("roi"), str(info.get("user") or "unknown"))

    def confirm(self, image_id: str, diagnosis: str, roi: Optional[list], user: str) -> str:
        """Store a confirmation SR of ``diagnosis`` by ``user`` in the archive; returns its UID."""
        ref = self.ref(image_id)
        sr = reports.confirmed_sr(self._source(ref), ref.frame, diagnosis, roi, user, self.software_version)
        self.client.store([sr])
        finding = reports.Finding(ref.sop, ref.frame, diagnosis, roi, observer=user, kind="confirmed",
                                  when=f"{sr.ContentDate}{sr.ContentTime}")
        with self._lock:
            self._confirmed[image_id] = finding
        logger.info("confirmed %s as %s by %s (SR %s)", image_id, diagnosis, user, sr.SOPInstanceUID)
        return str(sr.SOPInstanceUID)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        info = dict(label_info or {})
        if label_tag == DefaultLabelTag.FINAL.value and info.get(DIAGNOSIS_FIELD) is not None:
            info = validate_image_info(info)
            self.confirm(image_id, info[DIAGNOSIS_FIELD], info.get("roi"), str(info.get("user") or "unknown"))
            return image_id
        result = info.get("params")
        if label_tag == DefaultLabelTag.ORIGINAL.value and isinstance(result, dict) and "model" in result:
            self.store_result(image_id, result, label_filename)
            return image_id
        raise InvalidRequestError("the archive keeps classification results (batch inference) and confirmed "
                                  "diagnoses (tag 'final' with a diagnosis); other labels are not stored")

    def has_result(self, image_id: str, model: str) -> bool:
        ref = self.ref(image_id)
        uid = reports.result_uid("sr", model, ref.sop, ref.frame)
        return bool(self.client.search_instances(study=ref.study, filters={"SOPInstanceUID": uid}))

    def store_result(self, image_id: str, result: Dict[str, Any], mask_file) -> bool:
        """Store the result SR and the saliency of ``image_id`` unless this model's are there
        already (``False`` then); ``mask_file`` is the returned mask (a path or a binary file).
        Both objects are made before anything is sent; the saliency goes first: an SR in the
        archive means both are."""
        import pydicom

        model = str(result["model"])
        if self.has_result(image_id, model):
            return False
        ref = self.ref(image_id)
        source = self._source(ref)
        mask_ds = pydicom.dcmread(mask_file, force=True)
        saliency = reports.saliency_object(source, ref.frame, mask_ds.pixel_array, model, self.software_version,
                                           sc_mask=mask_ds)
        sr = reports.result_sr(source, ref.frame, result, self.software_version)
        self.client.store([saliency])
        self.client.store([sr])
        logger.info("stored the result of %s for %s in the archive", model, image_id)
        return True

    def keep_result(self, image_path: str, mask: bytes, result: Dict[str, Any]) -> bool:
        """A finished single classification of the file ``image_path`` (``classify_nodule``'s
        hook): when that file is an archive frame of the cache (``get_image_uri``), its result
        and mask are queued to be written (see :mod:`.results`) and this returns at once; an
        uploaded file is no archive frame and nothing is written (``False``). ``mask`` is the
        mask file's bytes in the frame's own format (a DICOM Secondary Capture)."""
        image_id = self.cache.image_id_of(image_path)
        if image_id is None or not isinstance(result, dict) or "model" not in result:
            return False
        return self.results.submit(image_id, copy.deepcopy(result), mask)

    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        import pydicom
        from pydicom.errors import InvalidDicomError

        try:
            ds = pydicom.dcmread(image_filename, force=True)  # force: also a file without the preamble
            ds.SOPInstanceUID, ds.StudyInstanceUID, ds.PixelData  # noqa: B018 (all present, or AttributeError)
        except (InvalidDicomError, OSError, ValueError, AttributeError, TypeError):
            raise InvalidRequestError("only ultrasound DICOM can be added to the archive") from None
        if str(ds.get("SOPClassUID", "")) not in US_CLASSES:
            raise InvalidRequestError("only ultrasound DICOM (US Image or US Multi-frame Image Storage) can be added")
        self.client.store([ds])
        self._listed_at = 0.0
        sop = str(ds.SOPInstanceUID)
        return sop if int(ds.get("NumberOfFrames", 1) or 1) == 1 else f"{sop}-f1"

    def remove_image(self, image_id: str) -> None:
        raise InvalidRequestError(_READ_ONLY)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        raise InvalidRequestError(_READ_ONLY)

    def update_label_info(self, label_id: str, label_tag: str, info: Dict[str, Any]) -> None:
        raise InvalidRequestError(_READ_ONLY)

    def get_dataset_archive(self, limit_cases: Optional[int]) -> str:
        raise InvalidRequestError("the dataset lives in the archive: retrieve it from there (DICOMweb)")

    # ---------------------------------------------------------------------------- status
    def status(self) -> Dict[str, Any]:
        """Counts from what is known; a stale listing is refreshed in the background, so
        ``/info`` never waits for the archive."""
        if time.time() - self._listed_at > self.refresh_s and not self._refreshing.locked():
            threading.Thread(target=self._refresh_quietly, daemon=True, name="archive-refresh").start()
        with self._lock:
            counts = {name: 0 for name in CLASS_NAMES}
            for f in self._confirmed.values():
                counts[f.label] += 1
            total, completed = len(self._refs), sum(1 for i in self._confirmed if i in self._refs)
            return {"total": total, "completed": completed, "diagnoses": counts, "label_tags": {},
                    "archive": {"url": self.client.url, "reachable": self._error is None and self._listed_at > 0,
                                "error": self._error, "listed_at": round(self._listed_at, 1),
                                "cache_mb": round(self.cache.size() / (1 << 20), 1),
                                "cache_limit_mb": self.cache.max_bytes >> 20,
                                "results": self.results.status()}}

    def _refresh_quietly(self) -> None:
        try:
            self.refresh()
        except ArchiveError as e:
            logger.warning("archive listing failed: %s", e.detail)
        except Exception as e:  # the background thread must not die with a traceback in the log
            logger.warning("archive listing failed: %s", e)

    def json(self):
        ids = self.list_images()
        return {"name": self._name, "archive": self.client.url,
                "objects": {i: {"image": {"info": self.get_image_info(i)}, "labels": {}} for i in ids}}

    def name(self) -> str:
        return self._name

    def set_name(self, name: str):
        self._name = name

    def description(self) -> str:
        return self._description

    def set_description(self, description: str):
        self._description = description


def _value(row: dict, tag: str) -> str:
    """The first value of ``tag`` in a DICOM JSON row, or ``""``."""
    return str((row.get(tag, {}).get("Value") or [""])[0])


_RESULTS_IN_ARCHIVE = ("results of archive images are stored in the archive itself (SR and SEG in the study); "
                       "read them from there")
_READ_ONLY = "this server does not delete or change the archive's objects"

__all__ = ["ArchiveDatastore", "ArchiveNotFound"]
