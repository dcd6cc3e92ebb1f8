"""Test images written the way real tools write them (3D Slicer via slicer-core), and bad ones."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np


def slicer_volume_node(scene, array: np.ndarray, spacing=(0.2, 0.25, 1.0), origin=(12.0, -7.5, 3.0),
                       directions: Optional[np.ndarray] = None):
    """A scalar (``(H, W)``) or vector (``(H, W, 3)``) single-slice volume node in ``scene``.

    ``directions`` is the 3x3 IJK-to-RAS direction matrix (columns = axes); default: Slicer's
    usual axial frame (``diag(-1, -1, 1)``).
    """
    import slicer
    import vtk
    from vtk.util import numpy_support

    rgb = array.ndim == 3
    node = slicer.vtkMRMLVectorVolumeNode() if rgb else slicer.vtkMRMLScalarVolumeNode()
    scene.AddNode(node)
    h, w = array.shape[:2]
    image = vtk.vtkImageData()
    image.SetDimensions(w, h, 1)
    flat = np.ascontiguousarray(array).reshape(h * w, -1) if rgb else np.ascontiguousarray(array).ravel()
    data = numpy_support.numpy_to_vtk(flat, deep=True, array_type=numpy_support.get_vtk_array_type(array.dtype))
    data.SetNumberOfComponents(3 if rgb else 1)
    image.GetPointData().SetScalars(data)
    node.SetAndObserveImageData(image)
    node.SetSpacing(*spacing)
    node.SetOrigin(*origin)
    d = np.diag([-1.0, -1.0, 1.0]) if directions is None else np.asarray(directions, dtype=float)
    m = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            m.SetElement(r, c, d[r, c])
    node.SetIJKToRASDirectionMatrix(m)
    return node


def write_slicer_file(array: np.ndarray, path: Path, **geometry) -> Path:
    """Write ``array`` as 3D Slicer writes a single-slice volume (NRRD or NIfTI by the suffix)."""
    import slicer

    scene = slicer.vtkMRMLScene()
    node = slicer_volume_node(scene, array, **geometry)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    if not storage.WriteData(node):
        raise RuntimeError(f"slicer-core could not write {path}")
    return Path(path)


def ijk_to_lps(node) -> np.ndarray:
    """A volume node's IJK-to-LPS matrix (4x4)."""
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    ras = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ ras


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png_bomb(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A tiny PNG whose header claims ``width x height`` 8-bit gray pixels (a decompression bomb:
    the compressed rows of zeros would expand to gigabytes)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)
    body = compressor.compress(row * 64) + compressor.flush()
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")
    Path(path).write_bytes(data)
    return Path(path)


def write_truncated(src: Path, path: Path, keep: float = 0.4) -> Path:
    """The first ``keep`` fraction of a real file's bytes."""
    data = Path(src).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])
    return Path(path)


def write_volume_nrrd(path: Path, shape: Sequence[int] = (5, 32, 32)) -> Path:
    """A 3D NRRD volume with several slices (not a 2D frame)."""
    import nrrd

    nrrd.write(str(path), np.zeros(tuple(shape)[::-1], dtype=np.uint8), {"space": "left-posterior-superior"})
    return Path(path)
