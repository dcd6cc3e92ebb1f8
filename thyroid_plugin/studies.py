"""The MONAI Label studies folder as the store of confirmed cases.

A *confirmed case* is an image whose datastore info holds ``"diagnosis": "benign" | "malignant"``
(set with ``PUT /datastore/image/info``, or by saving a ``final`` label whose ``params`` carry the
diagnosis). :class:`ConfirmedCasesDatastore` is MONAI Label's local datastore with:

- "labelled" meaning confirmed (so batch inference on labelled/unlabelled images and active
  learning work on diagnoses, not on segmentation files);
- image ids and label tags checked, so no request can read or write outside the studies folder;
- the datastore JSON, images and labels written atomically (a crash leaves the old or the new
  file, never half of one: each file is written under a hidden ``.partial`` name that no image
  pattern matches, flushed, then renamed; leftovers of a crash are removed when the datastore
  opens), the JSON re-read whenever another process (a background batch or training task, the
  import command) changed it, and every change made on the latest version under the datastore's
  file lock;
- images and labels checked to be readable 2D frames, and stored under an extension that fits
  their content (never one taken from the uploaded file name);
- diagnoses validated when they are stored, and no NaN or infinity in any stored info;
- a studies folder that cannot be written refused at once with a one-line
  :class:`StudiesFolderError`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.exception import ImageNotFoundException

from .constants import CLASS_NAMES, DIAGNOSIS_FIELD, label_index
from .errors import ThyroidPluginError, short_repr
from .io import IMAGE_PATTERNS, SUFFIXES, atomic_copy_file, atomic_write_bytes, detect_format, is_partial_file, load_image
from .io import image_id as image_id_of

logger = logging.getLogger(__name__)

__all__ = ["ConfirmedCasesDatastore", "InvalidRequestError", "StudiesFolderError", "check_id", "check_studies_folder",
           "import_collection", "validate_image_info"]

#: letters, digits and ``._-()+ `` (DDTI names like ``100_1(2)``), up to 128 characters, not
#: starting with a dot: no path separators, no ``..``, no NUL.
_ID = re.compile(r"^[A-Za-z0-9_(][A-Za-z0-9._()+\- ]{0,127}$")
_TAG = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


class InvalidRequestError(ThyroidPluginError, ValueError):
    """A request names an invalid image id, tag or info value."""


class StudiesFolderError(ThyroidPluginError, OSError):
    """The studies folder cannot be created, read or written (the message is one line)."""


def check_studies_folder(path: os.PathLike | str, writable: bool = True) -> Path:
    """Create the studies folder if needed and check that files can be written in it.

    Raises:
        StudiesFolderError: it is not a folder, cannot be created, or cannot be written (for
            example its parent is a regular file, the disk is read-only or full).
    """
    folder = Path(path)
    try:
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(20, "it is a file, not a folder")
        if writable:
            folder.mkdir(parents=True, exist_ok=True)
        if not folder.is_dir():
            raise NotADirectoryError(20, "not a folder")
        if writable:
            import tempfile

            fd, probe = tempfile.mkstemp(prefix=".write-probe.", suffix=".partial", dir=folder)
            os.close(fd)
            os.unlink(probe)
        else:
            os.listdir(folder)
    except OSError as e:
        raise StudiesFolderError(f"the studies folder {folder} cannot be used: {_os_reason(e, folder)}") from None
    return folder


def _os_reason(e: OSError, folder) -> str:
    reason = e.strerror or str(e) or type(e).__name__
    if e.filename and os.fspath(e.filename) != os.fspath(folder):
        reason += f" ({e.filename})"
    return reason


def _check_finite(value: Any, what: str = "info") -> None:
    """Refuse NaN and infinity anywhere in a JSON-like value (the datastore file must stay JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidRequestError(f"{what} contains {value!r}; use finite numbers")
    if isinstance(value, Mapping):
        for v in value.values():
            _check_finite(v, what)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_finite(v, what)


def check_id(value: str, what: str = "image id") -> str:
    """Return ``value`` if it is a safe id, else raise :class:`InvalidRequestError`."""
    if not isinstance(value, str) or not _ID.fullmatch(value) or ".." in value or value != value.strip():
        shown = repr(value)[:80]
        raise InvalidRequestError(f"invalid {what} {shown}: use up to 128 letters, digits, spaces and ._-()+, no path separators")
    return value


def check_tag(value: str) -> str:
    if not isinstance(value, str) or not _TAG.fullmatch(value):  # fullmatch: "$" would let "final\n" in
        raise InvalidRequestError(f"invalid label tag {repr(value)[:80]}: use letters, digits, _ and -")
    return value


#: info fields the datastore keeps itself (when the file was stored, under which name)
SERVER_FIELDS = ("ts", "name")


def validate_image_info(info: Mapping[str, Any], shape: Optional[tuple] = None) -> Dict[str, Any]:
    """Check the fields this app reads from image info; returns a normalised copy.

    ``diagnosis`` must be benign/malignant (or null to withdraw it); ``roi`` four finite numbers
    that cover at least 8x8 pixels of the frame (of ``shape`` ``(H, W)`` when given); ``case`` and
    ``centre`` short strings; ``ts`` and ``name`` are the server's (refused).
    """
    if not isinstance(info, Mapping):
        raise InvalidRequestError("info must be a JSON object")
    _check_finite(info)
    kept = sorted(set(info) & set(SERVER_FIELDS))
    if kept:
        raise InvalidRequestError(f"{', '.join(kept)} are kept by the server and cannot be set")
    out = dict(info)
    if DIAGNOSIS_FIELD in out and out[DIAGNOSIS_FIELD] is not None:
        try:
            out[DIAGNOSIS_FIELD] = CLASS_NAMES[label_index(out[DIAGNOSIS_FIELD])]
        except ValueError:
            raise InvalidRequestError(f"diagnosis must be one of {list(CLASS_NAMES)}, got {out[DIAGNOSIS_FIELD]!r}") from None
    if out.get("roi") is not None:
        out["roi"] = _check_roi(out["roi"], shape)
    for key in ("case", "centre"):
        if key in out and out[key] is not None:
            if not isinstance(out[key], (str, int)) or len(str(out[key])) > 128:
                raise InvalidRequestError(f"{key} must be a short string")
            out[key] = str(out[key])
    return out


#: no frame side comes near this many pixels (``roi`` values beyond it are refused)
_MAX_COORDINATE = 1e7


def _check_roi(roi: Any, shape: Optional[tuple]) -> list:
    from .errors import InvalidROIError
    from .transforms import normalize_roi

    if (not isinstance(roi, (list, tuple)) or len(roi) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in roi)):
        raise InvalidRequestError(f"roi must be [x0, y0, x1, y1] in pixels, got {short_repr(roi)}")
    try:
        values = [float(v) for v in roi]
    except OverflowError:
        values = [math.inf]
    if not all(math.isfinite(v) and abs(v) <= _MAX_COORDINATE for v in values):
        raise InvalidRequestError(f"roi values must be pixel positions (at most {_MAX_COORDINATE:.0e}), got {short_repr(roi)}")
    try:
        normalize_roi(values, shape or (int(_MAX_COORDINATE), int(_MAX_COORDINATE)))
    except InvalidROIError as e:
        raise InvalidRequestError(str(e)) from None
    return values


class ConfirmedCasesDatastore(LocalDatastore):
    """MONAI Label's :class:`LocalDatastore` hardened for this app (see the module docstring)."""

    def __init__(self, datastore_path: str, extensions: Sequence[str] = IMAGE_PATTERNS, auto_reload: bool = False,
                 read_only: bool = False) -> None:
        from filelock import FileLock

        check_studies_folder(datastore_path, writable=not read_only)
        self._writer_lock = FileLock(os.path.join(datastore_path, ".writer.lock"))
        if not read_only:
            self._remove_partial_files(datastore_path)
        try:
            super().__init__(datastore_path, extensions=list(extensions), auto_reload=auto_reload, read_only=read_only)
        except OSError as e:
            raise StudiesFolderError(f"the studies folder {datastore_path} cannot be used: {_os_reason(e, datastore_path)}") from None
        except ValueError as e:  # pydantic: the datastore JSON is not what MONAI Label wrote
            raise StudiesFolderError(
                f"the datastore file {self._datastore_config_path} is damaged ({_first_line(e)}); restore it from a backup "
                "or move it away (it is then rebuilt from the image and label files, without their infos)") from None

    def _remove_partial_files(self, root: str) -> None:
        """Delete what interrupted atomic writes left behind (``.<name>.<random>.partial``, and the
        ``.tmp-*`` files of older versions), before MONAI Label's start-up reconciliation could
        take one of them for an image or a label. Runs under both datastore locks, so it never
        removes a file another process is writing right now."""
        from filelock import FileLock

        labels = os.path.join(root, "labels")
        folders = [root, labels]
        if os.path.isdir(labels):
            folders += [e.path for e in os.scandir(labels) if e.is_dir(follow_symlinks=False)]
        with self._writer_lock, FileLock(os.path.join(root, ".lock")):
            for folder in folders:
                if not os.path.isdir(folder):
                    continue
                for entry in os.scandir(folder):
                    if entry.is_file(follow_symlinks=False) and is_partial_file(entry.name):
                        os.unlink(entry.path)
                        logger.warning("removed %s, left behind by an interrupted write", entry.path)

    # ----------------------------------------------------------- one truth: the file on disk
    def _sync(self) -> None:
        """Reload the datastore JSON if another process replaced it since we last read it."""
        # inode, nanoseconds and size: two writes within the file system's timestamp granularity
        # (or one that keeps the mtime) still differ in inode, since every write is a rename
        try:
            ts = _file_stat(self._datastore_config_path)
        except FileNotFoundError:
            return
        if ts != self._config_ts:
            self._init_from_datastore_file()

    def _init_from_datastore_file(self, throw_exception: bool = False) -> None:
        """Read the datastore JSON if it differs from the version in memory (MONAI Label compares
        float ``st_mtime``, which two quick writes can share). The stamp comes from the open file,
        so it is the stamp of the version read, even if the file is replaced meanwhile."""
        from filelock import FileLock
        from monailabel.datastore.local import LocalDatastoreModel

        try:
            with FileLock(self._lock_file), open(self._datastore_config_path, "rb") as fp:
                stamp = _stat_stamp(os.fstat(fp.fileno()))
                if stamp != self._config_ts:
                    model = LocalDatastoreModel.model_validate_json(fp.read())
                    model.base_path = self._datastore_path
                    self._datastore, self._config_ts = model, stamp
        except FileNotFoundError:
            return
        except ValueError as e:
            logger.error("cannot read the datastore file: %s", _first_line(e))
            if throw_exception:
                raise

    def _locked_update(self, method, *args):
        # Our own lock file (MONAI Label's ``.lock`` is taken again inside the base methods, by
        # other FileLock objects, which filelock refuses to nest); one object per datastore, so
        # nested updates in a thread re-enter it.
        with self._writer_lock:
            self._sync()
            try:
                return method(*args)
            except BaseException:
                self._discard_unsaved()  # e.g. the disk is full: forget what was not written
                raise

    def _discard_unsaved(self) -> None:
        """Make the in-memory datastore the file on disk again (changes that were not written
        must not be shown, nor written later by another change)."""
        self._config_ts = 0
        if os.path.exists(self._datastore_config_path):
            self._init_from_datastore_file()
        else:
            self._datastore.objects.clear()

    def list_images(self):
        self._sync()
        return super().list_images()

    def get_image_info(self, image_id: str) -> Dict[str, Any]:
        self._sync()
        if image_id not in self._datastore.objects:
            check_id(image_id)  # an unknown id is {} (MONAI Label's answer) only if it is a valid one
        return super().get_image_info(image_id)

    def get_label_info(self, label_id: str, label_tag: str) -> Dict[str, Any]:
        self._sync()
        check_id(label_id, "label id")
        check_tag(label_tag)
        return super().get_label_info(label_id, label_tag)

    def get_labels_by_image_id(self, image_id: str) -> Dict[str, str]:
        self._sync()
        if image_id not in self._datastore.objects:
            check_id(image_id)
        return super().get_labels_by_image_id(image_id)

    def datalist(self, full_path=True):
        self._sync()
        return super().datalist(full_path)

    def json(self):
        self._sync()
        return super().json()

    # -------------------------------------------------------------------- confirmed = labelled
    def is_confirmed(self, image_id: str) -> bool:
        obj = self._datastore.objects.get(image_id)
        return bool(obj and obj.image.info.get(DIAGNOSIS_FIELD) in CLASS_NAMES)

    def get_labeled_images(self, label_tag: Optional[str] = None, labels: Optional[Sequence[str]] = None):
        self._sync()
        return [k for k in self._datastore.objects if self.is_confirmed(k)]

    def get_unlabeled_images(self, label_tag: Optional[str] = None, labels: Optional[Sequence[str]] = None):
        self._sync()
        return [k for k in self._datastore.objects if not self.is_confirmed(k)]

    def status(self) -> Dict[str, Any]:
        self._sync()
        s = super().status()
        s["completed"] = len(self.get_labeled_images())
        counts = {name: 0 for name in CLASS_NAMES}
        for obj in self._datastore.objects.values():
            d = obj.image.info.get(DIAGNOSIS_FIELD)
            if d in counts:
                counts[d] += 1
        s["diagnoses"] = counts
        return s

    # ------------------------------------------------------------------------ checked requests
    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        if image_id:
            check_id(image_id)
        else:
            image_id = check_id(self._to_id(os.path.basename(image_filename))[0])
        image = load_image(image_filename)  # only readable 2D frames enter the store (InvalidImageError otherwise)
        info = validate_image_info(image_info or {}, image.shape)
        del image
        # the stored file's extension says what it is (else the datastore would not find it
        # again after a restart), whatever the upload was called
        ext = _suffixes_of(image_filename)[0]
        return self._locked_update(self._store_image, image_id, image_filename, ext, info)

    def _store_image(self, image_id: str, src: str, ext: str, info: Dict[str, Any]) -> str:
        logger.info("adding image %s", image_id)
        name = self._filename(image_id, ext)
        old = self._datastore.objects.get(image_id)

        def record() -> None:  # the file is complete on disk: record it, then it takes its name
            info_ = dict(info, ts=int(time.time()), name=name)
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info_, ext=ext))
            self._update_datastore_file()

        atomic_copy_file(src, os.path.join(self._datastore.image_path(), name), before_replace=record)
        if old is not None and old.image.ext != ext:
            _remove_quietly(os.path.join(self._datastore.image_path(), self._filename(image_id, old.image.ext)))
        return image_id

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        check_id(image_id)
        check_tag(label_tag)
        info = dict(label_info or {})
        _check_finite(info, "label info")
        image = self._stored_image(image_id)
        _check_label_fits(load_image(label_filename), image)  # a readable 2D mask on the image's grid
        confirms = info.get(DIAGNOSIS_FIELD) is not None
        info = validate_image_info(info, image.shape)
        del image
        ext = _suffixes_of(label_filename)[0]
        return self._locked_update(self._store_label, image_id, label_filename, label_tag, ext, info, confirms)

    def _store_label(self, image_id: str, src: str, tag: str, ext: str, info: Dict[str, Any], confirms: bool) -> str:
        obj = self._datastore.objects.get(image_id)
        if obj is None:
            raise ImageNotFoundException(f"Image {image_id} not found")
        logger.info("saving label %s of image %s", tag, image_id)
        label_dir = self._datastore.label_path(tag)
        os.makedirs(label_dir, exist_ok=True)
        name = self._filename(image_id, ext)
        old = obj.labels.get(tag)

        def record() -> None:  # the file is complete on disk: record it, then it takes its name
            obj.labels[tag] = DataModel(info=dict(info, ts=int(time.time()), name=name), ext=ext)
            if confirms and tag == DefaultLabelTag.FINAL.value:
                # the diagnosis goes into the image info in the same write: both or neither
                obj.image.info[DIAGNOSIS_FIELD] = info[DIAGNOSIS_FIELD]
                if info.get("roi") is not None:
                    obj.image.info["roi"] = info["roi"]
            self._update_datastore_file()

        atomic_copy_file(src, os.path.join(label_dir, name), before_replace=record)
        if old is not None and old.ext != ext:
            _remove_quietly(os.path.join(label_dir, self._filename(image_id, old.ext)))
        return image_id

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> None:
        check_id(image_id)
        shape = None
        if isinstance(info, Mapping) and info.get("roi") is not None:
            shape = self._stored_image(image_id).shape  # the box must lie on this image
        return self._locked_update(super().update_image_info, image_id, validate_image_info(info, shape))

    def update_label_info(self, label_id: str, label_tag: str, info: Dict[str, Any]) -> None:
        check_id(label_id, "label id")
        check_tag(label_tag)
        info = validate_image_info(info)  # the same rules for diagnosis, roi, ts and name
        return self._locked_update(super().update_label_info, label_id, label_tag, info)

    def _stored_image(self, image_id: str):
        """The stored frame of ``image_id`` (:class:`ImageNotFoundException` if there is none)."""
        self._sync()
        obj = self._datastore.objects.get(image_id)
        if obj is None:
            raise ImageNotFoundException(f"Image {image_id} not found")
        return load_image(os.path.join(self._datastore.image_path(), self._filename(image_id, obj.image.ext)))

    def get_image_uri(self, image_id: str) -> str:
        check_id(image_id)
        self._sync()
        return super().get_image_uri(image_id)

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        check_id(label_id, "label id")
        check_tag(label_tag)
        self._sync()
        return super().get_label_uri(label_id, label_tag)

    def remove_image(self, image_id: str) -> None:
        check_id(image_id)
        return self._locked_update(super().remove_image, image_id)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        check_id(label_id, "label id")
        check_tag(label_tag)
        return self._locked_update(super().remove_label, label_id, label_tag)

    # ---------------------------------------------------------------------------- atomic file
    def _update_datastore_file(self, lock: bool = True) -> None:
        from filelock import FileLock

        def write() -> None:
            self._ignore_event_config = True
            payload = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            atomic_write_bytes(self._datastore_config_path, payload.encode())
            self._config_ts = _file_stat(self._datastore_config_path)

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()


def _check_label_fits(label, image) -> None:
    """A label is a mask of its image: the same pixel grid; a DICOM mask only for a DICOM image
    (it carries the patient and geometry of its source)."""
    if label.shape != image.shape:
        (h, w), (ih, iw) = label.shape, image.shape
        raise InvalidRequestError(f"the label is {w}x{h} pixels, its image {iw}x{ih}: a label must be on the image's "
                                  "pixel grid")
    if label.format == "dicom" and image.format != "dicom":
        raise InvalidRequestError(f"a DICOM label belongs to a DICOM image; this image is {image.format.upper()}: "
                                  "send the mask as PNG or NRRD")


def _stat_stamp(st: os.stat_result) -> tuple:
    return st.st_ino, st.st_mtime_ns, st.st_size


def _file_stat(path: str) -> tuple:
    return _stat_stamp(os.stat(path))


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def _suffixes_of(path: str) -> tuple:
    """File name suffixes that fit the file's content."""
    fmt = detect_format(path)
    if fmt == "nifti":
        with open(path, "rb") as fp:
            return (".nii.gz",) if fp.read(2) == b"\x1f\x8b" else (".nii",)
    return SUFFIXES[fmt]


def _safe_id(name: str, taken: set) -> str:
    base = re.sub(r"[^A-Za-z0-9._()+\- ]", "_", name).strip(" .") or "image"
    if not _ID.match(base[:1]):
        base = f"img_{base}"
    base = base[:120]
    candidate, n = base, 1
    while candidate in taken:
        n += 1
        candidate = f"{base}_{n}"
    return candidate


def import_collection(datalist: Sequence[Mapping[str, Any]], studies: os.PathLike | str, with_diagnosis: bool = True) -> list[str]:
    """Copy the images of ``datalist`` into a studies folder as (confirmed) cases.

    The image id is the file name without extension (made unique and safe); the image info gets
    ``diagnosis`` (unless ``with_diagnosis`` is false), ``case``, ``centre`` and ``roi`` from the
    datalist, and ``source``. Images already present with the same id are left as they are.

    Returns:
        the ids of the imported images.
    """
    studies = check_studies_folder(studies)
    store = ConfirmedCasesDatastore(str(studies))
    taken = set(store.list_images())
    ids = []
    for d in datalist:
        src = Path(d["image"])
        detect_format(src)  # refuse non-images before copying
        stem = image_id_of(src)
        image_id = _safe_id(stem, set())
        if image_id in taken:
            continue
        ext = src.name[len(stem):] if src.name.startswith(stem) else "".join(src.suffixes)
        info: Dict[str, Any] = {"source": str(src), "case": str(d.get("group") or image_id)}
        if d.get("centre"):
            info["centre"] = str(d["centre"])
        if d.get("roi"):
            info["roi"] = list(d["roi"])
        if with_diagnosis and int(d.get("label", -1)) in (0, 1):
            info[DIAGNOSIS_FIELD] = CLASS_NAMES[int(d["label"])]
        tmp_dir = studies / ".import"
        tmp_dir.mkdir(exist_ok=True)
        tmp = tmp_dir / f"{image_id}{ext.lower()}"
        shutil.copyfile(src, tmp)
        try:
            store.add_image(image_id, str(tmp), info)
        finally:
            tmp.unlink(missing_ok=True)
        taken.add(image_id)
        ids.append(image_id)
    shutil.rmtree(studies / ".import", ignore_errors=True)
    return ids
