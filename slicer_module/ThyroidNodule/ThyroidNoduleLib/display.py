"""The saliency mask in the scene: a heat volume and an editable segmentation, on the image's grid.

- Heat volume: a ``vtkMRMLScalarVolumeNode`` holding the server's 8-bit saliency
  (``round(255 * p)``), with the input volume's IJKToRAS and parent transform, shown as the
  slice views' foreground with a heat colour table; pixels of value 0 are transparent and the
  foreground opacity is adjustable.
- Mask segmentation: a ``vtkMRMLSegmentationNode`` whose reference geometry is the input
  volume, with one segment of the pixels at or above the server's ``mask_threshold``; it can be
  edited in Segment Editor and sent back with a confirmed diagnosis.

Both nodes are referenced from the input volume (node references :data:`REF_HEAT` and
:data:`REF_MASK`), so classifying the same volume again updates them instead of adding nodes.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import vtk

from .volumes import copy_geometry, set_volume_array, volume_array

__all__ = [
    "HEAT_COLOR_NAME",
    "REF_HEAT",
    "REF_MASK",
    "heat_color_node",
    "mask_to_labelmap_array",
    "remove_saliency",
    "segmentation_mask_array",
    "set_overlay",
    "update_heat_volume",
    "update_mask_segmentation",
]

REF_HEAT = "ThyroidNoduleSaliency"
REF_MASK = "ThyroidNoduleMask"
#: the volume's markups ROI over the box the server's nodule localiser drew
REF_SERVER_BOX = "ThyroidNoduleServerBox"
HEAT_COLOR_NAME = "ThyroidNodule saliency heat"
MASK_SEGMENT_COLOR = (1.0, 0.85, 0.1)


def heat_color_node(scene):
    """The module's heat colour table (256 entries, black-red-yellow-white; entry 0 transparent),
    created once per scene."""
    node = scene.GetFirstNodeByName(HEAT_COLOR_NAME)
    if node is not None and node.IsA("vtkMRMLColorTableNode"):
        return node
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", HEAT_COLOR_NAME)
    node.SetTypeToUser()
    node.SetNumberOfColors(256)
    for i in range(256):
        t = i / 255.0
        r, g, b = min(1.0, 3 * t), min(1.0, max(0.0, 3 * t - 1)), min(1.0, max(0.0, 3 * t - 2))
        node.SetColor(i, f"saliency {i}", r, g, b, 0.0 if i == 0 else 1.0)
    node.SetAttribute("Category", "ThyroidNodule")
    return node


def update_heat_volume(scene, volume, saliency: np.ndarray, name: Optional[str] = None):
    """Create or update the heat volume of ``volume``.

    Args:
        scene: the MRML scene.
        volume: the input volume node.
        saliency: ``(K, J, I)`` uint8 saliency on the volume's grid.
        name: node name (default ``"<volume> saliency"``).

    Returns:
        the ``vtkMRMLScalarVolumeNode`` (same dimensions, IJKToRAS and parent transform as
        ``volume``).
    """
    node = volume.GetNodeReference(REF_HEAT)
    if node is None or node.GetScene() is not scene:
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or f"{volume.GetName()} saliency")
        volume.SetNodeReferenceID(REF_HEAT, node.GetID())
    set_volume_array(node, np.ascontiguousarray(saliency, dtype=np.uint8))
    copy_geometry(volume, node)
    node.SetAttribute("ThyroidNodule.Role", "saliency")
    display = node.GetDisplayNode()
    if display is None:
        display = scene.AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode")
        node.SetAndObserveDisplayNodeID(display.GetID())
    display.SetAndObserveColorNodeID(heat_color_node(scene).GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0, 255)
    display.AutoThresholdOff()
    display.SetThreshold(1, 255)
    display.ApplyThresholdOn()  # saliency 0 (outside the nodule, outside the ROI) is transparent
    display.SetInterpolate(0)
    return node


def mask_to_labelmap_array(saliency: np.ndarray, mask_threshold: float) -> Tuple[np.ndarray, int]:
    """Binary mask of the pixels at or above ``mask_threshold`` (a saliency probability).

    Args:
        saliency: uint8 saliency, ``round(255 * p)``.
        mask_threshold: in ``[0, 1]``.

    Returns:
        ``(mask, level)``: uint8 0/1 array of the same shape and the 8-bit level used
        (``round(255 * mask_threshold)``, at least 1).
    """
    level = max(1, int(np.floor(255.0 * float(mask_threshold) + 0.5)))
    return (np.asarray(saliency) >= level).astype(np.uint8), level


def update_mask_segmentation(scene, volume, mask: np.ndarray, segment_name: str, name: Optional[str] = None):
    """Create or update the editable mask segmentation of ``volume``.

    Args:
        scene: the MRML scene.
        volume: the input volume node (the segmentation's reference geometry).
        mask: ``(K, J, I)`` 0/1 array on the volume's grid.
        segment_name: name of the single segment.
        name: node name (default ``"<volume> saliency mask"``).

    Returns:
        the ``vtkMRMLSegmentationNode``; its segment is empty when the mask is.
    """
    import slicer

    node = volume.GetNodeReference(REF_MASK)
    if node is None or node.GetScene() is not scene:
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or f"{volume.GetName()} saliency mask")
        volume.SetNodeReferenceID(REF_MASK, node.GetID())
        node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    parent = volume.GetParentTransformNode()
    node.SetAndObserveTransformNodeID(parent.GetID() if parent is not None else None)
    segmentation = node.GetSegmentation()
    segmentation.RemoveAllSegments()
    labelmap = slicer.vtkMRMLLabelMapVolumeNode()
    labelmap.SetName(segment_name)
    scene.AddNode(labelmap)
    try:
        set_volume_array(labelmap, np.ascontiguousarray(mask, dtype=np.uint8))
        m = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(m)
        labelmap.SetIJKToRASMatrix(m)
        if np.any(mask):
            if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, node):
                raise RuntimeError("the saliency mask could not be converted to a segmentation")
    finally:
        display = labelmap.GetDisplayNode()
        scene.RemoveNode(labelmap)
        if display is not None:
            scene.RemoveNode(display)
    if segmentation.GetNumberOfSegments() == 0:
        # an empty segment to paint in; built directly (AddEmptySegment needs the converter rules
        # that only the Segmentations module registers)
        segment = slicer.vtkSegment()
        empty = slicer.vtkOrientedImageData()
        empty.SetExtent(0, -1, 0, -1, 0, -1)
        empty.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), empty)
        segmentation.AddSegment(segment, "saliency")
    segment = segmentation.GetNthSegment(0)
    segment.SetName(segment_name)
    segment.SetColor(*MASK_SEGMENT_COLOR)
    node.SetAttribute("ThyroidNodule.Role", "mask")
    display = node.GetDisplayNode()
    if display is not None:
        display.SetOpacity2DFill(0.25)
        display.SetOpacity2DOutline(1.0)
    node.Modified()
    return node


def segmentation_mask_array(scene, segmentation, volume) -> Optional[np.ndarray]:
    """All segments of ``segmentation`` as one 0/1 uint8 ``(K, J, I)`` array on ``volume``'s grid,
    or ``None`` when the segmentation has no segment or paints no pixel."""
    import slicer

    seg = segmentation.GetSegmentation()
    if seg.GetNumberOfSegments() == 0:
        return None
    ids = vtk.vtkStringArray()
    for n in range(seg.GetNumberOfSegments()):
        ids.InsertNextValue(seg.GetNthSegmentID(n))
    labelmap = slicer.vtkMRMLLabelMapVolumeNode()
    labelmap.SetName("ThyroidNodule export")
    scene.AddNode(labelmap)
    try:
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation, ids, labelmap, volume):
            raise RuntimeError("the mask segmentation could not be exported on the image's grid")
        array = volume_array(labelmap)
    finally:
        display = labelmap.GetDisplayNode()
        scene.RemoveNode(labelmap)
        if display is not None:
            scene.RemoveNode(display)
    expected = tuple(reversed(volume.GetImageData().GetDimensions()))
    if array.shape != expected:
        raise RuntimeError(f"the exported mask has shape {array.shape}, the image {expected}")
    mask = (array > 0).astype(np.uint8)
    return mask if mask.any() else None


def remove_saliency(scene, volume) -> int:
    """Remove the heat volume and mask segmentation of ``volume`` (e.g. when a new answer has no
    usable mask, so an old mask is not shown as if it were the new one); returns how many nodes
    were removed."""
    removed = 0
    for ref in (REF_HEAT, REF_MASK):
        node = volume.GetNodeReference(ref)
        volume.SetNodeReferenceID(ref, None)
        if node is not None and node.GetScene() is scene:
            for n in range(node.GetNumberOfDisplayNodes()):
                display = node.GetNthDisplayNode(n)
                if display is not None:
                    scene.RemoveNode(display)
            scene.RemoveNode(node)
            removed += 1
    return removed


def set_overlay(scene, volume, heat, opacity: float) -> int:
    """Show ``volume`` as background and ``heat`` as foreground at ``opacity`` (0..1) in every
    slice view of the scene; returns the number of views changed."""
    count = 0
    for n in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(n, "vtkMRMLSliceCompositeNode")
        if volume is not None:
            composite.SetBackgroundVolumeID(volume.GetID())
        if heat is not None:
            composite.SetForegroundVolumeID(heat.GetID())
        composite.SetForegroundOpacity(max(0.0, min(1.0, float(opacity))))
        count += 1
    return count
