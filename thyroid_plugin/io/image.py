"""One 2D ultrasound frame with its geometry, and its conversion to network channels.

Geometry convention: ``affine`` is the 4x4 matrix that maps a voxel index ``(i, j, k, 1)`` to
LPS patient coordinates in millimetres, where ``i`` is the column (x, image width), ``j`` the
row (y, image height) and ``k`` the slice. ``array[j, i]`` is the pixel at index ``(i, j)``.
Raster images have the identity (1 mm pixels at the origin), like ITK and 3D Slicer assume.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np

__all__ = ["PathLike", "UltrasoundImage", "to_network_channels"]

PathLike = Union[str, os.PathLike]

#: RAS (NIfTI's patient space) <-> LPS (DICOM's, ITK's and this package's): the same matrix both ways
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])



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
