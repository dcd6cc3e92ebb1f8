"""Geometry of a 2D frame held in a Slicer volume: RAS/LPS, frame layout, ROI -> pixel box.

Conventions:

- Slicer keeps a volume's grid as ``IJKToRAS`` (4x4, voxel index ``(i, j, k)`` -> RAS mm);
  NRRD files and the MONAI Label app use LPS: ``IJKToLPS = diag(-1, -1, 1, 1) @ IJKToRAS``.
- A *frame* is a volume with one axis of size 1 (normally ``k``). The file sent to the server
  keeps the two other axes as its column (``x``) and row (``y``) axes and the size-1 axis third,
  so the server always gets ``sizes: W H 1``. :class:`FrameLayout` records that choice and maps
  arrays and matrices both ways; for the usual ``(W, H, 1)`` volume it is the identity.
- An ROI box is ``[x0, y0, x1, y1]`` in pixel indices of the frame (``x0, y0`` inclusive,
  ``x1, y1`` exclusive), as the REST contract says. A pixel is in the box when its centre is
  inside the ROI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from .errors import GeometryMismatchError, InputError

__all__ = [
    "FrameLayout",
    "LPS_FROM_RAS",
    "check_result_geometry",
    "describe_grid",
    "grid_of",
    "lps_from_ras",
    "pixel_box_from_corners",
]

#: ``diag(-1, -1, 1, 1)``: RAS <-> LPS (its own inverse).
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def lps_from_ras(matrix: np.ndarray) -> np.ndarray:
    """``(4, 4)`` IJK->RAS matrix -> IJK->LPS matrix (or the reverse: the map is an involution)."""
    return LPS_FROM_RAS @ np.asarray(matrix, dtype=float)


@dataclass(frozen=True)
class FrameLayout:
    """Which volume axes are the frame's columns, rows and the size-1 slice axis.

    Attributes:
        dims: the volume's dimensions ``(I, J, K)`` (``vtkImageData.GetDimensions()``).
        axes: volume axis of the file's column, row and slice axis, e.g. ``(0, 1, 2)``.
    """

    dims: Tuple[int, int, int]
    axes: Tuple[int, int, int]

    @classmethod
    def of(cls, dims: Sequence[int]) -> "FrameLayout":
        """The layout of a volume of dimensions ``dims = (I, J, K)``.

        Raises:
            InputError: the volume has more than one slice in every direction (a 3D volume).
        """
        dims = tuple(int(d) for d in dims)
        if len(dims) != 3 or min(dims) < 1:
            raise InputError(f"The volume has no image data (dimensions {dims}).")
        unit = [n for n in range(3) if dims[n] == 1]
        if not unit:
            raise InputError(f"The selected volume has {dims[2]} slices of {dims[0]}x{dims[1]} pixels. Thyroid Nodule "
                             "classifies one 2D ultrasound frame: select a single-frame image.")
        slice_axis = unit[-1]
        frame = [n for n in range(3) if n != slice_axis]
        return cls(dims=dims, axes=(frame[0], frame[1], slice_axis))

    @property
    def width(self) -> int:
        """Pixels along the frame's columns (``x``)."""
        return self.dims[self.axes[0]]

    @property
    def height(self) -> int:
        """Pixels along the frame's rows (``y``)."""
        return self.dims[self.axes[1]]

    def _numpy_order(self) -> Tuple[int, int, int]:
        # numpy axis of volume axis n is 2 - n ((K, J, I) order)
        return tuple(2 - a for a in reversed(self.axes))

    def to_file_array(self, volume_array: np.ndarray) -> np.ndarray:
        """``(K, J, I[, C])`` volume array -> ``(1, H, W[, C])`` array in the file's axis order."""
        order = self._numpy_order()
        if volume_array.ndim == 4:
            order = order + (3,)
        return np.ascontiguousarray(np.transpose(volume_array, order))

    def from_file_array(self, file_array: np.ndarray) -> np.ndarray:
        """``(1, H, W)`` array in file order -> ``(K, J, I)`` volume array (inverse of
        :meth:`to_file_array`)."""
        order = self._numpy_order()
        inverse = tuple(int(v) for v in np.argsort(order))
        return np.ascontiguousarray(np.transpose(file_array, inverse))

    def to_file_matrix(self, ijk_to_x: np.ndarray) -> np.ndarray:
        """A volume's ``(4, 4)`` index->space matrix -> the same for the file's axis order."""
        m = np.asarray(ijk_to_x, dtype=float)
        out = m.copy()
        for n, axis in enumerate(self.axes):
            out[:, n] = m[:, axis]
        return out

    def frame_index(self, volume_ijk: Sequence[float]) -> Tuple[float, float, float]:
        """Volume index ``(i, j, k)`` -> frame index ``(x, y, slice)``."""
        return tuple(float(volume_ijk[a]) for a in self.axes)


def pixel_box_from_corners(corners_ijk: np.ndarray, layout: FrameLayout) -> List[int]:
    """The frame's pixels whose centres are inside a box, as ``[x0, y0, x1, y1]``.

    Args:
        corners_ijk: ``(N, 3)`` continuous volume indices of the ROI's corners (pixel centres are
            at integer indices).
        layout: the frame's layout.

    Returns:
        ``[x0, y0, x1, y1]`` with ``x0, y0`` inclusive, ``x1, y1`` exclusive, clipped to the frame.

    Raises:
        InputError: the ROI does not cross the image plane or covers no pixel of the frame.
    """
    pts = np.asarray([layout.frame_index(c) for c in np.asarray(corners_ijk, dtype=float)])
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    eps = 1e-6
    depth = layout.dims[layout.axes[2]]
    if hi[2] < -0.5 - eps or lo[2] > depth - 0.5 + eps:
        raise InputError("The ROI box is not on the image plane: place it on the ultrasound frame in a slice view.")
    x0 = max(0, math.ceil(lo[0] - eps))
    y0 = max(0, math.ceil(lo[1] - eps))
    x1 = min(layout.width, math.floor(hi[0] + eps) + 1)
    y1 = min(layout.height, math.floor(hi[1] + eps) + 1)
    if x1 <= x0 or y1 <= y0:
        raise InputError("The ROI box does not cover any pixel of the image: place it over the nodule.")
    return [int(x0), int(y0), int(x1), int(y1)]


def grid_of(ijk_to_lps: np.ndarray, size: Sequence[int]) -> Dict[str, Any]:
    """The grid fields the server reports (``image.size/spacing/origin/direction``) for a file
    with index->LPS matrix ``ijk_to_lps`` and ``size = [W, H]``."""
    m = np.asarray(ijk_to_lps, dtype=float)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    direction = m[:3, :3] / np.where(spacing > 0, spacing, 1.0)
    return {"size": [int(size[0]), int(size[1])], "spacing": spacing.tolist(), "origin": m[:3, 3].tolist(),
            "direction": direction.tolist()}


def describe_grid(grid: Mapping[str, Any]) -> str:
    """A short text of a grid (size, spacing, origin), for messages."""
    def fmt(v):
        return "(" + ", ".join(f"{float(x):.4g}" for x in v) + ")"
    try:
        return f"{grid['size'][0]}x{grid['size'][1]} px, spacing {fmt(grid['spacing'])} mm, origin {fmt(grid['origin'])} mm"
    except (KeyError, TypeError, IndexError, ValueError):
        return repr(grid)[:200]


def _close(a, b, atol: float, rtol: float) -> bool:
    try:
        a = np.asarray(a, dtype=float)
        b = np.asarray(b, dtype=float)
    except (TypeError, ValueError):
        return False
    return a.shape == b.shape and bool(np.allclose(a, b, atol=atol, rtol=rtol))


def check_result_geometry(reported: Mapping[str, Any], expected: Mapping[str, Any], what: str) -> None:
    """Check that a grid reported by the server (or read from the mask file) is the expected one.

    Args:
        reported: ``size``, ``spacing``, ``origin``, ``direction`` as the server reports them.
        expected: the same fields computed from the volume (:func:`grid_of`).
        what: names the source in the message (e.g. ``"the mask file"``).

    Raises:
        GeometryMismatchError: any field differs (sizes exactly; spacing, origin and direction
            within 1e-5 mm or relative 1e-6, the server rounds to 9 decimals).
    """
    problems = []
    if [int(v) for v in reported.get("size", [])[:2]] != list(expected["size"]):
        problems.append(f"size {reported.get('size')} instead of {expected['size']}")
    for key in ("spacing", "origin", "direction"):
        if key in reported and not _close(reported[key], expected[key], atol=1e-5, rtol=1e-6):
            problems.append(f"{key} {reported[key]} instead of {expected[key]}")
        elif key not in reported:
            problems.append(f"no {key}")
    if problems:
        raise GeometryMismatchError(
            f"The saliency mask from the server is not on the image's grid ({what}: {'; '.join(problems)}), so it was "
            "not displayed. The classification itself is shown; report this to the server's administrator.",
            detail="; ".join(problems))
