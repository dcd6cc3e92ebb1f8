"""A MONAI Label studies folder as the store of confirmed cases: the rules and the file layout,
without MONAI Label.

A *confirmed case* is an image whose datastore info holds ``"diagnosis": "benign" | "malignant"``
(set with ``PUT /datastore/image/info``, or by saving a ``final`` label whose ``params`` carry the
diagnosis). This module holds what the datastore checks and how it names files, as plain
functions the library, the app and the CLI share:

- image ids and label tags (:func:`check_id`, :func:`check_tag`): no request can read or write
  outside the studies folder;
- image and label info (:func:`validate_image_info`, :func:`check_label_fits`): diagnoses, boxes
  on the frame, no NaN or infinity;
- the stored suffix of a file from its content (:func:`stored_suffix`), ids for imported files
  (:func:`import_entry`), the leftovers of interrupted atomic writes
  (:func:`remove_partial_files`);
- a studies folder that cannot be used refused at once with a one-line
  :class:`StudiesFolderError` (:func:`check_studies_folder`).

The MONAI Label datastore built on these rules, and the import of collections into a studies
folder, live in :mod:`thyroid_plugin.monailabel_adapter`; reading a studies folder's datalist
without MONAI Label is :func:`thyroid_plugin.data.datalist_from_datastore`.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional

from .constants import CLASS_NAMES, DIAGNOSIS_FIELD, label_index
from .errors import ThyroidPluginError, short_repr
from .io import IMAGE_PATTERNS, SUFFIXES, detect_format, is_partial_file
from .io import image_id as image_id_of

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_PATTERNS", "InvalidRequestError", "StudiesFolderError", "check_finite", "check_id", "check_label_fits",
           "check_studies_folder", "check_tag", "file_stamp", "import_entry", "remove_partial_files",
           "stored_suffix", "studies_folder_error", "validate_image_info"]

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
        raise studies_folder_error(folder, e) from None
    return folder


def studies_folder_error(folder: os.PathLike | str, e: OSError) -> StudiesFolderError:
    """The one-line error for a studies folder that an ``OSError`` makes unusable."""
    reason = e.strerror or str(e) or type(e).__name__
    if e.filename and os.fspath(e.filename) != os.fspath(folder):
        reason += f" ({e.filename})"
    return StudiesFolderError(f"the studies folder {folder} cannot be used: {reason}")


def check_finite(value: Any, what: str = "info") -> None:
    """Refuse NaN and infinity anywhere in a JSON-like value (the datastore file must stay JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidRequestError(f"{what} contains {value!r}; use finite numbers")
    if isinstance(value, Mapping):
        for v in value.values():
            check_finite(v, what)
    elif isinstance(value, (list, tuple)):
        for v in value:
            check_finite(v, what)


def check_id(value: str, what: str = "image id") -> str:
    """Return ``value`` if it is a safe id, else raise :class:`InvalidRequestError`."""
    if not isinstance(value, str) or not _ID.fullmatch(value) or ".." in value or value != value.strip():
        shown = repr(value)[:80]
        raise InvalidRequestError(f"invalid {what} {shown}: use up to 128 letters, digits, spaces and ._-()+, no path separators")
    return value


def check_tag(value: str) -> str:
    """Return ``value`` if it is a valid label tag, else raise :class:`InvalidRequestError`."""
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
    check_finite(info)
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


def check_label_fits(label, image) -> None:
    """A label is a mask of its image: the same pixel grid; a DICOM mask only for a DICOM image
    (it carries the patient and geometry of its source). Both are :class:`~thyroid_plugin.io.Image`."""
    if label.shape != image.shape:
        (h, w), (ih, iw) = label.shape, image.shape
        raise InvalidRequestError(f"the label is {w}x{h} pixels, its image {iw}x{ih}: a label must be on the image's "
                                  "pixel grid")
    if label.format == "dicom" and image.format != "dicom":
        raise InvalidRequestError(f"a DICOM label belongs to a DICOM image; this image is {image.format.upper()}: "
                                  "send the mask as PNG or NRRD")


def file_stamp(path: os.PathLike | str, st: Optional[os.stat_result] = None) -> tuple:
    """What tells two versions of a file apart: inode, modification time in nanoseconds and size
    (two writes within the file system's timestamp granularity, or one that keeps the mtime,
    still differ in inode when every write is a rename). ``st``: a stat of the file already made."""
    st = st if st is not None else os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_size


def stored_suffix(path: os.PathLike | str) -> str:
    """The suffix a stored copy of ``path`` gets: the one that fits its content (never one taken
    from an uploaded file's name), so the datastore finds it again after a restart."""
    fmt = detect_format(path)
    if fmt == "nifti":
        with open(path, "rb") as fp:
            return ".nii.gz" if fp.read(2) == b"\x1f\x8b" else ".nii"
    return SUFFIXES[fmt][0]


def import_entry(item: Mapping[str, Any], with_diagnosis: bool = True) -> tuple[str, Dict[str, Any]]:
    """The image id and image info of one datalist item (``image``, ``label``, ``group``,
    ``centre``, ``roi``) imported into a studies folder.

    The id is the file name without its extension, made safe (characters outside the id rule
    become ``_``); the info gets ``source``, ``case`` (the group, else the id), ``centre`` and
    ``roi`` when given, and ``diagnosis`` from ``label`` 0/1 unless ``with_diagnosis`` is false.
    """
    src = Path(item["image"])
    stem = image_id_of(src)
    image_id = re.sub(r"[^A-Za-z0-9._()+\- ]", "_", stem).strip(" .") or "image"
    if not _ID.match(image_id[:1]):
        image_id = f"img_{image_id}"
    image_id = image_id[:120]
    info: Dict[str, Any] = {"source": str(src), "case": str(item.get("group") or image_id)}
    if item.get("centre"):
        info["centre"] = str(item["centre"])
    if item.get("roi"):
        info["roi"] = list(item["roi"])
    if with_diagnosis and int(item.get("label", -1)) in (0, 1):
        info[DIAGNOSIS_FIELD] = CLASS_NAMES[int(item["label"])]
    return image_id, info


def remove_partial_files(folders: Iterable[os.PathLike | str]) -> list[str]:
    """Delete what interrupted atomic writes left in ``folders`` (``.<name>.<random>.partial``,
    and the ``.tmp-*`` files of older versions; not recursive). The caller holds whatever lock
    keeps other writers out of these folders. Returns the removed paths."""
    removed = []
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        for entry in os.scandir(folder):
            if entry.is_file(follow_symlinks=False) and is_partial_file(entry.name):
                os.unlink(entry.path)
                logger.warning("removed %s, left behind by an interrupted write", entry.path)
                removed.append(entry.path)
    return removed
