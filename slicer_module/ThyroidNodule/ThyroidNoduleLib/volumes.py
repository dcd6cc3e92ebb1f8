"""Volume nodes <-> numpy arrays and matrices, and loading a frame file into the scene.

Only MRML classes, VTK and numpy are used, so this works in 3D Slicer and in ``slicer-core``.
Arrays follow ``slicer.util.arrayFromVolume``: ``(K, J, I)`` for scalar volumes and
``(K, J, I, C)`` for vector volumes (slice, row, column[, component]).
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional

import numpy as np
import vtk
from vtk.util import numpy_support

from .errors import InputError
from .nrrd import NrrdError, read_nrrd

__all__ = [
    "copy_geometry",
    "detect_image_format",
    "load_frame_file",
    "matrix_from_vtk",
    "node_to_world",
    "set_volume_array",
    "volume_array",
    "volume_ijk_to_ras",
    "vtk_matrix",
    "write_nrrd",
]


def matrix_from_vtk(m: vtk.vtkMatrix4x4) -> np.ndarray:
    """``vtkMatrix4x4`` -> ``(4, 4)`` float array."""
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def vtk_matrix(a: np.ndarray) -> vtk.vtkMatrix4x4:
    """``(4, 4)`` array -> new ``vtkMatrix4x4``."""
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r][c]))
    return m


def volume_ijk_to_ras(node) -> np.ndarray:
    """The volume's ``(4, 4)`` IJK -> RAS matrix (mm), in the volume's own (untransformed) space."""
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return matrix_from_vtk(m)


def node_to_world(node) -> np.ndarray:
    """``(4, 4)`` matrix from the node's local RAS to world RAS (its parent transforms).

    Raises:
        InputError: the node is under a non-linear transform.
    """
    import slicer

    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    m = vtk.vtkMatrix4x4()
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(parent, None, m):
        raise InputError(f"'{node.GetName()}' is under a non-linear transform; harden or remove it first.")
    return matrix_from_vtk(m)


def volume_array(node) -> np.ndarray:
    """A copy of the voxels: ``(K, J, I)`` or ``(K, J, I, C)`` for more than one component.

    Raises:
        InputError: the node has no image data.
    """
    image = node.GetImageData() if node is not None else None
    scalars = image.GetPointData().GetScalars() if image is not None else None
    if scalars is None:
        raise InputError(f"'{node.GetName() if node is not None else ''}' has no image data; load an image first.")
    dims = image.GetDimensions()
    comps = image.GetNumberOfScalarComponents()
    shape = tuple(reversed(dims)) + ((comps,) if comps > 1 else ())
    return np.array(numpy_support.vtk_to_numpy(scalars), copy=True).reshape(shape)


def set_volume_array(node, array: np.ndarray) -> None:
    """Replace a volume node's voxels by ``array`` (``(K, J, I)`` or ``(K, J, I, C)``, deep copy).

    The node's geometry (IJKToRAS) is left as it is; its image data gets origin 0 and spacing 1
    as MRML requires.
    """
    a = np.ascontiguousarray(array)
    if a.ndim == 3:
        comps, shape = 1, a.shape
    elif a.ndim == 4:
        comps, shape = a.shape[3], a.shape[:3]
    else:
        raise ValueError(f"expected a (K, J, I) or (K, J, I, C) array, got {a.shape}")
    image = vtk.vtkImageData()
    image.SetDimensions(shape[2], shape[1], shape[0])
    flat = a.reshape(-1, comps) if comps > 1 else a.reshape(-1)
    varray = numpy_support.numpy_to_vtk(flat, deep=True, array_type=numpy_support.get_vtk_array_type(a.dtype))
    varray.SetName("ImageScalars")
    image.GetPointData().SetScalars(varray)
    node.SetAndObserveImageData(image)
    node.Modified()


def write_nrrd(array: np.ndarray, ijk_to_lps: np.ndarray, compress: bool = True) -> bytes:
    """Encode one frame as NRRD bytes with 3D Slicer's own writer
    (``vtkMRMLVolumeArchetypeStorageNode``, headless; no scene is touched).

    Scalar frames come out as ``sizes: W H 1``, ``kinds: domain domain domain``; 3-component
    frames as ``sizes: 3 W H 1``, ``kinds: RGB-color domain domain domain``; always
    ``space: left-posterior-superior`` with ``space directions`` and ``space origin``.

    Args:
        array: ``(K, J, I)`` scalar or ``(K, J, I, C)`` multi-component pixels (numpy order of
            ``slicer.util.arrayFromVolume``: slice, row, column[, component]).
        ijk_to_lps: ``(4, 4)`` matrix from voxel index ``(i, j, k)`` to LPS millimetres.
        compress: gzip the data (Slicer's default) or write it raw.

    Returns:
        the file's bytes (header and attached data).

    Raises:
        NrrdError: an array of another shape, or a pixel type VTK has no array for.
    """
    import slicer

    a = np.asarray(array)
    if a.ndim not in (3, 4):
        raise NrrdError(f"expected a (K, J, I) or (K, J, I, C) array, got shape {a.shape}")
    try:
        numpy_support.get_vtk_array_type(a.dtype)
    except TypeError:
        raise NrrdError(f"pixel type {a.dtype} cannot be written to NRRD") from None
    node = slicer.vtkMRMLVectorVolumeNode() if a.ndim == 4 else slicer.vtkMRMLScalarVolumeNode()
    set_volume_array(node, a)
    node.SetIJKToRASMatrix(vtk_matrix(np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(ijk_to_lps, dtype=float)))
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetUseCompression(1 if compress else 0)
    with tempfile.TemporaryDirectory(prefix="ThyroidNodule-") as folder:
        path = os.path.join(folder, "frame.nrrd")
        storage.SetFileName(path)
        if not storage.WriteData(node) or not os.path.isfile(path):
            raise NrrdError(f"3D Slicer could not write the frame ({a.dtype}, shape {a.shape}) as NRRD")
        with open(path, "rb") as fp:
            return fp.read()


def copy_geometry(source, target) -> None:
    """Give ``target`` the IJKToRAS matrix and the parent transform of ``source``."""
    m = vtk.vtkMatrix4x4()
    source.GetIJKToRASMatrix(m)
    target.SetIJKToRASMatrix(m)
    parent = source.GetParentTransformNode()
    target.SetAndObserveTransformNodeID(parent.GetID() if parent is not None else None)


def detect_image_format(path: str) -> str:
    """``png``, ``jpeg``, ``bmp``, ``tiff``, ``nrrd``, ``nifti`` or ``dicom`` from the first bytes.

    Raises:
        InputError: anything else.
    """
    with open(path, "rb") as fp:
        head = fp.read(352)
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"BM"):
        return "bmp"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    if head.startswith(b"NRRD"):
        return "nrrd"
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x1f\x8b") or head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "nifti"
    raise InputError(f"'{os.path.basename(path)}' is not an image format the module can open (PNG, JPEG, BMP, TIFF, NRRD, NIfTI).")


def _read_raster(path: str, fmt: str) -> np.ndarray:
    reader = vtk.vtkPNGReader() if fmt == "png" else vtk.vtkJPEGReader()
    reader.SetFileName(path)
    reader.Update()
    image = reader.GetOutput()
    if image is None or image.GetPointData().GetScalars() is None:
        raise InputError(f"'{os.path.basename(path)}' could not be read as {fmt.upper()}.")
    dims = image.GetDimensions()
    comps = image.GetNumberOfScalarComponents()
    a = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(tuple(reversed(dims)) + (comps,))
    # VTK's PNG and JPEG readers put the file's last row at y = 0 (VTK's bottom-up convention);
    # ITK, and so Slicer, put the first row there.
    a = a[:, ::-1]
    if comps in (1, 2):
        return np.ascontiguousarray(a[..., 0])  # gray (alpha dropped)
    return np.ascontiguousarray(a[..., :3])  # RGB (alpha dropped)


def load_frame_file(scene, path: str, name: Optional[str] = None):
    """Load an image file into ``scene`` as 3D Slicer would: gray -> scalar volume, colour ->
    vector volume, one slice.

    PNG and JPEG get Slicer's (ITK's) geometry: 1 mm pixels, origin 0, LPS identity
    directions (IJKToRAS ``diag(-1, -1, 1)``), row 0 = the top row. NRRD and NIfTI are read by
    ``vtkMRMLVolumeArchetypeStorageNode``. Inside 3D Slicer the module uses
    ``slicer.util.loadVolume`` instead, which also reads DICOM.

    Args:
        scene: the MRML scene.
        path: the file.
        name: node name (default: the file name without extension).

    Returns:
        the new ``vtkMRMLScalarVolumeNode`` or ``vtkMRMLVectorVolumeNode``.

    Raises:
        InputError: unknown format, DICOM, BMP or TIFF (left to Slicer's readers), or an
            unreadable file.
    """
    import slicer

    fmt = detect_image_format(path)
    name = name or os.path.basename(path).split(".")[0]
    if fmt == "dicom":
        raise InputError("DICOM files are loaded by 3D Slicer's DICOM module; outside Slicer use NRRD, NIfTI, PNG or JPEG.")
    if fmt in ("bmp", "tiff"):
        raise InputError(f"{fmt.upper()} files are loaded by 3D Slicer's image readers; outside Slicer use NRRD, NIfTI, PNG or JPEG.")
    if fmt in ("nrrd", "nifti"):
        vector = False
        if fmt == "nrrd":
            with open(path, "rb") as fp:
                blob = fp.read()
            try:
                header = read_nrrd(blob)
            except NrrdError as e:
                raise InputError(f"'{os.path.basename(path)}' is not a readable NRRD file: {e}") from None
            vector = any(k not in ("domain", "space", "time") for k in header.kinds)
        node = slicer.vtkMRMLVectorVolumeNode() if vector else slicer.vtkMRMLScalarVolumeNode()
        node.SetName(name)
        scene.AddNode(node)
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetSingleFile(1)
        scene.AddNode(storage)
        storage.SetFileName(path)
        ok = storage.ReadData(node)
        scene.RemoveNode(storage)
        if not ok or node.GetImageData() is None:
            scene.RemoveNode(node)
            raise InputError(f"'{os.path.basename(path)}' could not be read as {fmt.upper()}.")
        return node
    array = _read_raster(path, fmt)
    node = slicer.vtkMRMLVectorVolumeNode() if array.ndim == 4 else slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name)
    scene.AddNode(node)
    set_volume_array(node, array)
    node.SetIJKToRASMatrix(vtk_matrix(np.diag([-1.0, -1.0, 1.0, 1.0])))
    return node
