"""Reading NRRD files in memory (numpy, gzip, standard library).

Writing is Slicer's own: :func:`~ThyroidNoduleLib.volumes.write_nrrd` runs
``vtkMRMLVolumeArchetypeStorageNode`` (headless in slicer-core as in 3D Slicer). Reading stays
here, by hand, because it checks a server's answer before anything of it enters the scene: the
header fields themselves (``sizes``, ``kinds``, ``space``, directions, origin) are compared with
the frame that was sent, a malformed answer (too little data, detached data, an unknown
encoding) is refused with a message instead of reaching ITK's reader, and the bytes need not be written to a file first. Slicer's reader needs
a file and a volume node and normalises the header away (an ``RGB-color`` axis and a
``vector`` axis both become components; a RAS file becomes LPS).

Reading accepts attached-data NRRD files with raw or gzip encoding (what Slicer, ITK and pynrrd
write), any number of domain axes and at most one non-spatial axis.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

__all__ = ["NrrdError", "NrrdImage", "read_nrrd"]


class NrrdError(ValueError):
    """The bytes are not an NRRD file this reader understands."""


_TYPE_ALIASES = {
    "signed char": "i1", "int8": "i1", "int8_t": "i1",
    "uchar": "u1", "unsigned char": "u1", "uint8": "u1", "uint8_t": "u1",
    "short": "i2", "short int": "i2", "signed short": "i2", "signed short int": "i2", "int16": "i2", "int16_t": "i2",
    "ushort": "u2", "unsigned short": "u2", "unsigned short int": "u2", "uint16": "u2", "uint16_t": "u2",
    "int": "i4", "signed int": "i4", "int32": "i4", "int32_t": "i4",
    "uint": "u4", "unsigned int": "u4", "uint32": "u4", "uint32_t": "u4",
    "longlong": "i8", "long long": "i8", "long long int": "i8", "signed long long": "i8", "signed long long int": "i8",
    "int64": "i8", "int64_t": "i8",
    "ulonglong": "u8", "unsigned long long": "u8", "unsigned long long int": "u8", "uint64": "u8", "uint64_t": "u8",
    "float": "f4", "double": "f8",
}
_SPATIAL_KINDS = {"domain", "space", "time"}


@dataclass
class NrrdImage:
    """An NRRD image in file axis order.

    Attributes:
        data: array of shape ``reversed(sizes)`` (C order: the last numpy axis is the file's
            first, fastest axis), e.g. ``(1, H, W)`` for ``sizes: W H 1`` or ``(1, H, W, 3)`` for
            ``sizes: 3 W H 1``.
        sizes: the ``sizes`` field, fastest axis first.
        kinds: the ``kinds`` field (lower case), one per axis.
        space: the ``space`` field ("" when absent).
        directions: one entry per axis: a space direction vector (mm per index step), or ``None``
            for a non-spatial axis.
        origin: ``space origin`` in mm, or ``None``.
        fields: every header field as text (keys lower case).
    """

    data: np.ndarray
    sizes: List[int]
    kinds: List[str]
    space: str = ""
    directions: List[Optional[List[float]]] = field(default_factory=list)
    origin: Optional[List[float]] = None
    fields: Dict[str, str] = field(default_factory=dict)

    def spatial_axes(self) -> List[int]:
        """Indices (in ``sizes`` order) of the axes that are positions, not components."""
        return [n for n, k in enumerate(self.kinds) if k in _SPATIAL_KINDS]

    def ijk_to_lps(self) -> np.ndarray:
        """``(4, 4)`` matrix from the index of the (up to 3) spatial axes to LPS mm.

        RAS files are converted; a missing origin is 0; missing directions are the unit axes.
        A 2D file gets the unit normal of its plane as the third column.
        """
        m = np.eye(4)
        axes = self.spatial_axes()[:3]
        for col, axis in enumerate(axes):
            d = self.directions[axis] if axis < len(self.directions) else None
            if d is not None:
                m[:len(d[:3]), col] = d[:3]
        if len(axes) == 2:
            n = np.cross(m[:3, 0], m[:3, 1])
            m[:3, 2] = n / (np.linalg.norm(n) or 1.0)
        if self.origin is not None:
            m[:len(self.origin[:3]), 3] = self.origin[:3]
        if self.space in ("right-anterior-superior", "ras"):
            m = np.diag([-1.0, -1.0, 1.0, 1.0]) @ m
        return m


def _parse_vector(text: str) -> Optional[List[float]]:
    text = text.strip()
    if text.lower() == "none":
        return None
    if not (text.startswith("(") and text.endswith(")")):
        raise NrrdError(f"malformed NRRD vector {text!r}")
    try:
        return [float(v) for v in text[1:-1].split(",")]
    except ValueError:
        raise NrrdError(f"malformed NRRD vector {text!r}") from None


def read_nrrd(blob: bytes) -> NrrdImage:
    """Decode NRRD bytes with attached data (raw or gzip encoding).

    Args:
        blob: the file's bytes.

    Returns:
        the image; ``data`` has shape ``reversed(sizes)``.

    Raises:
        NrrdError: not NRRD, detached data, an unsupported encoding or type, or too little data.
    """
    if not blob.startswith(b"NRRD000"):
        raise NrrdError("the data is not an NRRD file")
    end = blob.find(b"\n\n")
    end_crlf = blob.find(b"\r\n\r\n")
    if end < 0 and end_crlf < 0:
        raise NrrdError("the NRRD header has no end")
    if end_crlf >= 0 and (end < 0 or end_crlf < end):
        header, data = blob[:end_crlf], blob[end_crlf + 4:]
    else:
        header, data = blob[:end], blob[end + 2:]
    fields: Dict[str, str] = {}
    for raw in header.decode("latin-1").splitlines()[1:]:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if ":=" in line:
            continue  # key/value pairs: not needed here
        key, sep, value = line.partition(":")
        if not sep:
            raise NrrdError(f"malformed NRRD header line {line!r}")
        fields[key.strip().lower()] = value.strip()
    if "data file" in fields or "datafile" in fields:
        raise NrrdError("NRRD files with detached data are not supported")
    try:
        ntype = _TYPE_ALIASES[fields.get("type", "").lower()]
        dimension = int(fields["dimension"])
        sizes = [int(s) for s in fields["sizes"].split()]
    except (KeyError, ValueError):
        raise NrrdError(f"the NRRD header lacks a valid type, dimension or sizes ({fields.get('type')!r})") from None
    if len(sizes) != dimension or any(s < 1 for s in sizes):
        raise NrrdError(f"NRRD sizes {sizes} do not match dimension {dimension}")
    endian = fields.get("endian", "little").lower()
    dtype = np.dtype(("<" if endian == "little" else ">") + ntype)
    encoding = fields.get("encoding", "raw").lower()
    if encoding in ("gzip", "gz"):
        try:
            data = zlib.decompress(data, 16 + zlib.MAX_WBITS)
        except zlib.error as e:
            raise NrrdError(f"the NRRD data cannot be decompressed: {e}") from None
    elif encoding != "raw":
        raise NrrdError(f"NRRD encoding {encoding!r} is not supported")
    count = int(np.prod(sizes))
    if len(data) < count * dtype.itemsize:
        raise NrrdError(f"the NRRD file holds {len(data)} bytes of data, {count * dtype.itemsize} expected")
    array = np.frombuffer(data, dtype=dtype, count=count).reshape(tuple(reversed(sizes)))
    array = array.astype(dtype.newbyteorder("="), copy=True)
    kinds = fields.get("kinds", " ".join(["domain"] * dimension)).lower().split()
    if len(kinds) != dimension:
        kinds = ["domain"] * dimension
    directions: List[Optional[List[float]]] = []
    if "space directions" in fields:
        directions = [_parse_vector(t) for t in re.findall(r"\([^)]*\)|none", fields["space directions"], flags=re.I)]
        if len(directions) != dimension:
            raise NrrdError(f"NRRD space directions list {len(directions)} axes for dimension {dimension}")
        kinds = [k if d is not None or k not in ("domain", "space") else "vector" for k, d in zip(kinds, directions)]
    origin = _parse_vector(fields["space origin"]) if "space origin" in fields else None
    return NrrdImage(data=array, sizes=sizes, kinds=kinds, space=fields.get("space", "").lower(), directions=directions,
                     origin=origin, fields=fields)
