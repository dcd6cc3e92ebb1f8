"""Helpers shared by the library tests: files written exactly as 3D Slicer writes them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import slicer  # slicer-core (a test requirement): real MRML nodes and storage nodes
import vtk
from slicer import util as slicer_util

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
H, W = 20, 30
SPACING = (0.3, 0.45, 1.5)
ORIGIN = (12.5, -7.25, 40.0)


def _direction() -> np.ndarray:
    """A rotated, non-axis-aligned IJK-to-RAS direction (30 degrees about S, then a tilt)."""
    t = np.deg2rad(30)
    rz = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    tilt = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]])
    return rz @ tilt


def _matrix(m) -> np.ndarray:
    return np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])


def ijk_to_ras(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return _matrix(m)


def slicer_write(node, array: np.ndarray, path: Path) -> np.ndarray:
    """Fill ``node`` from a (1, H, W[, 3]) array, give it geometry, write it as Slicer does; returns IJKToRAS."""
    slicer_util.updateVolumeFromArray(node, array)
    d = vtk.vtkMatrix4x4()
    r = _direction()
    for i in range(3):
        for j in range(3):
            d.SetElement(i, j, r[i, j])
    node.SetIJKToRASDirectionMatrix(d)
    node.SetSpacing(*SPACING)
    node.SetOrigin(*ORIGIN)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    assert storage.WriteData(node), f"Slicer could not write {path}"
    return ijk_to_ras(node)


def slicer_read(path: Path):
    node = slicer.vtkMRMLScalarVolumeNode()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(node), f"Slicer could not read {path}"
    return node
