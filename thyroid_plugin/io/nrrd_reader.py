"""Read a single-slice NRRD file (attached header, as 3D Slicer saves a 2D frame) within bounds.

The pixel data is read here rather than with ``nrrd.read_data`` (pynrrd 1.1), which skips
``line skip`` lines one ``readline`` at a time (10^12 of them keep a core busy for good) and
unpacks a whole gzip/bzip2 stream before comparing its size with the header (a 1 kB bomb takes
gigabytes): here every skip is bounded by the file, and decompression stops as soon as the
stream grows past what the header promised plus :data:`~.bounded.DECODE_SLACK`.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import InvalidImageError
from .bounded import DECODE_SLACK, bounded_decompress, check_bytes, check_size, count_values
from .image import LPS_FROM_RAS, UltrasoundImage

__all__ = ["load_nrrd"]

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


def load_nrrd(path: str, max_pixels: int) -> UltrasoundImage:
    """The frame of a single-slice NRRD file with an attached header, its geometry in LPS.

    Raises:
        InvalidImageError: a detached header, a volume, an unsupported type, space or layout.
        ImageTooLargeError: more than ``max_pixels`` pixels, or data that would decode larger.
    """
    import nrrd

    with open(path, "rb") as fh:
        header = nrrd.read_header(fh)  # leaves fh at the first byte after the header
        if "data file" in header or "datafile" in header:
            # the data would be read from another file named by the header: any file on the server
            raise InvalidImageError("NRRD files whose data is in a separate file ('data file:') are not accepted; "
                                    "save the image as one .nrrd file")
        sizes = [int(s) for s in header.get("sizes", [])]
        n_values = count_values(sizes)
        check_size(n_values, max_pixels * 3)
        dtype = _nrrd_dtype(header)
        check_bytes(n_values * dtype.itemsize, max_pixels)
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
        affine = LPS_FROM_RAS @ affine
    elif space not in ("left-posterior-superior", "lps"):
        if directions is not None and space not in ("", "none"):
            raise InvalidImageError(f"unsupported NRRD space {space!r}")
    return UltrasoundImage(array=array, affine=affine, format="nrrd", header={"nrrd": header, "domain_axes": domain_axes, "sizes": sizes})


_NRRD_TEXT = ("ascii", "text", "txt")


def _read_nrrd_values(fh, header: dict, dtype: np.dtype, n_values: int) -> np.ndarray:
    """The ``n_values`` pixel values that follow an attached NRRD header (``fh`` just after it),
    every skip bounded by the file and decompression by the header's size (see the module)."""
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
        data = bounded_decompress(fh, encoding, skip + n_bytes + DECODE_SLACK)
        if len(data) < skip + n_bytes:
            raise InvalidImageError(f"the NRRD data holds {max(len(data) - skip, 0)} bytes, its header declares {n_bytes}")
        data = data[-n_bytes:] if byte_skip == -1 else data[skip:skip + n_bytes]
    elif encoding in _NRRD_TEXT:
        if byte_skip == -1:
            raise InvalidImageError("'byte skip: -1' is not valid for text-encoded NRRD data")
        _seek_forward(fh, byte_skip)
        text = fh.read(n_values * 40 + DECODE_SLACK)  # 40 characters per value is plenty; never the whole file
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
