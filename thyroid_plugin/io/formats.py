"""The accepted image formats: file-name suffixes, the mask written for each, the image id of a
file name, and detection of a file's format from its content.

This is the one table of suffixes in the project: the datastore's patterns, the upload names the
server keeps, folder datalists and the CLI's output names all derive from :data:`SUFFIXES`. A
file's *format* is always decided by its content (:func:`detect_format`); its suffix only
decides which files are looked at and how an image id is cut from a name.
"""

from __future__ import annotations

import gzip
import os
from pathlib import PurePath

from ..errors import InvalidImageError
from .image import PathLike, UltrasoundImage

__all__ = [
    "IMAGE_PATTERNS",
    "IMAGE_SUFFIXES",
    "MASK_SUFFIX",
    "SUFFIXES",
    "detect_format",
    "image_id",
    "image_suffix",
    "mask_suffix",
]

#: format -> accepted file-name suffixes (lower case; the first is the one masks are written with)
SUFFIXES: dict[str, tuple[str, ...]] = {
    "png": (".png",),
    "jpeg": (".jpg", ".jpeg"),
    "bmp": (".bmp",),
    "tiff": (".tif", ".tiff"),
    "dicom": (".dcm",),
    "nifti": (".nii.gz", ".nii"),
    "nrrd": (".nrrd",),
}
#: every accepted suffix, in the order of :data:`SUFFIXES`
IMAGE_SUFFIXES: tuple[str, ...] = tuple(s for suffixes in SUFFIXES.values() for s in suffixes)
#: glob patterns of :data:`IMAGE_SUFFIXES` (``*.png``, ...), as MONAI Label's datastore takes them
IMAGE_PATTERNS: tuple[str, ...] = tuple(f"*{s}" for s in IMAGE_SUFFIXES)
#: format -> suffix of the mask written for a frame of that format (JPEG frames get a lossless PNG)
MASK_SUFFIX: dict[str, str] = {fmt: SUFFIXES["png" if fmt == "jpeg" else fmt][0] for fmt in SUFFIXES}
#: raster formats -> the name PIL reads and writes them by
PIL_FORMAT: dict[str, str] = {"png": "PNG", "jpeg": "JPEG", "bmp": "BMP", "tiff": "TIFF"}

_LONGEST_FIRST = tuple(sorted(IMAGE_SUFFIXES, key=len, reverse=True))


def image_suffix(name: PathLike) -> str:
    """The accepted suffix a file name ends with, as listed in :data:`SUFFIXES` (lower case;
    ``.nii.gz`` whole), or ``""``. Case-insensitive: ``X.NII.GZ`` -> ``.nii.gz``."""
    lower = PurePath(name).name.lower()
    return next((s for s in _LONGEST_FIRST if lower.endswith(s) and len(lower) > len(s)), "")


def image_id(path: PathLike) -> str:
    """The image id of a file: its base name without the accepted suffix (``x.nii.gz`` -> ``x``,
    ``a.b.PNG`` -> ``a.b``); for another suffix, the name without its last suffix."""
    name = PurePath(path).name
    suffix = image_suffix(name)
    return name[: len(name) - len(suffix)] if suffix else PurePath(name).stem


def mask_suffix(image: UltrasoundImage) -> str:
    """File suffix of the mask written for ``image`` (``.png``, ``.nrrd``, ...)."""
    return MASK_SUFFIX[image.format]


def detect_format(path: PathLike) -> str:
    """The format of a file from its first bytes (``png``, ``jpeg``, ..., ``nrrd``).

    Raises:
        InvalidImageError: empty, unreadable or not a supported image.
    """
    try:
        with open(path, "rb") as fp:
            head = fp.read(352)
    except OSError as e:
        raise InvalidImageError(f"cannot read {os.path.basename(str(path))}: {e.strerror}") from None
    if not head:
        raise InvalidImageError("the file is empty")
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"BM"):
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head.startswith(b"NRRD000"):
        return "nrrd"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x1f\x8b"):
        try:
            with gzip.open(path, "rb") as gz:
                inner = gz.read(352)
        except (OSError, EOFError):
            raise InvalidImageError("the file is a damaged gzip stream") from None
        if _is_nifti_header(inner):
            return "nifti"
        raise InvalidImageError("a gzip file that does not hold a NIfTI image")
    if _is_nifti_header(head):
        return "nifti"
    if _looks_like_raw_dicom(head):
        return "dicom"
    raise InvalidImageError(
        "not a supported image: expected PNG, JPEG, BMP, TIFF, DICOM, NIfTI or NRRD"
    )


def _is_nifti_header(head: bytes) -> bool:
    # NIfTI-1: sizeof_hdr 348 and magic "n+1"/"ni1" at byte 344; NIfTI-2: 540 and magic at byte 4
    if len(head) >= 348 and head[:4] in (b"\x5c\x01\x00\x00", b"\x00\x00\x01\x5c"):
        return head[344:347] in (b"n+1", b"ni1")
    if len(head) >= 8 and head[:4] in (b"\x1c\x02\x00\x00", b"\x00\x00\x02\x1c"):
        return head[4:7] in (b"n+2", b"ni2")
    return False


def _looks_like_raw_dicom(head: bytes) -> bool:
    # DICOM without the 128-byte preamble starts with a group 0x0008 (or 0x0002) element tag.
    return len(head) >= 8 and head[:2] in (b"\x08\x00", b"\x02\x00") and head[2:4] < b"\x20\x00"
