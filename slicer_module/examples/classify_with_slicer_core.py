#!/usr/bin/env python
"""Classify an ultrasound frame with the Thyroid Nodule module's logic, headless (slicer-core).

Usage::

    python slicer_module/examples/classify_with_slicer_core.py SERVER_URL IMAGE [--roi x0 y0 x1 y1]

IMAGE is loaded into a real MRML scene as 3D Slicer would load it: NRRD and NIfTI with Slicer's
own reader (``vtkMRMLVolumeArchetypeStorageNode``), PNG/JPEG/BMP/TIFF with Pillow (slicer-core
cannot read them) as a scalar volume (gray) or vector volume (colour) with Slicer's geometry
for such files (1 mm pixels, origin 0, LPS axes). ``--roi`` places a markups ROI over the given
pixel box (column/row indices, ``x1``/``y1`` exclusive). The module's logic then sends the frame
to the server's ``classify_nodule``, and this script prints one JSON object: the server's
result, the ROI sent, and the dimensions, origin, spacing and directions (RAS) of the input
volume next to those of the saliency heat volume and of the mask segmentation's reference grid.

Needs the repository's environment (``slicer-core``, ``numpy``, ``Pillow``); exits with status 1
and the module's message when the server cannot classify the image.
"""

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, os.pardir, "ThyroidNodule"))

import slicer  # noqa: E402  (slicer-core)
import vtk  # noqa: E402

from ThyroidNoduleLib import NoduleLogic, ThyroidNoduleError  # noqa: E402
from ThyroidNoduleLib.volumes import (  # noqa: E402
    detect_image_format,
    load_frame_file,
    set_volume_array,
    volume_ijk_to_ras,
    vtk_matrix,
)


def load_image(scene, path: str):
    """A volume node of ``path`` with the voxels and geometry 3D Slicer would give it."""
    fmt = detect_image_format(path)
    if fmt in ("nrrd", "nifti"):
        return load_frame_file(scene, path)
    from PIL import Image

    with Image.open(path) as im:
        colour = im.mode not in ("L", "LA", "I;16", "I;16B", "I", "F", "1")
        array = np.asarray(im.convert("RGB") if colour else (im if im.mode in ("I;16", "I;16B", "I", "F") else im.convert("L")))
    name = os.path.basename(path).split(".")[0]
    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode" if colour else "vtkMRMLScalarVolumeNode", name)
    set_volume_array(node, array[None])
    node.SetIJKToRASMatrix(vtk_matrix(np.diag([-1.0, -1.0, 1.0, 1.0])))
    return node


def roi_over_pixels(scene, volume, box):
    """A markups ROI whose inside holds exactly the pixel centres of ``box = [x0, y0, x1, y1]``,
    oriented along the volume's axes."""
    x0, y0, x1, y1 = (float(v) for v in box)
    m = volume_ijk_to_ras(volume)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    centre_ijk = np.array([(x0 + x1 - 1) / 2.0, (y0 + y1 - 1) / 2.0, 0.0, 1.0])
    object_to_node = np.eye(4)
    object_to_node[:3, :3] = m[:3, :3] / spacing
    object_to_node[:3, 3] = (m @ centre_ijk)[:3]
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Nodule box")
    roi.SetAndObserveObjectToNodeMatrix(vtk_matrix(object_to_node))
    roi.SetSize((x1 - x0) * spacing[0], (y1 - y0) * spacing[1], spacing[2])
    return roi


def grid(node) -> dict:
    """Dimensions, origin, spacing and IJK->RAS directions of a volume node."""
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASDirectionMatrix(m)
    return {
        "dimensions": list(node.GetImageData().GetDimensions()),
        "origin": [round(v, 9) for v in node.GetOrigin()],
        "spacing": [round(v, 9) for v in node.GetSpacing()],
        "directions": [[round(m.GetElement(r, c), 9) for c in range(3)] for r in range(3)],
        "class": node.GetClassName(),
    }


def segmentation_grid(segmentation) -> dict:
    """The reference grid of a segmentation (what Segment Editor paints on)."""
    import vtk as _vtk

    geometry = segmentation.GetSegmentation().GetConversionParameter("Reference image geometry")
    image = slicer.vtkOrientedImageData()
    slicer.vtkSegmentationConverter.DeserializeImageGeometry(geometry, image)
    m = _vtk.vtkMatrix4x4()
    image.GetDirectionMatrix(m)
    extent = image.GetExtent()
    return {
        "dimensions": [extent[1] - extent[0] + 1, extent[3] - extent[2] + 1, extent[5] - extent[4] + 1],
        "origin": [round(v, 9) for v in image.GetOrigin()],
        "spacing": [round(v, 9) for v in image.GetSpacing()],
        "directions": [[round(m.GetElement(r, c), 9) for c in range(3)] for r in range(3)],
        "segments": [segmentation.GetSegmentation().GetNthSegment(n).GetName()
                     for n in range(segmentation.GetSegmentation().GetNumberOfSegments())],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("server_url", help="MONAI Label server, e.g. http://127.0.0.1:8000")
    parser.add_argument("image", help="ultrasound frame: PNG, JPEG, BMP, TIFF, NRRD or NIfTI")
    parser.add_argument("--roi", nargs=4, type=int, metavar=("X0", "Y0", "X1", "Y1"), help="nodule box in pixels")
    parser.add_argument("--timeout", type=float, default=180.0, help="classification time limit in seconds")
    args = parser.parse_args(argv)

    scene = slicer.vtkMRMLScene()
    slicer.vtkMRMLColorLogic().SetMRMLScene(scene)  # Slicer's default colour tables, as in the application
    try:
        volume = load_image(scene, args.image)
        roi = roi_over_pixels(scene, volume, args.roi) if args.roi else None
        logic = NoduleLogic(scene)
        logic.connect(args.server_url)
        logic.client.timeouts.infer = args.timeout
        classification = logic.classify(volume, roi)
    except ThyroidNoduleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = {
        "result": classification.result,
        "summary": classification.summary(),
        "roi_sent": classification.roi,
        "warning": classification.warning,
        "input_volume": grid(volume),
        "saliency_volume": grid(classification.heat_volume) if classification.heat_volume is not None else None,
        "mask_segmentation": (segmentation_grid(classification.mask_segmentation)
                              if classification.mask_segmentation is not None else None),
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
