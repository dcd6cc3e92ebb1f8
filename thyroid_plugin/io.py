"""Read 2D ultrasound frames with their geometry, and write masks back on the same grid.

Supported inputs (detected from the file's content, not its name):

- raster images: PNG, JPEG, BMP, TIFF (gray, gray+alpha, palette, RGB, RGBA, 16-bit gray);
- DICOM: single- and multi-frame (``frame`` chooses one), MONOCHROME1/2, RGB, YBR_FULL(_422),
  PALETTE COLOR, uncompressed or compressed as far as pydicom's handlers allow;
- NIfTI (``.nii``, ``.nii.gz``) and NRRD (``.nrrd``, attached header) holding one slice, scalar or
  RGB, as 3D Slicer saves a 2D frame.

Geometry convention: ``affine`` is the 4x4 matrix that maps a voxel index ``(i, j, k, 1)`` to
LPS patient coordinates in millimetres, where ``i`` is the column (x, image width), ``j`` the
row (y, image height) and ``k`` the slice. ``array[j, i]`` is the pixel at index ``(i, j)``.
Raster images have the identity (1 mm pixels at the origin), like ITK and 3D Slicer assume.
"""

from __future__ import annotations

import copy
import datetime
import gzip
import io as _io
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from .errors import ImageTooLargeError, InvalidImageError, client_text

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "UltrasoundImage",
    "PARTIAL_SUFFIX",
    "atomic_copy_file",
    "atomic_write_bytes",
    "atomic_write_json",
    "is_partial_file",
    "detect_format",
    "load_image",
    "mask_suffix",
    "write_mask",
]

PathLike = Union[str, os.PathLike]

#: largest frame accepted (width x height x frames), checked before any pixel is decoded.
DEFAULT_MAX_PIXELS = 40_000_000
_MIN_SIDE = 8
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_RASTER = {"png": "PNG", "jpeg": "JPEG", "bmp": "BMP", "tiff": "TIFF"}
_MASK_SUFFIX = {"png": ".png", "jpeg": ".png", "bmp": ".bmp", "tiff": ".tif", "dicom": ".dcm", "nifti": ".nii.gz", "nrrd": ".nrrd"}


@dataclass
class UltrasoundImage:
    """One 2D frame as stored, with the geometry needed to put a mask back on its grid.

    Attributes:
        array: ``(H, W)`` gray or ``(H, W, 3)`` RGB pixels, dtype as stored.
        affine: ``(4, 4)`` voxel index ``(i=column, j=row, k)`` -> LPS millimetres.
        format: one of ``png, jpeg, bmp, tiff, dicom, nifti, nrrd``.
        path: the file it came from, if any.
        header: format-specific details a writer needs (NRRD header, NIfTI header, DICOM dataset).
    """

    array: np.ndarray
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    format: str = "png"
    path: Optional[str] = None
    header: dict = field(default_factory=dict, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)``."""
        return int(self.array.shape[0]), int(self.array.shape[1])

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Pixel spacing along ``(i, j, k)`` in mm."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def origin(self) -> tuple[float, float, float]:
        """LPS position of pixel ``(0, 0)`` in mm."""
        return tuple(float(v) for v in self.affine[:3, 3])

    @property
    def direction(self) -> np.ndarray:
        """``(3, 3)`` unit direction cosines; column ``n`` is the direction of index axis ``n``."""
        return self.affine[:3, :3] / np.asarray(self.spacing)

    def to_float(self) -> np.ndarray:
        """``(C, H, W)`` float32 in ``[0, 1]`` with ``C = 3`` (gray repeated)."""
        return to_network_channels(self.array)


def to_network_channels(array: np.ndarray) -> np.ndarray:
    """``(H, W)`` or ``(H, W, 3)`` pixels -> ``(3, H, W)`` float32 in ``[0, 1]``.

    8-bit data is divided by 255; other types are scaled by the frame's own min and max. Each
    channel is written straight into the result: no full-size temporary (a 40-megapixel frame
    takes 480 MB here and nothing more).
    """
    a = np.asarray(array)
    if a.dtype == np.uint8:
        lo, span = 0.0, 255.0
    else:
        lo, hi = float(np.min(a)), float(np.max(a))
        span = hi - lo
    planes = [a] * 3 if a.ndim == 2 else [a[..., c] for c in range(a.shape[-1])]
    out = np.empty((len(planes),) + a.shape[:2], dtype=np.float32)
    for c, plane in enumerate(planes):
        if c > 0 and plane is planes[0]:
            out[c] = out[0]
        elif span > 0:
            np.subtract(plane, lo, out=out[c], casting="unsafe")
            out[c] /= span  # a division, as in training: the same float32 values bit for bit
        else:
            out[c] = 0.0
    return out


# ----------------------------------------------------------------------------------------- detect
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


# ------------------------------------------------------------------------------------------- load
def load_image(path: PathLike, frame: Optional[int] = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> UltrasoundImage:
    """Read one 2D ultrasound frame.

    Args:
        path: the file.
        frame: for multi-frame DICOM (and multi-page TIFF), the 0-based frame to read; default
            the first.
        max_pixels: refuse frames larger than this (width x height x frames), checked from the
            header before decoding, so a decompression bomb is never expanded.

    Raises:
        InvalidImageError: with a one-line reason (corrupt, unsupported, 3D volume, too large,
            too small, frame out of range).
    """
    path = os.fspath(path)
    fmt = detect_format(path)
    try:
        if fmt in _RASTER:
            image = _load_raster(path, fmt, frame, max_pixels)
        elif fmt == "dicom":
            image = _load_dicom(path, frame, max_pixels)
        elif fmt == "nifti":
            image = _load_nifti(path, max_pixels)
        else:
            image = _load_nrrd(path, max_pixels)
    except InvalidImageError:
        raise
    except MemoryError:
        raise ImageTooLargeError("the image is too large to decode") from None
    except Exception as e:  # any decoder failure on a damaged file is the file's fault
        # no server paths, temporary file names or object addresses in messages
        detail = client_text(_first_line(e).replace(path, "the file").replace(os.path.basename(path), "the file"))
        raise InvalidImageError(f"cannot decode this {fmt.upper()} file ({type(e).__name__}: {detail})") from None
    image.path = path
    _check_frame(image)
    return image


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else "no detail"


def _check_size(n_pixels: int, max_pixels: int, what: str = "image") -> None:
    if n_pixels > max_pixels:
        raise ImageTooLargeError(f"the {what} has {n_pixels} pixels, more than the limit of {max_pixels}")


#: decoded pixel data may take at most this many bytes per allowed pixel (``max_pixels``): 160 MB
#: at the default, enough for the largest RGB or 32-bit frame, not for a compressed volume of
#: 64-bit values that claims few enough pixels
_BYTES_PER_PIXEL = 4


def _check_bytes(n_bytes: int, max_pixels: int) -> None:
    """Refuse, from the header, data whose decoded size exceeds the limit (a small compressed
    file that would expand to gigabytes)."""
    limit = _BYTES_PER_PIXEL * max_pixels
    if n_bytes > limit:
        raise ImageTooLargeError(f"the image would take {n_bytes / 1e6:.0f} MB once decoded, more than the limit of "
                                 f"{limit / 1e6:.0f} MB")


def _count(shape) -> int:
    """Number of values of an array shape read from a header (Python integers: no overflow)."""
    import math

    shape = [int(s) for s in shape]
    if not shape or any(s <= 0 for s in shape):
        raise InvalidImageError(f"the header declares an invalid size {shape}")
    return math.prod(shape)


#: NRRD type names (the spec's spellings) -> numpy type codes
_NRRD_TYPES = {
    **dict.fromkeys(("signed char", "int8", "int8_t"), "i1"),
    **dict.fromkeys(("uchar", "unsigned char", "uint8", "uint8_t"), "u1"),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t"), "i2"),
    **dict.fromkeys(("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"), "u2"),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t"), "i4"),
    **dict.fromkeys(("uint", "unsigned int", "uint32", "uint32_t"), "u4"),
    **dict.fromkeys(("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
                     "int64_t"), "i8"),
    **dict.fromkeys(("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"), "u8"),
    "float": "f4",
    "double": "f8",
}


def _nrrd_dtype(header: dict) -> np.dtype:
    kind = str(header.get("type", "")).strip().lower()
    if kind not in _NRRD_TYPES:
        raise InvalidImageError(f"unsupported NRRD pixel type {kind[:40]!r}")
    dtype = np.dtype(_NRRD_TYPES[kind])
    if dtype.itemsize > 1:
        dtype = dtype.newbyteorder(">" if str(header.get("endian", "little")).lower() == "big" else "<")
    return dtype


def _check_frame(image: UltrasoundImage) -> None:
    a = image.array
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] != 3):
        raise InvalidImageError(f"expected a gray or RGB 2D frame, got pixel array of shape {a.shape}")
    if min(a.shape[:2]) < _MIN_SIDE:
        raise InvalidImageError(f"the frame is {a.shape[1]}x{a.shape[0]} pixels; at least {_MIN_SIDE}x{_MIN_SIDE} is needed")
    if not np.issubdtype(a.dtype, np.number) and a.dtype != np.bool_:
        raise InvalidImageError(f"unsupported pixel type {a.dtype}")
    if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
        raise InvalidImageError("the image contains NaN or infinite values")
    _check_geometry(np.asarray(image.affine, dtype=float))


def _check_geometry(affine: np.ndarray) -> None:
    """Finite origin, spacing and directions, and three independent axes: a mask written back and
    the geometry in a JSON answer (which has no NaN) depend on it."""
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise InvalidImageError("the image's geometry (origin, spacing or directions) has NaN or infinite values")
    axes = affine[:3, :3]
    lengths = np.linalg.norm(axes, axis=0)
    if np.any(lengths <= 0) or abs(np.linalg.det(axes)) <= 1e-9 * float(np.prod(lengths)):
        raise InvalidImageError("the image's geometry is singular (a zero pixel spacing or parallel directions)")


def _load_raster(path: str, fmt: str, frame: Optional[int], max_pixels: int) -> UltrasoundImage:
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(path)  # reads the header only
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageTooLargeError("the image declares more pixels than allowed (decompression bomb)") from None
        with img:
            _check_size(img.width * img.height, max_pixels)
            n_frames = getattr(img, "n_frames", 1)
            if frame is not None:
                if not 0 <= frame < n_frames:
                    raise InvalidImageError(f"frame {frame} requested, the file has {n_frames}")
                img.seek(frame)
            mode = img.mode
            if mode in ("1", "L", "P", "LA", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "I;16B", "I;16L", "I", "F"):
                if mode in ("1", "L", "I;16", "I;16B", "I;16L", "I", "F", "RGB"):  # RGB: no converted copy
                    array = np.array(img)
                elif mode == "LA":
                    array = np.array(img.convert("L"))
                elif mode in ("P", "PA"):
                    rgb = img.convert("RGB")
                    array = np.array(rgb)
                    if _is_gray_rgb(array):
                        array = np.ascontiguousarray(array[..., 0])
                else:
                    array = np.array(img.convert("RGB"))
            else:
                raise InvalidImageError(f"unsupported {fmt.upper()} pixel mode {mode}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    if array.dtype == np.int32 and array.size and array.min() >= 0 and array.max() <= 65535:
        array = array.astype(np.uint16)
    return UltrasoundImage(array=array, affine=np.eye(4), format=fmt, header={"n_frames": n_frames})


def _is_gray_rgb(array: np.ndarray) -> bool:
    return array.ndim == 3 and np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2])


def _load_dicom(path: str, frame: Optional[int], max_pixels: int) -> UltrasoundImage:
    import pydicom

    _check_deflated_dicom(path, max_pixels)
    ds = pydicom.dcmread(path, force=True)
    if "PixelData" not in ds:
        raise InvalidImageError("the DICOM file has no pixel data (not an image object)")
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if rows <= 0 or cols <= 0 or n_frames <= 0:
        raise InvalidImageError("the DICOM file has no valid Rows/Columns/NumberOfFrames")
    _check_size(rows * cols * n_frames, max_pixels)
    samples = max(1, int(ds.get("SamplesPerPixel", 1) or 1))
    bits = max(8, int(ds.get("BitsAllocated", 8) or 8))
    _check_bytes(rows * cols * n_frames * samples * ((bits + 7) // 8), max_pixels)
    if frame is not None and not 0 <= frame < n_frames:
        raise InvalidImageError(f"frame {frame} requested, the DICOM file has {n_frames}")
    index = frame or 0
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(ds.get("SamplesPerPixel", 1))
    pixels = ds.pixel_array
    if n_frames > 1:
        pixels = pixels[index]
    if photometric.startswith("YBR") and samples == 3:
        from pydicom.pixel_data_handlers.util import convert_color_space

        # pydicom leaves YBR data as decoded; JPEG-baseline data it may already have converted
        if not _dicom_already_rgb(ds):
            pixels = convert_color_space(pixels, photometric, "RGB")
    elif photometric == "PALETTE COLOR":
        from pydicom.pixel_data_handlers.util import apply_color_lut

        pixels = apply_color_lut(pixels, ds)
        if pixels.dtype != np.uint8:
            pixels = (pixels // 257).astype(np.uint8)
    elif photometric == "MONOCHROME1":
        pixels = pixels.max() + pixels.min() - pixels if pixels.size else pixels
    if pixels.ndim == 3 and pixels.shape[2] == 4:
        pixels = pixels[..., :3]
    array = np.ascontiguousarray(pixels)
    affine = _dicom_affine(ds, index)
    return UltrasoundImage(array=array, affine=affine, format="dicom", header={"dataset": ds, "frame": index})


_DEFLATED_EXPLICIT_VR_LE = b"1.2.840.10008.1.2.1.99"
#: file meta elements whose length field has 4 bytes (after 2 reserved ones)
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


def _check_deflated_dicom(path: str, max_pixels: int) -> None:
    """Refuse a Deflated Explicit VR Little Endian dataset that inflates past the largest allowed
    frame: pydicom inflates the whole dataset while reading it, before Rows and Columns can be
    checked, so a few hundred bytes could take gigabytes. Inflating here only counts, in 1 MB
    steps, and stops at the limit."""
    with open(path, "rb") as fh:
        if fh.read(132)[128:132] != b"DICM":
            return  # no file meta: the dataset cannot be deflated
        syntax = None
        while True:  # the group 0002 elements (explicit VR little endian), each at least 8 bytes
            head = fh.read(8)
            if len(head) < 8 or head[:2] != b"\x02\x00":
                fh.seek(-len(head), os.SEEK_CUR)
                break
            vr = head[4:6]
            if vr in _LONG_VRS:
                extra = fh.read(4)
                length = int.from_bytes(extra, "little") if len(extra) == 4 else 0
            else:
                length = int.from_bytes(head[6:8], "little")
            value = fh.read(min(length, 256)) if head[2:4] == b"\x10\x00" else b""
            if value:
                syntax = value.rstrip(b"\x00 ")
            fh.seek(length - len(value), os.SEEK_CUR)
        if syntax == _DEFLATED_EXPLICIT_VR_LE:
            _bounded_decompress(fh, "deflate", _BYTES_PER_PIXEL * max_pixels + _DECODE_SLACK, keep=False)


def _dicom_already_rgb(ds) -> bool:
    """Whether ``ds.pixel_array`` already turned YCbCr pixels into RGB.

    pydicom 3 converts when decoding. pydicom 2 returns the pixels in the colour space they were
    encoded in, except that its GDCM handler converts JPEG baseline; its Pillow handler keeps
    YCbCr (``draft("YCbCr")``), and so does pylibjpeg.
    """
    import pydicom

    if int(pydicom.__version__.split(".")[0]) >= 3:
        return True
    ts = str(getattr(ds.file_meta, "TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    if ts != "1.2.840.10008.1.2.4.50":
        return False
    for handler in pydicom.config.pixel_data_handlers:  # the handler pydicom picks: the first that can
        try:
            if handler.is_available() and handler.supports_transfer_syntax(ts):
                return handler.__name__.endswith("gdcm_handler")
        except Exception:
            continue
    return False


def _dicom_affine(ds, frame: int) -> np.ndarray:
    def _get(name, group=None):
        # per-frame, then shared functional groups (enhanced multi-frame objects), then top level
        for seq_name in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
            seq = ds.get(seq_name)
            if seq:
                item = seq[frame] if seq_name.startswith("Per") and len(seq) > frame else seq[0]
                sub = item.get(group) if group else None
                if sub:
                    value = sub[0].get(name)
                    if value is not None:
                        return value
        return ds.get(name)

    spacing = _get("PixelSpacing", "PixelMeasuresSequence") or ds.get("ImagerPixelSpacing")
    row_spacing = col_spacing = 1.0
    if spacing is not None and len(spacing) == 2:
        row_spacing, col_spacing = float(spacing[0]), float(spacing[1])
    else:
        regions = ds.get("SequenceOfUltrasoundRegions")
        if regions:
            r = regions[0]
            # physical units code 3 = cm
            if int(r.get("PhysicalUnitsXDirection", 0)) == 3 and int(r.get("PhysicalUnitsYDirection", 0)) == 3:
                col_spacing = abs(float(r.get("PhysicalDeltaX", 0.1))) * 10.0 or 1.0
                row_spacing = abs(float(r.get("PhysicalDeltaY", 0.1))) * 10.0 or 1.0
    orientation = _get("ImageOrientationPatient", "PlaneOrientationSequence")
    position = _get("ImagePositionPatient", "PlanePositionSequence")
    row_cos, col_cos = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    if orientation is not None and len(orientation) == 6:
        row_cos = np.array([float(v) for v in orientation[:3]])
        col_cos = np.array([float(v) for v in orientation[3:]])
    normal = np.cross(row_cos, col_cos)
    thickness = float(ds.get("SliceThickness", 1.0) or 1.0)
    affine = np.eye(4)
    affine[:3, 0] = row_cos * col_spacing
    affine[:3, 1] = col_cos * row_spacing
    affine[:3, 2] = normal * thickness
    if position is not None and len(position) == 3:
        affine[:3, 3] = [float(v) for v in position]
    return affine


def _load_nifti(path: str, max_pixels: int) -> UltrasoundImage:
    import nibabel as nib

    img = nib.load(path)
    shape = tuple(int(s) for s in img.shape)
    n_values = _count(shape)
    _check_size(n_values, max_pixels * 3)
    slope, inter = img.header.get_slope_inter()
    scaled = slope is not None and (slope != 1 or (inter or 0) != 0)
    _check_bytes(n_values * max(img.get_data_dtype().itemsize, 8 if scaled else 0), max_pixels)
    data = np.asanyarray(img.dataobj)
    if data.dtype.names and set("RGB").issubset(set(data.dtype.names)):  # RGB24 / RGBA32
        data = np.stack([data["R"], data["G"], data["B"]], axis=-1)
        shape = data.shape
    rgb = False
    if len(shape) >= 4 and shape[-1] == 3 and all(s == 1 for s in shape[2:-1]):
        rgb = True
        data = data.reshape(shape[0], shape[1], 3)
    else:
        extra = [s for s in shape[2:]]
        if any(s != 1 for s in extra):
            raise InvalidImageError(f"expected a single 2D frame, got a volume of shape {shape}")
        data = data.reshape(shape[0], shape[1])
    # NIfTI stores data[i, j]; the frame is array[j, i]
    array = np.ascontiguousarray(np.swapaxes(data, 0, 1))
    if array.dtype.kind == "f" and not rgb:
        array = array.astype(np.float32)
    affine = _LPS_FROM_RAS @ np.asarray(img.affine, dtype=float)
    return UltrasoundImage(array=array, affine=affine, format="nifti", header={"nifti": img.header.copy(), "shape": shape})


def _load_nrrd(path: str, max_pixels: int) -> UltrasoundImage:
    import nrrd

    with open(path, "rb") as fh:
        header = nrrd.read_header(fh)  # leaves fh at the first byte after the header
        if "data file" in header or "datafile" in header:
            # the data would be read from another file named by the header: any file on the server
            raise InvalidImageError("NRRD files whose data is in a separate file ('data file:') are not accepted; "
                                    "save the image as one .nrrd file")
        sizes = [int(s) for s in header.get("sizes", [])]
        n_values = _count(sizes)
        _check_size(n_values, max_pixels * 3)
        dtype = _nrrd_dtype(header)
        _check_bytes(n_values * dtype.itemsize, max_pixels)
        values = _read_nrrd_values(fh, header, dtype, n_values)
    kinds = [str(k).lower() for k in header.get("kinds", ["domain"] * len(sizes))]
    data = values.reshape(tuple(reversed(sizes))).T  # data[axis0, axis1, ...] in file axis order
    vector_axes = [n for n, k in enumerate(kinds) if k not in ("domain", "space", "time")]
    domain_axes = [n for n in range(len(sizes)) if n not in vector_axes]
    if len(vector_axes) > 1:
        raise InvalidImageError(f"unsupported NRRD layout (kinds {kinds})")
    extra = [sizes[n] for n in domain_axes[2:]]
    if len(domain_axes) < 2 or any(s != 1 for s in extra):
        raise InvalidImageError(f"expected a single 2D frame, got an NRRD volume of sizes {sizes}")
    comps = sizes[vector_axes[0]] if vector_axes else 1
    if comps not in (1, 3, 4):
        raise InvalidImageError(f"expected 1 or 3 components per pixel, the NRRD file has {comps}")
    order = domain_axes[:2] + domain_axes[2:] + vector_axes
    data = np.transpose(data, order)
    data = data.reshape(sizes[domain_axes[0]], sizes[domain_axes[1]], *([comps] if vector_axes else []))
    if comps == 4:
        data = data[..., :3]
    array = np.ascontiguousarray(np.swapaxes(data, 0, 1))
    if comps == 1 and array.ndim == 3:
        array = array[..., 0]
    affine = np.eye(4)
    space = str(header.get("space", "left-posterior-superior")).lower()
    directions = header.get("space directions")
    if directions is not None:
        dirs = np.asarray(directions, dtype=float)
        dirs = dirs[[n for n in range(len(sizes)) if n in domain_axes]]  # rows of the domain axes
        dims = dirs.shape[1]
        for col, row in enumerate(dirs[:3]):
            affine[:dims, col] = row[:3]
        if len(dirs) == 2:  # a 2D NRRD: the slice axis is the normal
            n = np.cross(affine[:3, 0], affine[:3, 1])
            affine[:3, 2] = n / (np.linalg.norm(n) or 1.0)
    origin = header.get("space origin")
    if origin is not None:
        o = np.asarray(origin, dtype=float)
        affine[: len(o), 3] = o[:3]
    if space in ("right-anterior-superior", "ras"):
        affine = _LPS_FROM_RAS @ affine
    elif space not in ("left-posterior-superior", "lps"):
        if directions is not None and space not in ("", "none"):
            raise InvalidImageError(f"unsupported NRRD space {space!r}")
    return UltrasoundImage(array=array, affine=affine, format="nrrd", header={"nrrd": header, "domain_axes": domain_axes, "sizes": sizes})


#: how far a compressed stream (NRRD data, a deflated DICOM dataset) may expand beyond the size its header
#: declares before it is taken for a decompression bomb (trailing padding some writers add)
_DECODE_SLACK = 1 << 20
_NRRD_TEXT = ("ascii", "text", "txt")


def _read_nrrd_values(fh, header: dict, dtype: np.dtype, n_values: int) -> np.ndarray:
    """The ``n_values`` pixel values that follow an attached NRRD header (``fh`` just after it).

    Written here rather than with ``nrrd.read_data`` (pynrrd 1.1), which skips ``line skip``
    lines one ``readline`` at a time (10^12 of them keep a core busy for good) and unpacks a
    whole gzip/bzip2 stream before comparing its size with the header (a 1 kB bomb takes
    gigabytes): here every skip is bounded by the file, and decompression stops as soon as the
    stream grows past what the header promised plus :data:`_DECODE_SLACK`.
    """
    encoding = str(header.get("encoding", "raw")).strip().lower()
    line_skip = int(header.get("line skip", header.get("lineskip", 0)))
    byte_skip = int(header.get("byte skip", header.get("byteskip", 0)))
    if line_skip < 0 or byte_skip < -1:
        raise InvalidImageError(f"invalid NRRD 'line skip' {line_skip} or 'byte skip' {byte_skip}")
    _skip_lines(fh, line_skip)
    n_bytes = n_values * dtype.itemsize
    if encoding == "raw":
        data = _read_raw(fh, byte_skip, n_bytes)
    elif encoding in ("gzip", "gz", "bzip2", "bz2"):
        skip = max(byte_skip, 0)
        data = _bounded_decompress(fh, encoding, skip + n_bytes + _DECODE_SLACK)
        if len(data) < skip + n_bytes:
            raise InvalidImageError(f"the NRRD data holds {max(len(data) - skip, 0)} bytes, its header declares {n_bytes}")
        data = data[-n_bytes:] if byte_skip == -1 else data[skip:skip + n_bytes]
    elif encoding in _NRRD_TEXT:
        if byte_skip == -1:
            raise InvalidImageError("'byte skip: -1' is not valid for text-encoded NRRD data")
        _seek_forward(fh, byte_skip)
        text = fh.read(n_values * 40 + _DECODE_SLACK)  # 40 characters per value is plenty; never the whole file
        values = np.array(text.split()[:n_values], dtype=np.float64)
        if values.size < n_values:
            raise InvalidImageError(f"the NRRD data holds {values.size} values, its header declares {n_values}")
        return values.astype(dtype.newbyteorder("="))
    else:
        raise InvalidImageError(f"unsupported NRRD encoding {encoding[:40]!r}")
    return np.frombuffer(data, dtype, count=n_values).astype(dtype.newbyteorder("="))


def _skip_lines(fh, n: int) -> None:
    """Move past ``n`` newlines, reading the file in 1 MB blocks (never more reads than the file
    has megabytes)."""
    while n > 0:
        block = fh.read(1 << 20)
        if not block:
            raise InvalidImageError("the NRRD header's 'line skip' goes past the end of the file")
        count = block.count(b"\n")
        if count >= n:
            end = int(np.flatnonzero(np.frombuffer(block, np.uint8) == 10)[n - 1]) + 1
            fh.seek(end - len(block), os.SEEK_CUR)
            return
        n -= count


def _remaining(fh) -> int:
    return os.fstat(fh.fileno()).st_size - fh.tell()


def _seek_forward(fh, n_bytes: int) -> None:
    if n_bytes > _remaining(fh):
        raise InvalidImageError("the NRRD header's 'byte skip' goes past the end of the file")
    fh.seek(n_bytes, os.SEEK_CUR)


def _read_raw(fh, byte_skip: int, n_bytes: int) -> bytes:
    if byte_skip == -1:  # the data is the end of the file
        fh.seek(max(_remaining(fh) - n_bytes, 0), os.SEEK_CUR)
    else:
        _seek_forward(fh, byte_skip)
    available = _remaining(fh)
    if available < n_bytes:
        raise InvalidImageError(f"the NRRD file holds {available} bytes of data, its header declares {n_bytes}")
    return fh.read(n_bytes)


def _bounded_decompress(fh, encoding: str, limit: int, keep: bool = True) -> bytearray:
    """Unpack a gzip, bzip2 or raw deflate (``"deflate"``) stream from ``fh`` in 1 MB steps; more
    than ``limit`` bytes out is a decompression bomb (:class:`ImageTooLargeError`), found after at
    most ``limit`` bytes. ``keep=False`` only counts (nothing is kept)."""
    import bz2
    import zlib

    is_zlib = encoding != "bzip2" and encoding != "bz2"
    if is_zlib:
        d = zlib.decompressobj(-zlib.MAX_WBITS if encoding == "deflate" else zlib.MAX_WBITS | 32)
    else:
        d = bz2.BZ2Decompressor()
    out, size, pending = bytearray(), 0, b""
    while not d.eof:
        if not pending and (is_zlib or d.needs_input):
            pending = fh.read(1 << 20)
            if not pending:
                break
        piece = d.decompress(pending, min(1 << 22, limit + 1 - size))  # never 0 ("no limit" to zlib)
        size += len(piece)
        if keep:
            out += piece
        pending = d.unconsumed_tail if is_zlib else b""
        if size > limit:
            raise ImageTooLargeError(f"the compressed data expands to more than the {limit / 1e6:.0f} MB its header "
                                     "allows (a decompression bomb)")
    return out


# ------------------------------------------------------------------------------------------ write
def mask_suffix(image: UltrasoundImage) -> str:
    """File suffix of the mask written for ``image`` (``.png``, ``.nrrd``, ...)."""
    return _MASK_SUFFIX[image.format]


#: suffix of the temporary files the atomic writers below create next to their destination
#: (``.<name>.<random>.partial``): hidden, and matching no image pattern, so a crash that leaves
#: one behind never makes it look like a finished file (see :func:`is_partial_file`).
PARTIAL_SUFFIX = ".partial"


def is_partial_file(name: str) -> bool:
    """Whether a file name is a temporary file of the atomic writers (current or older naming)."""
    base = os.path.basename(name)
    return base.startswith(".") and (base.endswith(PARTIAL_SUFFIX) or base.startswith(".tmp-"))


def _atomic_write(path: PathLike, write, before_replace=None) -> None:
    """Write a file next to ``path`` with ``write(fp)``, flush it to disk, then rename it over
    ``path``: readers (and a restart after a crash) see the old file or the whole new one.
    ``before_replace()``, if given, runs once the new file is complete; if it raises, ``path``
    is left as it was."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)[:96]}.", suffix=PARTIAL_SUFFIX, dir=directory)
    try:
        os.chmod(tmp, 0o666 & ~process_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as fp:
            write(fp)
            fp.flush()
            os.fsync(fp.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def process_umask() -> int:
    """The process's file mode creation mask, read without changing it.

    Linux reports it in ``/proc/self/status`` (``Umask:``, read each time: cheap, and current).
    Without ``/proc`` the only way is to set it and set it back, which for that instant changes
    it for every thread, so that is done once and remembered."""
    global _UMASK_WITHOUT_PROC
    mask = _umask_from_proc()
    if mask is not None:
        return mask
    if _UMASK_WITHOUT_PROC is None:
        _UMASK_WITHOUT_PROC = os.umask(0o022)
        os.umask(_UMASK_WITHOUT_PROC)
    return _UMASK_WITHOUT_PROC


_UMASK_WITHOUT_PROC: Optional[int] = None


def _umask_from_proc() -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fp:
            for line in fp:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _fsync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one.

    The bytes go to a temporary ``.<name>.<random>.partial`` file in the same folder first
    (removed if writing fails, e.g. when the disk is full), are flushed to disk, and the file is
    then renamed over ``path``."""
    _atomic_write(path, lambda fp: fp.write(data))


def atomic_copy_file(src: PathLike, dst: PathLike, before_replace=None) -> None:
    """Copy ``src`` to ``dst`` atomically (like :func:`atomic_write_bytes`, streaming).

    Args:
        before_replace: called when the copy is complete and flushed, just before it replaces
            ``dst`` (e.g. to record it somewhere first); if it raises, ``dst`` is left as it was
            and the copy is removed.
    """
    import shutil

    def write(fp) -> None:
        with open(src, "rb") as source:
            shutil.copyfileobj(source, fp, 1 << 20)

    _atomic_write(dst, write, before_replace)


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats replaced by ``None`` (JSON has no NaN)."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return json_safe(value.item())
    return value


def atomic_write_json(path: PathLike, payload: Any) -> None:
    """Write ``payload`` as indented JSON, atomically; NaN and infinity become ``null``."""
    import json

    atomic_write_bytes(path, json.dumps(json_safe(payload), indent=2).encode())


def write_mask(image: UltrasoundImage, mask: np.ndarray, path: PathLike) -> str:
    """Write a ``(H, W)`` uint8 mask on exactly ``image``'s grid, in ``image``'s format.

    PNG, BMP and TIFF frames get a mask of the same format, JPEG frames a PNG (lossless); NRRD and
    NIfTI frames a file of the same kind with the same size, spacing, origin and directions (a
    single-slice volume where the input was one); DICOM frames a single-frame DICOM image that
    keeps the patient, study, frame of reference and plane geometry of the source frame.

    Args:
        image: the frame the mask belongs to.
        mask: ``(H, W)`` array, cast to uint8.
        path: destination; its suffix should be :func:`mask_suffix` ``(image)``.

    Returns:
        the path written (atomically).
    """
    atomic_write_bytes(path, encode_mask(image, mask))
    return os.fspath(path)


def encode_mask(image: UltrasoundImage, mask: np.ndarray) -> bytes:
    """The bytes of the file :func:`write_mask` writes (for answers that never touch the disk
    durably, e.g. a mask streamed back in an HTTP response)."""
    mask = np.asarray(mask)
    if mask.shape != image.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the image's {image.shape}")
    mask = mask.astype(np.uint8)
    fmt = image.format
    if fmt in _RASTER:
        data = _encode_raster(mask, "PNG" if fmt == "jpeg" else _RASTER[fmt])
    elif fmt == "nrrd":
        data = _encode_nrrd(image, mask)
    elif fmt == "nifti":
        data = _encode_nifti(image, mask)
    else:
        data = _encode_dicom(image, mask)
    return data


def _encode_raster(mask: np.ndarray, pil_format: str) -> bytes:
    from PIL import Image

    buf = _io.BytesIO()
    # a mask is mostly flat: the fastest PNG compression is within a few hundred bytes of the best
    options = {"compress_level": 1} if pil_format == "PNG" else {}
    Image.fromarray(mask, mode="L").save(buf, format=pil_format, **options)
    return buf.getvalue()


def _encode_nrrd(image: UltrasoundImage, mask: np.ndarray) -> bytes:
    import nrrd

    src = image.header.get("nrrd", {})
    domain_axes = image.header.get("domain_axes", [0, 1, 2])
    n_domain = len(domain_axes)
    header: dict[str, Any] = {
        "type": "unsigned char",
        "encoding": "gzip",
        "kinds": ["domain"] * n_domain,
    }
    for key in ("space", "space origin", "space units", "measurement frame"):
        if key in src:
            header[key] = copy.deepcopy(src[key])
    if "space directions" in src:
        dirs = np.asarray(src["space directions"], dtype=float)
        header["space directions"] = dirs[domain_axes]
    if "space" not in header and "space dimension" in src:
        header["space dimension"] = src["space dimension"]
    data = mask.T  # (i, j) in file order
    if n_domain > 2:
        data = data.reshape(data.shape + (1,) * (n_domain - 2))
    tmp = tempfile.NamedTemporaryFile(suffix=".nrrd", delete=False)
    tmp.close()
    try:
        nrrd.write(tmp.name, np.asfortranarray(data), header, index_order="F")
        return Path(tmp.name).read_bytes()
    finally:
        os.unlink(tmp.name)


def _encode_nifti(image: UltrasoundImage, mask: np.ndarray) -> bytes:
    import nibabel as nib

    src_header = image.header.get("nifti")
    shape = image.header.get("shape", (mask.shape[1], mask.shape[0]))
    spatial = tuple(shape[:3]) if len(shape) >= 3 else tuple(shape[:2])
    if len(spatial) == 3 and spatial[2] != 1:
        spatial = spatial[:2] + (1,)
    data = mask.T.reshape(spatial)
    affine_ras = _LPS_FROM_RAS @ image.affine
    out = nib.Nifti1Image(data, affine_ras)
    if src_header is not None:
        qform, qcode = src_header.get_qform(coded=True)
        sform, scode = src_header.get_sform(coded=True)
        out.set_qform(affine_ras if qform is None else qform, int(qcode) if qform is not None else 1)
        out.set_sform(affine_ras if sform is None else sform, int(scode) if sform is not None else 1)
        out.header.set_xyzt_units(*src_header.get_xyzt_units())
    out.set_data_dtype(np.uint8)
    tmp = tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False)
    tmp.close()
    try:
        nib.save(out, tmp.name)
        return Path(tmp.name).read_bytes()
    finally:
        os.unlink(tmp.name)


def _encode_dicom(image: UltrasoundImage, mask: np.ndarray) -> bytes:
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    src = image.header.get("dataset")
    ds = Dataset()
    keep = (
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
        "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName", "FrameOfReferenceUID",
        "Modality", "Laterality", "BodyPartExamined",
    )
    if src is not None:
        for name in keep:
            if name in src:
                setattr(ds, name, src.data_element(name).value)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyInstanceUID = getattr(ds, "StudyInstanceUID", generate_uid())
    ds.Modality = getattr(ds, "Modality", "US")
    ds.SeriesDescription = "Thyroid nodule saliency mask"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    now = datetime.datetime.now()
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    if src is not None and "SOPInstanceUID" in src:
        ref = Dataset()
        ref.ReferencedSOPClassUID = src.get("SOPClassUID", "")
        ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
        if int(src.get("NumberOfFrames", 1) or 1) > 1:
            ref.ReferencedFrameNumber = int(image.header.get("frame", 0)) + 1
        ds.SourceImageSequence = [ref]
    a = image.affine
    col_spacing, row_spacing = float(np.linalg.norm(a[:3, 0])), float(np.linalg.norm(a[:3, 1]))
    ds.PixelSpacing = [f"{row_spacing:.10g}", f"{col_spacing:.10g}"]
    ds.ImageOrientationPatient = [f"{v:.10g}" for v in list(a[:3, 0] / col_spacing) + list(a[:3, 1] / row_spacing)]
    ds.ImagePositionPatient = [f"{v:.10g}" for v in a[:3, 3]]
    ds.SliceThickness = f"{float(np.linalg.norm(a[:3, 2])):.10g}"
    ds.Rows, ds.Columns = int(mask.shape[0]), int(mask.shape[1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(mask).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.is_little_endian, ds.is_implicit_VR = True, False
    buf = _io.BytesIO()
    pydicom.dcmwrite(buf, ds, write_like_original=False)
    return buf.getvalue()
