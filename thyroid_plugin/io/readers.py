"""Read one 2D ultrasound frame, with its geometry, from any supported file.

Supported inputs (detected from the file's content, not its name):

- raster images: PNG, JPEG, BMP, TIFF (gray, gray+alpha, palette, RGB, RGBA, 16-bit gray);
- DICOM: single- and multi-frame (``frame`` chooses one), MONOCHROME1/2, RGB, YBR_FULL(_422),
  PALETTE COLOR, uncompressed or compressed as far as pydicom's handlers allow;
- NIfTI (``.nii``, ``.nii.gz``) and NRRD (``.nrrd``, attached header; :mod:`.nrrd_reader`)
  holding one slice, scalar or RGB, as 3D Slicer saves a 2D frame.

Every reader checks the frame's size from the header first (:mod:`.bounded`), so a
decompression bomb is never expanded.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import numpy as np

from ..errors import ImageTooLargeError, InvalidImageError, client_text, first_line
from .bounded import BYTES_PER_PIXEL, DECODE_SLACK, DEFAULT_MAX_PIXELS, bounded_decompress, check_bytes, check_size, count_values
from .formats import PIL_FORMAT, detect_format
from .image import LPS_FROM_RAS, PathLike, UltrasoundImage
from .nrrd_reader import load_nrrd

__all__ = ["load_image"]

_MIN_SIDE = 8


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
        if fmt in PIL_FORMAT:
            image = _load_raster(path, fmt, frame, max_pixels)
        elif fmt == "dicom":
            image = _load_dicom(path, frame, max_pixels)
        elif fmt == "nifti":
            image = _load_nifti(path, max_pixels)
        else:
            image = load_nrrd(path, max_pixels)
    except InvalidImageError:
        raise
    except MemoryError:
        raise ImageTooLargeError("the image is too large to decode") from None
    except Exception as e:  # any decoder failure on a damaged file is the file's fault
        # no server paths, temporary file names or object addresses in messages
        detail = client_text(first_line(e, default="no detail").replace(path, "the file").replace(os.path.basename(path), "the file"))
        raise InvalidImageError(f"cannot decode this {fmt.upper()} file ({type(e).__name__}: {detail})") from None
    image.path = path
    _check_frame(image)
    return image


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
            check_size(img.width * img.height, max_pixels)
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
    check_size(rows * cols * n_frames, max_pixels)
    samples = max(1, int(ds.get("SamplesPerPixel", 1) or 1))
    bits = max(8, int(ds.get("BitsAllocated", 8) or 8))
    check_bytes(rows * cols * n_frames * samples * ((bits + 7) // 8), max_pixels)
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
            bounded_decompress(fh, "deflate", BYTES_PER_PIXEL * max_pixels + DECODE_SLACK, keep=False)


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
    n_values = count_values(shape)
    check_size(n_values, max_pixels * 3)
    slope, inter = img.header.get_slope_inter()
    scaled = slope is not None and (slope != 1 or (inter or 0) != 0)
    check_bytes(n_values * max(img.get_data_dtype().itemsize, 8 if scaled else 0), max_pixels)
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
    affine = LPS_FROM_RAS @ np.asarray(img.affine, dtype=float)
    return UltrasoundImage(array=array, affine=affine, format="nifti", header={"nifti": img.header.copy(), "shape": shape})
