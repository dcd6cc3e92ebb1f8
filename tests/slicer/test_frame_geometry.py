"""The frame file the module uploads, the masks it reads back and the ROI box, checked against
3D Slicer's own NRRD writer/reader (slicer-core) and the server's image reader, without a server."""

from __future__ import annotations

import math

import numpy as np
import pytest

from .helpers import RASTER_IJK_TO_RAS, add_volume, matrix, read_with_slicer, save_with_slicer


def oblique(spacing=(0.12, 0.15, 0.5), origin=(31.5, -12.25, 7.0), degrees=25.0) -> np.ndarray:
    a = math.radians(degrees)
    rotation = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    m = np.eye(4)
    m[:3, :3] = rotation @ np.diag([-1.0, -1.0, 1.0]) @ np.diag(spacing)
    m[:3, 3] = origin
    return m


def random_frame(shape, dtype=np.uint8, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, np.iinfo(dtype).max, size=shape, dtype=dtype)


def header_fields(blob: bytes) -> dict:
    from ThyroidNoduleLib.nrrd import read_nrrd

    return read_nrrd(blob).fields


@pytest.mark.parametrize("vector", [False, True], ids=["scalar", "rgb"])
def test_frame_file_is_what_slicer_writes(scene, tmp_path, vector):
    """Same header fields as vtkMRMLVolumeArchetypeStorageNode writes, and Slicer reads our file
    back to the same voxels and IJKToRAS."""
    from ThyroidNoduleLib import NoduleLogic
    from ThyroidNoduleLib.nrrd import read_nrrd

    array = random_frame((1, 40, 60, 3) if vector else (1, 40, 60))
    volume = add_volume(scene, array, oblique(), "frame")
    data, layout, grid = NoduleLogic(scene).frame_file(volume)
    ours = read_nrrd(data)
    slicers = read_nrrd(save_with_slicer(scene, volume, tmp_path / "slicer.nrrd").read_bytes())

    for key in ("type", "dimension", "space", "sizes", "kinds", "encoding"):
        assert ours.fields[key] == slicers.fields[key], key
    assert ours.sizes == ([3, 60, 40, 1] if vector else [60, 40, 1])
    assert ours.kinds == (["rgb-color", "domain", "domain", "domain"] if vector else ["domain"] * 3)
    np.testing.assert_allclose(ours.ijk_to_lps(), slicers.ijk_to_lps(), atol=1e-12)
    np.testing.assert_array_equal(ours.data, slicers.data)

    path = tmp_path / "ours.nrrd"
    path.write_bytes(data)
    back = read_with_slicer(scene, path, vector=vector)
    from ThyroidNoduleLib.volumes import volume_array

    np.testing.assert_array_equal(volume_array(back), array)
    np.testing.assert_allclose(matrix(back), oblique(), atol=1e-12)
    assert grid["size"] == [60, 40] and grid["spacing"] == pytest.approx([0.12, 0.15, 0.5])


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.float32])
def test_frame_file_pixel_types_read_by_the_server_reader(scene, tmp_path, dtype):
    """The server reads the uploaded frame with thyroid_plugin.io.load_image: same pixels
    (``array[row, column]``) and the LPS grid of the volume."""
    from thyroid_plugin.io import load_image

    from ThyroidNoduleLib import NoduleLogic

    array = random_frame((1, 30, 50), np.uint16, seed=3).astype(dtype)
    volume = add_volume(scene, array, oblique(), "typed")
    data, _, grid = NoduleLogic(scene).frame_file(volume)
    path = tmp_path / "frame.nrrd"
    path.write_bytes(data)
    image = load_image(path)
    np.testing.assert_array_equal(image.array, array[0])
    assert list(image.spacing) == pytest.approx(grid["spacing"])
    assert list(image.origin) == pytest.approx(grid["origin"])
    np.testing.assert_allclose(image.direction, np.array(grid["direction"]), atol=1e-12)


def test_frame_with_the_slice_axis_in_the_middle(scene, tmp_path):
    """A single-slice volume stored as (W, 1, H) (e.g. a coronal frame) is sent as a W x H frame
    whose grid is the same physical plane, and the mask comes back on the volume's (W, 1, H)."""
    from thyroid_plugin.io import load_image

    from ThyroidNoduleLib import NoduleLogic
    from ThyroidNoduleLib.geometry import FrameLayout

    array = random_frame((40, 1, 60))  # (K, J, I): I = 60 columns, J = 1, K = 40
    m = np.array([[-0.2, 0, 0, 5.0], [0, 0, 1.0, 2.0], [0, 0.3, 0, -8.0], [0, 0, 0, 1]])
    m = m[:, [0, 2, 1, 3]]  # i -> R/L, j -> A/P (thickness), k -> S/I
    volume = add_volume(scene, array, m, "coronal")
    data, layout, grid = NoduleLogic(scene).frame_file(volume)
    assert layout == FrameLayout(dims=(60, 1, 40), axes=(0, 2, 1))
    assert (layout.width, layout.height) == (60, 40)
    path = tmp_path / "coronal.nrrd"
    path.write_bytes(data)
    image = load_image(path)
    np.testing.assert_array_equal(image.array, array[:, 0, :])
    # every pixel is where the volume has it, in LPS
    for (x, y) in [(0, 0), (59, 0), (13, 27), (59, 39)]:
        ras = m @ np.array([x, 0, y, 1.0])
        lps = image.affine @ np.array([x, y, 0, 1.0])
        np.testing.assert_allclose(lps[:3], [-ras[0], -ras[1], ras[2]], atol=1e-9)
    mask = random_frame((1, 40, 60), seed=9)
    np.testing.assert_array_equal(layout.from_file_array(mask), mask[0][:, None, :])
    np.testing.assert_array_equal(layout.to_file_array(layout.from_file_array(mask)), mask)


def test_volume_with_several_slices_is_refused(scene):
    from ThyroidNoduleLib import InputError, NoduleLogic

    volume = add_volume(scene, random_frame((5, 30, 40)), np.eye(4), "stack")
    with pytest.raises(InputError, match="has 5 slices of 40x30 pixels"):
        NoduleLogic(scene).prepare_frame(volume)


def test_label_map_and_missing_volume_are_refused(scene):
    from ThyroidNoduleLib import InputError, NoduleLogic

    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "seg")
    with pytest.raises(InputError, match="label map"):
        NoduleLogic(scene).prepare_frame(labelmap)
    with pytest.raises(InputError, match="Select the ultrasound image"):
        NoduleLogic(scene).prepare_frame(None)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(InputError, match="no image data"):
        NoduleLogic(scene).prepare_frame(empty)


# ------------------------------------------------------------------------------------------ ROI
def test_roi_on_a_png_frame(scene):
    from ThyroidNoduleLib import NoduleLogic

    volume = add_volume(scene, random_frame((1, 300, 300)), RASTER_IJK_TO_RAS, "png")
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    roi.SetCenter(-150.0, -100.0, 0.0)
    roi.SetSize(100.0, 60.0, 0.0)  # a flat box drawn in the slice view
    # pixels i in [100, 200], j in [70, 130] have their centres inside (edges included)
    assert NoduleLogic(scene).roi_box(volume, roi) == [100, 70, 201, 131]


def test_roi_on_an_oblique_frame_under_transforms(scene):
    """The ROI and the volume may be rotated and under different linear transforms: the box is
    found in the frame's own pixel grid."""
    import vtk

    from ThyroidNoduleLib import NoduleLogic
    from ThyroidNoduleLib.volumes import vtk_matrix

    m = oblique()
    volume = add_volume(scene, random_frame((1, 100, 120)), m, "oblique")
    shift = np.eye(4)
    shift[:3, 3] = [10.0, -4.0, 2.5]
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "probe motion")
    transform.SetMatrixTransformToParent(vtk_matrix(shift))
    volume.SetAndObserveTransformNodeID(transform.GetID())
    # an ROI aligned with the frame's axes covering columns 20..49 and rows 10..39
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    world = shift @ m
    directions = world[:3, :3] / np.linalg.norm(world[:3, :3], axis=0)
    object_to_node = np.eye(4)
    object_to_node[:3, :3] = directions
    object_to_node[:3, 3] = (world @ np.array([34.5, 24.5, 0.0, 1.0]))[:3]
    roi.SetAndObserveObjectToNodeMatrix(vtk_matrix(object_to_node))
    roi.SetSize(30 * 0.12, 30 * 0.15, 0.5)
    assert NoduleLogic(scene).roi_box(volume, roi) == [20, 10, 50, 40]
    assert isinstance(transform.GetMatrixTransformToParent(), vtk.vtkMatrix4x4)


def test_roi_off_the_plane_or_outside_the_frame(scene):
    from ThyroidNoduleLib import InputError, NoduleLogic

    logic = NoduleLogic(scene)
    volume = add_volume(scene, random_frame((1, 50, 50)), RASTER_IJK_TO_RAS, "png")
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    roi.SetCenter(-25.0, -25.0, 40.0)
    roi.SetSize(10.0, 10.0, 1.0)
    with pytest.raises(InputError, match="not on the image plane"):
        logic.roi_box(volume, roi)
    roi.SetCenter(300.0, 300.0, 0.0)
    with pytest.raises(InputError, match="does not cover any pixel"):
        logic.roi_box(volume, roi)
    # partly outside: clipped to the frame
    roi.SetCenter(-45.0, -5.0, 0.0)
    roi.SetSize(20.0, 20.0, 1.0)
    assert logic.roi_box(volume, roi) == [35, 0, 50, 16]


# ----------------------------------------------------------------------------------- NRRD I/O
def test_nrrd_reader_handles_pynrrd_and_raw_big_endian(tmp_path):
    """Masks come from the server written by pynrrd (``type: uint8``, gzip); other writers use raw
    and big-endian data."""
    import nrrd

    from ThyroidNoduleLib.nrrd import read_nrrd

    mask = random_frame((20, 30))
    header = {"type": "uint8", "encoding": "gzip", "space": "left-posterior-superior", "kinds": ["domain"] * 3,
              "space directions": np.diag([0.5, 0.7, 1.0]), "space origin": np.array([1.0, 2.0, 3.0])}
    nrrd.write(str(tmp_path / "m.nrrd"), mask.T[..., None], header, index_order="F")
    image = read_nrrd((tmp_path / "m.nrrd").read_bytes())
    np.testing.assert_array_equal(image.data[0], mask)
    np.testing.assert_allclose(image.ijk_to_lps()[:3, 3], [1, 2, 3])

    values = random_frame((4, 5), np.uint16)
    nrrd.write(str(tmp_path / "b.nrrd"), values.T, {"type": "uint16", "encoding": "raw", "endian": "big"},
               index_order="F")
    np.testing.assert_array_equal(read_nrrd((tmp_path / "b.nrrd").read_bytes()).data, values)


def test_nrrd_reader_refuses_what_it_cannot_read():
    from ThyroidNoduleLib.nrrd import NrrdError, read_nrrd
    from ThyroidNoduleLib.volumes import write_nrrd

    with pytest.raises(NrrdError, match="not an NRRD"):
        read_nrrd(b"\x89PNG\r\n\x1a\n....")
    with pytest.raises(NrrdError, match="detached"):
        read_nrrd(b"NRRD0004\ntype: uchar\ndimension: 2\nsizes: 2 2\ndata file: x.raw\nencoding: raw\n\n")
    good = write_nrrd(np.zeros((1, 4, 4), np.uint8), np.eye(4), compress=False)
    with pytest.raises(NrrdError, match="bytes of data"):
        read_nrrd(good[:-3])


def test_saliency_threshold_level():
    from ThyroidNoduleLib.display import mask_to_labelmap_array

    saliency = np.array([[0, 1, 127, 128, 200, 255]], np.uint8)
    mask, level = mask_to_labelmap_array(saliency, 0.5)
    assert level == 128  # round(255 * 0.5): the server's binary mask is p >= 0.5
    np.testing.assert_array_equal(mask, [[0, 0, 0, 1, 1, 1]])


def test_mask_nodes_follow_the_volume_and_are_reused(scene):
    """Heat volume and segmentation are on the volume's grid and parent transform; classifying
    again updates the same nodes; the overlay shows in every slice view."""
    from ThyroidNoduleLib.display import (
        segmentation_mask_array,
        set_overlay,
        update_heat_volume,
        update_mask_segmentation,
    )
    from ThyroidNoduleLib.volumes import volume_array

    volume = add_volume(scene, random_frame((1, 30, 40)), oblique(), "frame")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    saliency = random_frame((1, 30, 40), seed=5)
    heat = update_heat_volume(scene, volume, saliency)
    mask = (saliency >= 128).astype(np.uint8)
    seg = update_mask_segmentation(scene, volume, mask, "Saliency")
    np.testing.assert_allclose(matrix(heat), oblique())
    assert heat.GetParentTransformNode() is transform and seg.GetParentTransformNode() is transform
    np.testing.assert_array_equal(volume_array(heat), saliency)
    np.testing.assert_array_equal(segmentation_mask_array(scene, seg, volume), mask)
    assert set_overlay(scene, volume, heat, 0.4) == 3
    composite = scene.GetNthNodeByClass(0, "vtkMRMLSliceCompositeNode")
    assert composite.GetForegroundVolumeID() == heat.GetID() and composite.GetForegroundOpacity() == pytest.approx(0.4)

    empty = np.zeros_like(mask)
    assert update_heat_volume(scene, volume, empty) is heat
    assert update_mask_segmentation(scene, volume, empty, "Saliency") is seg
    assert seg.GetSegmentation().GetNumberOfSegments() == 1  # an empty segment to paint in
    assert segmentation_mask_array(scene, seg, volume) is None
    assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0  # no temporary node left


# ------------------------------------------------------------------------------ loading files
@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P", "I;16"])
def test_lib_loader_reads_png_like_slicer(scene, tmp_path, mode):
    from PIL import Image

    from ThyroidNoduleLib.volumes import load_frame_file, volume_array

    rgb = random_frame((24, 36, 3), seed=1)
    image = Image.fromarray(rgb, "RGB")
    image = image.convert("L").convert("I;16") if mode == "I;16" else image.convert(mode)
    path = tmp_path / "frame.png"
    image.save(path)
    node = load_frame_file(scene, str(path))
    expected = np.asarray(image.convert("RGB") if mode in ("RGB", "RGBA", "P") else
                          (image if mode == "I;16" else image.convert("L")))
    assert node.GetClassName() == ("vtkMRMLVectorVolumeNode" if mode in ("RGB", "RGBA", "P") else "vtkMRMLScalarVolumeNode")
    np.testing.assert_array_equal(volume_array(node)[0], expected)
    np.testing.assert_allclose(matrix(node), RASTER_IJK_TO_RAS)


def test_lib_loader_reads_jpeg_and_nrrd_and_refuses_dicom(scene, tmp_path):
    from PIL import Image

    from ThyroidNoduleLib import InputError
    from ThyroidNoduleLib.volumes import load_frame_file, volume_array

    rgb = random_frame((24, 36, 3), seed=2)
    Image.fromarray(rgb).save(tmp_path / "f.jpg", quality=95)
    node = load_frame_file(scene, str(tmp_path / "f.jpg"))
    np.testing.assert_array_equal(volume_array(node)[0], np.asarray(Image.open(tmp_path / "f.jpg").convert("RGB")))

    original = add_volume(scene, random_frame((1, 10, 12, 3)), oblique(), "rgb")
    path = save_with_slicer(scene, original, tmp_path / "rgb.nrrd")
    loaded = load_frame_file(scene, str(path))
    assert loaded.GetClassName() == "vtkMRMLVectorVolumeNode"
    np.testing.assert_array_equal(volume_array(loaded), volume_array(original))

    dicom = tmp_path / "x.dcm"
    dicom.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 300)
    with pytest.raises(InputError, match="DICOM"):
        load_frame_file(scene, str(dicom))


# ------------------------------------------------------------------------------ URL history
def test_server_address_history():
    from ThyroidNoduleLib import ThyroidNoduleError, normalize_url
    from ThyroidNoduleLib.settings import update_history

    assert normalize_url(" 127.0.0.1:8000/ ") == "http://127.0.0.1:8000"
    assert normalize_url("HTTPS://server.example/monai/") == "https://server.example/monai"
    history = update_history(["http://a:1", "http://b:2", "not a url ::"], "a:1")
    assert history == ["http://a:1", "http://b:2"]
    assert update_history([f"http://h{i}:1" for i in range(20)], "http://new:1", length=8)[0] == "http://new:1"
    assert len(update_history([f"http://h{i}:1" for i in range(20)], "http://new:1", length=8)) == 8
    with pytest.raises(ThyroidNoduleError):
        update_history([], "")


# ------------------------------------------------------------------------------ multipart
def test_multipart_parser_reads_monai_labels_encoder():
    from requests_toolbelt import MultipartEncoder

    from ThyroidNoduleLib.multipart import encode_multipart, parse_multipart

    payload = bytes(range(256)) * 20 + b"\r\n--not-the-boundary\r\n"
    encoder = MultipartEncoder(fields={"params": (None, '{"label": "benign"}', "application/json"),
                                       "image": ("saliency-1.nrrd", payload, "application/octet-stream")})
    parts = parse_multipart(encoder.to_string(), encoder.content_type)
    assert parts["params"].data == b'{"label": "benign"}' and parts["params"].content_type == "application/json"
    assert parts["image"].data == payload and parts["image"].filename == "saliency-1.nrrd"
    body, ctype = encode_multipart({"info": '{"diagnosis": "benign"}', "file": ('a "b".nrrd', payload, "")})
    again = parse_multipart(body, ctype)
    assert again["file"].data == payload and again["file"].filename == 'a "b".nrrd'
    assert again["info"].data == b'{"diagnosis": "benign"}'


def test_multipart_parser_refuses_malformed_bodies():
    from ThyroidNoduleLib.multipart import MAX_PARTS, MultipartError, encode_multipart, header_params, parse_multipart

    body, ctype = encode_multipart({"params": "{}", "image": ("m.nrrd", b"\r\n--x\n" * 50, "")})
    boundary = header_params(ctype)[1]["boundary"]
    refused = {
        "not a multipart body": (body, "application/json"),
        "has no boundary": (body, "multipart/form-data; boundary=" + "b" * 201),
        "does not contain its boundary": (b"<html>Bad gateway</html>", ctype),
        "no closing boundary": (body[:-4], ctype),
        "more than": encode_multipart({f"f{i}": "x" for i in range(MAX_PARTS + 1)}),
        "no field name": (body.replace(b'form-data; name="params"', b"form-data"), ctype),
    }
    for message, (data, content_type) in refused.items():
        with pytest.raises(MultipartError, match=message):
            parse_multipart(data, content_type)
    assert parse_multipart(body, ctype.replace(boundary, f'"{boundary}"'))["image"].data == b"\r\n--x\n" * 50


def test_the_servers_box_is_shown_as_an_roi_that_reads_back_the_same_pixels(scene):
    """The box a server's localiser drew comes back as a markups ROI over exactly those pixels,
    on a plain PNG frame and on an oblique frame under a transform; one ROI per volume."""
    from ThyroidNoduleLib import NoduleLogic
    from ThyroidNoduleLib.volumes import vtk_matrix

    logic = NoduleLogic(scene)
    png = add_volume(scene, random_frame((1, 300, 300)), RASTER_IJK_TO_RAS, "png")
    roi = logic.show_box(png, [37, 52, 190, 201])
    assert logic.roi_box(png, roi) == [37, 52, 190, 201]
    again = logic.show_box(png, [0, 0, 300, 300])  # the whole frame: edges included
    assert again is roi and logic.roi_box(png, roi) == [0, 0, 300, 300]
    oblique_volume = add_volume(scene, random_frame((1, 100, 120)), oblique(), "oblique")
    shift = np.eye(4)
    shift[:3, 3] = [10.0, -4.0, 2.5]
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "probe motion")
    transform.SetMatrixTransformToParent(vtk_matrix(shift))
    oblique_volume.SetAndObserveTransformNodeID(transform.GetID())
    other = logic.show_box(oblique_volume, [20, 10, 50, 40])
    assert other is not roi and logic.roi_box(oblique_volume, other) == [20, 10, 50, 40]
    assert scene.GetNumberOfNodesByClass("vtkMRMLMarkupsROINode") == 2
