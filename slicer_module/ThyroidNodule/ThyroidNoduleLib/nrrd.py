"""NRRD files in memory, written and read the way 3D Slicer does (numpy, gzip, standard library).

Writing mirrors ``vtkMRMLVolumeArchetypeStorageNode::WriteData`` for one 2D frame:

- scalar frame: ``dimension: 3``, ``sizes: W H 1``, ``kinds: domain domain domain``,
  ``space directions: (..) (..) (..)``;
- RGB frame: ``dimension: 4``, ``sizes: 3 W H 1``, ``kinds: RGB-color domain domain domain``,
  ``space directions: none (..) (..) (..)``;

always with ``space: left-posterior-superior`` and ``space origin``, so that any NRRD reader
(ITK, pynrrd, the MONAI Label app) finds the same grid as Slicer.

Reading accepts attached-data NRRD files with raw or gzip encoding (what Slicer, ITK and pynrrd
write), any number of domain axes and at most one non-spatial axis.
"""

from __future__ import annotations

import gzip
import re
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

__all__ = ["NrrdError", "NrrdImage", "read_nrrd", "write_nrrd"]


class NrrdError(ValueError):
    """The bytes are not an NRRD file this reader understands."""


_TYPES = {
    np.dtype(np.int8): "signed char",
    np.dtype(np.uint8): "unsigned char",
    np.dtype(np.int16): "short",
    np.dtype(np.uint16): "unsigned short",
    np.dtype(np.int32): "int",
    np.dtype(np.uint32): "unsigned int",
    np.dtype(np.int64): "long long",
    np.dtype(np.uint64): "unsigned long long",
    np.dtype(np.float32): "float",
    np.dtype(np.float64): "double",
}
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


def _fmt(v: float) -> str:
    text = repr(float(v))
    if text.endswith(".0"):
        text = text[:-2]
    return "0" if text == "-0" else text


def _vector(v: Sequence[float]) -> str:
    return "(" + ",".join(_fmt(x) for x in v) + ")"


def write_nrrd(array: np.ndarray, ijk_to_lps: np.ndarray, compress: bool = True) -> bytes:
    """Encode one frame as NRRD bytes, as 3D Slicer writes a volume node.

    Args:
        array: ``(K, J, I)`` scalar or ``(K, J, I, C)`` multi-component pixels (numpy order of
            ``slicer.util.arrayFromVolume``: slice, row, column[, component]); ``C`` of 3 is
            written as ``RGB-color``, 4 as ``RGBA-color``, others as ``vector``.
        ijk_to_lps: ``(4, 4)`` matrix from voxel index ``(i, j, k)`` to LPS millimetres.
        compress: gzip the data (Slicer's default) or write it raw.

    Returns:
        the file's bytes (header and attached data).
    """
    a = np.ascontiguousarray(array)
    if a.ndim not in (3, 4):
        raise NrrdError(f"expected a (K, J, I) or (K, J, I, C) array, got shape {a.shape}")
    dtype = a.dtype.newbyteorder("<") if a.dtype.itemsize > 1 else a.dtype
    ntype = _TYPES.get(np.dtype(a.dtype.str.replace(">", "<")))
    if ntype is None:
        raise NrrdError(f"pixel type {a.dtype} cannot be written to NRRD")
    a = a.astype(dtype, copy=False)
    m = np.asarray(ijk_to_lps, dtype=float)
    dirs = " ".join(_vector(m[:3, c]) for c in range(3))
    lines = ["NRRD0004", "# Complete NRRD file format specification at:", "# http://teem.sourceforge.net/nrrd/format.html",
             f"type: {ntype}"]
    k, j, i = a.shape[:3]
    if a.ndim == 3:
        lines += ["dimension: 3", "space: left-posterior-superior", f"sizes: {i} {j} {k}", f"space directions: {dirs}",
                  "kinds: domain domain domain"]
    else:
        c = a.shape[3]
        kind = {3: "RGB-color", 4: "RGBA-color"}.get(c, "vector")
        lines += ["dimension: 4", "space: left-posterior-superior", f"sizes: {c} {i} {j} {k}", f"space directions: none {dirs}",
                  f"kinds: {kind} domain domain domain"]
    if a.dtype.itemsize > 1:
        lines.append("endian: little")
    lines.append(f"encoding: {'gzip' if compress else 'raw'}")
    lines.append(f"space origin: {_vector(m[:3, 3])}")
    raw = a.tobytes(order="C")
    payload = gzip.compress(raw, compresslevel=6, mtime=0) if compress else raw
    return ("\n".join(lines) + "\n\n").encode("ascii") + payload


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
