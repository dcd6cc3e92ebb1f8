"""The module's logic against a real MONAI Label server with real MRML nodes (slicer-core):
classify gray, colour and Slicer-saved NRRD frames, the ROI path, confirm with and without a
mask, next case, classify all."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.paths import DDTI

from .conftest import CONFIRMED, UNCONFIRMED, unconfirmed_ids
from .helpers import (
    RASTER_IJK_TO_RAS,
    add_volume,
    colour_frame,
    load_like_slicer,
    matrix,
    read_with_slicer,
    save_with_slicer,
)

pytestmark = pytest.mark.slow


def heat_array(classification) -> np.ndarray:
    from ThyroidNoduleLib.volumes import volume_array

    return volume_array(classification.heat_volume)


def direct_mask(client, file_name: str, data: bytes, params=None) -> tuple:
    """Classify an image file by uploading it as it is: (result, mask as (H, W) uint8 from the PNG
    or NRRD the server returns)."""
    from ThyroidNoduleLib.nrrd import read_nrrd

    response = client.infer("classify_nodule", file_name, data, params or {}, output="all")
    assert response.mask is not None
    if response.mask.startswith(b"NRRD"):
        image = read_nrrd(response.mask)
        mask = image.data.reshape(image.sizes[1], image.sizes[0])
    else:
        mask = np.asarray(Image.open(io.BytesIO(response.mask)))
    return response.result, mask


def assert_on_volume_grid(node, volume) -> None:
    assert node.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
    np.testing.assert_allclose(matrix(node), matrix(volume), atol=1e-9)


def test_test_connection_reports_app_model_and_metrics(logic, server):
    report = logic.test_connection()
    assert report.url == server.url
    assert report.app.startswith("Thyroid Nodule")
    assert report.model.startswith("sha256:")
    assert {"auc", "accuracy"} <= set(report.metrics)
    assert report.datastore["total"] >= len(CONFIRMED) + len(UNCONFIRMED)
    message = report.message()
    assert server.url in message and report.model in message and "auc" in message
    assert f"at threshold {report.metrics['threshold']:.2f}" in message  # the served threshold, as the server says
    assert report.calibration == report.info["models"]["classify_nodule"]["model"]["calibration"]
    assert ("Probabilities not calibrated" in message) == (report.calibration is None)


def test_classify_gray_png_frame_mask_matches_direct_upload(logic, scene):
    path = Path(CONFIRMED[0]["file"])
    volume = load_like_slicer(scene, path)
    assert volume.GetClassName() == "vtkMRMLScalarVolumeNode"

    c = logic.classify(volume)

    assert c.label in ("benign", "malignant")
    assert math.isclose(sum(c.result["probabilities"].values()), 1.0, abs_tol=1e-5)
    assert c.probability == c.result["probabilities"][c.label]
    assert c.model.startswith("sha256:") and c.warning == ""
    # no box: the server says the whole image was classified, and the module passes it on
    assert c.result["warnings"] and "whole image" in c.advice and c.advice.startswith("No nodule box")
    assert_on_volume_grid(c.heat_volume, volume)
    # The frame went to the server as an NRRD written from the volume; the answer must be the one
    # for the original PNG, pixel for pixel (same orientation, same values).
    result, mask = direct_mask(logic.client, path.name, path.read_bytes())
    assert result["probabilities"] == pytest.approx(c.result["probabilities"], abs=1e-4)
    np.testing.assert_array_equal(heat_array(c)[0], mask)
    # geometry the server reported is Slicer's geometry of the frame in LPS
    assert c.result["image"]["size"] == [300, 300]
    assert c.result["image"]["direction"] == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


def test_a_dicom_frame_unknown_to_a_folder_server_is_uploaded(logic, scene):
    """A frame loaded through Slicer's DICOM module is first asked for by its UID; a server over
    a studies folder does not hold it (404) and gets the pixels instead, with the same answer
    as a direct upload."""
    path = Path(CONFIRMED[0]["file"])
    volume = load_like_slicer(scene, path)
    volume.SetAttribute("DICOM.instanceUIDs", "1.2.826.0.1.3680043.8.498.1234567890")
    c = logic.classify(volume)
    assert c.warning == ""
    result, mask = direct_mask(logic.client, path.name, path.read_bytes())
    assert result["probabilities"] == pytest.approx(c.result["probabilities"], abs=1e-4)
    np.testing.assert_array_equal(heat_array(c)[0], mask)


def test_classify_colour_frame_as_vector_volume(logic, scene, tmp_path):
    gray = np.asarray(Image.open(CONFIRMED[5]["file"]).convert("L"))
    rgb = colour_frame(gray)
    png = tmp_path / "colour.png"
    Image.fromarray(rgb, mode="RGB").save(png)
    volume = load_like_slicer(scene, png)
    assert volume.GetClassName() == "vtkMRMLVectorVolumeNode"
    assert volume.GetImageData().GetNumberOfScalarComponents() == 3

    c = logic.classify(volume)

    assert c.warning == ""
    assert_on_volume_grid(c.heat_volume, volume)
    assert c.heat_volume.GetImageData().GetNumberOfScalarComponents() == 1
    result, mask = direct_mask(logic.client, png.name, png.read_bytes())
    assert result["probabilities"] == pytest.approx(c.result["probabilities"], abs=1e-4)
    np.testing.assert_array_equal(heat_array(c)[0], mask)
    # the mask segmentation covers exactly the pixels at or above the mask threshold
    from ThyroidNoduleLib.display import segmentation_mask_array

    binary = segmentation_mask_array(scene, c.mask_segmentation, volume)
    np.testing.assert_array_equal(binary if binary is not None else np.zeros_like(mask[None]), (mask >= 128)[None])


@pytest.mark.parametrize("vector", [False, True], ids=["scalar", "rgb"])
def test_classify_slicer_saved_oblique_nrrd(logic, scene, tmp_path, vector):
    """A frame with non-trivial spacing, origin and an oblique direction, saved and re-loaded by
    Slicer's own NRRD writer/reader: the mask comes back on exactly its grid."""
    gray = np.asarray(Image.open(CONFIRMED[2]["file"]).convert("L"))[::2, ::2]  # 150 x 150
    array = colour_frame(gray)[None] if vector else gray[None]
    angle = math.radians(25)
    rotation = np.array([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]])
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = rotation @ np.diag([-1.0, -1.0, 1.0]) @ np.diag([0.12, 0.15, 0.5])
    ijk_to_ras[:3, 3] = [31.5, -12.25, 7.0]
    original = add_volume(scene, array, ijk_to_ras, "oblique")
    path = save_with_slicer(scene, original, tmp_path / "oblique.nrrd")
    volume = read_with_slicer(scene, path, vector=vector, name="oblique frame")
    np.testing.assert_allclose(matrix(volume), ijk_to_ras, atol=1e-9)

    c = logic.classify(volume)

    assert c.warning == ""
    assert_on_volume_grid(c.heat_volume, volume)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_ras
    assert c.result["image"]["size"] == [150, 150]
    assert c.result["image"]["spacing"] == pytest.approx([0.12, 0.15, 0.5], abs=1e-7)
    assert c.result["image"]["origin"] == pytest.approx(lps[:3, 3].tolist(), abs=1e-7)
    np.testing.assert_allclose(np.array(c.result["image"]["direction"]), lps[:3, :3] / [0.12, 0.15, 0.5], atol=1e-7)
    # the Slicer-written file itself gives the same answer when uploaded as it is
    result, mask = direct_mask(logic.client, "slicer.nrrd", path.read_bytes())
    np.testing.assert_array_equal(heat_array(c)[0], mask)
    assert result["probabilities"] == pytest.approx(c.result["probabilities"], abs=1e-4)


def test_classify_with_roi_sends_pixel_box_and_mask_stays_inside(logic, scene):
    volume = load_like_slicer(scene, Path(CONFIRMED[1]["file"]))
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    # pixel (i, j) of a PNG frame is at RAS (-i, -j, 0): cover i in 60..179, j in 80..219
    roi.SetCenter(-(60 + 179) / 2, -(80 + 219) / 2, 0.0)
    roi.SetSize(179 - 60 + 0.5, 219 - 80 + 0.5, 1.0)

    c = logic.classify(volume, roi)

    assert c.roi == [60, 80, 180, 220]
    assert c.result["warnings"] == [] and c.advice == ""
    heat = heat_array(c)[0]
    outside = heat.copy()
    outside[80:220, 60:180] = 0
    assert not outside.any(), "saliency outside the ROI must be 0"
    assert heat[80:220, 60:180].any()
    _, mask = direct_mask(logic.client, "frame.png", Path(CONFIRMED[1]["file"]).read_bytes(), {"roi": [60, 80, 180, 220]})
    np.testing.assert_array_equal(heat, mask)
    from ThyroidNoduleLib.results import ensure_table, table_rows

    assert table_rows(ensure_table(scene))[-1]["ROI"] == "60 80 180 220"


def test_confirm_with_edited_mask_is_stored_on_the_server(logic, scene, server):
    from ThyroidNoduleLib import ATTR_IMAGE_ID
    from ThyroidNoduleLib.display import update_mask_segmentation
    from ThyroidNoduleLib.nrrd import read_nrrd
    from ThyroidNoduleLib.results import ensure_table, table_rows

    path = Path(UNCONFIRMED[0]["file"])
    volume = load_like_slicer(scene, path, name="edited case")
    before = logic.client.info()["datastore"]
    c = logic.classify(volume)
    # the clinician redraws the nodule in Segment Editor: a rectangle replaces the saliency mask
    edited = np.zeros((1, 300, 300), np.uint8)
    edited[0, 100:160, 120:200] = 1
    segmentation = update_mask_segmentation(scene, volume, edited, "Nodule")
    assert segmentation is c.mask_segmentation  # the same node, edited in place

    image_id = logic.confirm(volume, "malignant", segmentation=segmentation)

    assert volume.GetAttribute(ATTR_IMAGE_ID) == image_id
    info = logic.client.image_info(image_id)
    assert info["diagnosis"] == "malignant"
    store = logic.client.datastore("all")
    assert "final" in store["objects"][image_id]["labels"]
    after = logic.client.info()["datastore"]
    assert after["completed"] == before["completed"] + 1
    assert after["diagnoses"]["malignant"] == before["diagnoses"]["malignant"] + 1
    # the stored label is the edited mask on the frame's grid
    _, data = logic.client.download_label(image_id, "final")
    label = read_nrrd(data)
    assert label.sizes == [300, 300, 1]
    np.testing.assert_array_equal(label.data, edited)
    np.testing.assert_allclose(label.ijk_to_lps(), np.diag([-1.0, -1.0, 1.0, 1.0]) @ RASTER_IJK_TO_RAS, atol=1e-9)
    row = table_rows(ensure_table(scene))[-1]
    assert row["Image ID"] == image_id and row["Diagnosis"] == "malignant (with mask)"


def test_confirm_without_mask_records_diagnosis_and_roi(logic, scene):
    gray = np.asarray(Image.open(UNCONFIRMED[1]["file"]).convert("L"))
    volume = add_volume(scene, gray[None], RASTER_IJK_TO_RAS, "unsaved frame")
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    roi.SetCenter(-100.0, -120.0, 0.0)
    roi.SetSize(60.5, 40.5, 1.0)

    image_id = logic.confirm(volume, "benign", roi=roi)

    info = logic.client.image_info(image_id)
    assert info["diagnosis"] == "benign"
    assert info["roi"] == [70.0, 100.0, 131.0, 141.0]
    assert "final" not in logic.client.datastore("all")["objects"][image_id]["labels"]
    # confirming again (a correction) updates the same server image, no second upload
    total = logic.client.info()["datastore"]["total"]
    assert logic.confirm(volume, "malignant") == image_id
    assert logic.client.image_info(image_id)["diagnosis"] == "malignant"
    assert logic.client.info()["datastore"]["total"] == total


def test_next_case_loads_an_unconfirmed_server_image(logic, scene):
    from ThyroidNoduleLib import ATTR_IMAGE_ID, ATTR_SERVER
    from ThyroidNoduleLib.results import ensure_table, table_rows
    from ThyroidNoduleLib.volumes import volume_array

    total = logic.client.info()["datastore"]["total"]
    volume = logic.next_case()

    assert volume is not None
    image_id = volume.GetAttribute(ATTR_IMAGE_ID)
    assert image_id in unconfirmed_ids()
    assert volume.GetAttribute(ATTR_SERVER) == logic.client.base_url
    assert logic.client.image_info(image_id).get("diagnosis") is None
    reference = np.asarray(Image.open(DDTI / "images" / f"{image_id}.png").convert("L"))
    np.testing.assert_array_equal(volume_array(volume)[0], reference)
    np.testing.assert_allclose(matrix(volume), RASTER_IJK_TO_RAS)

    c = logic.classify(volume)
    assert table_rows(ensure_table(scene))[-1]["Image ID"] == image_id
    assert logic.confirm(volume, c.label) == image_id  # the server's own image is updated
    assert logic.client.image_info(image_id)["diagnosis"] == c.label
    assert logic.client.info()["datastore"]["total"] == total


def test_classify_all_adds_a_row_per_server_image(logic, scene):
    from ThyroidNoduleLib.results import ensure_table, table_rows

    seen = []
    batch = logic.classify_all(poll_s=2.0, timeout_s=600, on_progress=seen.append)

    store = logic.client.datastore("all")
    assert set(batch) == set(store["objects"])
    assert all(r["label"] in ("benign", "malignant") and r["model"].startswith("sha256:") for r in batch.values())
    assert seen[-1].status == "DONE"
    # the batch's declared progress record (GET /batch/infer -> details) counted every image
    assert seen[-1].done == seen[-1].total == len(batch)
    assert all(p.done is None or p.done <= p.total for p in seen)
    rows = [r for r in table_rows(ensure_table(scene)) if r["Source"] == "batch"]
    assert sorted(r["Image ID"] for r in rows) == sorted(batch)
    for r in rows:
        result = batch[r["Image ID"]]
        assert float(r["P(malignant)"]) == pytest.approx(result["probabilities"]["malignant"], abs=1e-6)
        assert r["Label"] == result["label"] and r["Model"] == result["model"]
    json.dumps(batch)  # plain JSON all the way


def test_a_frame_without_a_box_comes_back_with_the_localisers_box_to_check_and_move(scene, localiser_server):
    """A server with a nodule localiser boxes a frame sent without a box; the module shows that box
    as a markups ROI over exactly the pixels the server used, and classifying again with it sends
    it as the user's box (the same answer)."""
    from ThyroidNoduleLib import NoduleLogic

    logic = NoduleLogic(scene)
    logic.connect(localiser_server.url)
    volume = load_like_slicer(scene, Path(CONFIRMED[1]["file"]))
    c = logic.classify(volume)
    assert c.result["roi_source"] == "localiser" and len(c.result["roi"]) == 4
    assert c.server_box is not None and logic.roi_box(volume, c.server_box) == c.result["roi"]
    assert "localiser drew" in c.advice and "whole image" not in c.advice
    again = logic.classify(volume, c.server_box)
    assert again.result["roi_source"] == "request" and again.result["roi"] == c.result["roi"]
    assert again.server_box is None and again.advice == ""
    assert again.result["probabilities"] == pytest.approx(c.result["probabilities"], abs=1e-4)
