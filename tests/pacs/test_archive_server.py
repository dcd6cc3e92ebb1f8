"""The app served on a real Orthanc (DICOMweb): listing, classification by id, results and
confirmed diagnoses written to the archive and read back, batch without duplicates."""

from __future__ import annotations

import io
import json

import numpy as np
import pydicom
import pytest
import requests

from tests.pacs.conftest import DELTA_CM, archive_server
from tests.support.server import parse_multipart

pytestmark = pytest.mark.slow

TIMEOUT = 120


@pytest.fixture(scope="module")
def server(tmp_path_factory, orthanc, archive, app_model_dir):
    root = tmp_path_factory.mktemp("pacs_app")
    with archive_server(root, orthanc, app_model_dir, root / "cache") as s:
        yield s


def reference_bytes(ds) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, write_like_original=False)
    return buf.getvalue()


def classify_upload(url: str, ds, frame: int) -> dict:
    params = {"frame": frame} if int(ds.get("NumberOfFrames", 1)) > 1 else {}
    r = requests.post(f"{url}/infer/classify_nodule", params={"output": "json"},
                      files={"file": ("f.dcm", reference_bytes(ds), "application/dicom")},
                      data={"params": json.dumps(params)}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return r.json()


def test_datastore_lists_every_ultrasound_frame_with_its_archive_uids(server, archive):
    r = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    objects = r.json()["objects"]
    assert set(objects) == set(archive.frames)  # 3 single frames + 3 frames of the clip
    for image_id, (kind, index) in archive.frames.items():
        ds = archive.datasets[kind]
        info = objects[image_id]["image"]["info"]
        assert info["study_instance_uid"] == ds.StudyInstanceUID
        assert info["series_instance_uid"] == ds.SeriesInstanceUID
        assert info["sop_instance_uid"] == ds.SOPInstanceUID
        assert info["frame"] == index + 1
        assert info["case"] == ds.PatientID
    info = requests.get(f"{server.url}/info/", timeout=TIMEOUT).json()["datastore"]
    assert info["total"] == 6 and info["archive"]["reachable"] is True


@pytest.mark.parametrize("kind", ["gray", "rgb_jpeg", "clip_jpeg"])
def test_classify_by_id_equals_the_uploaded_frame_and_keeps_the_region_spacing(server, archive, kind):
    ds = archive.datasets[kind]
    frame = 1 if kind == "clip_jpeg" else 0
    image_id = ds.SOPInstanceUID if frame == 0 and kind != "clip_jpeg" else f"{ds.SOPInstanceUID}-f{frame + 1}"
    r = requests.post(f"{server.url}/infer/classify_nodule", params={"image": image_id, "output": "all"},
                      data={"params": json.dumps({"roi": [30, 30, 270, 270]})}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    result, mask_bytes = parse_multipart(r)
    expected_mm = [DELTA_CM[0] * 10, DELTA_CM[1] * 10]
    assert result["image"]["spacing"][:2] == pytest.approx(expected_mm)
    mask = pydicom.dcmread(io.BytesIO(mask_bytes))
    assert [float(v) for v in mask.PixelSpacing] == pytest.approx(expected_mm[::-1])  # row, column
    assert mask.Rows == ds.Rows and mask.Columns == ds.Columns
    assert mask.StudyInstanceUID == ds.StudyInstanceUID
    assert mask.SourceImageSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    # the same frame uploaded directly gives the same answer
    uploaded = requests.post(f"{server.url}/infer/classify_nodule", params={"output": "json"},
                             files={"file": ("f.dcm", reference_bytes(ds), "application/dicom")},
                             data={"params": json.dumps({"roi": [30, 30, 270, 270], "frame": frame})},
                             timeout=TIMEOUT).json()
    assert result["probabilities"] == pytest.approx(uploaded["probabilities"], abs=1e-6)
    assert result["label"] == uploaded["label"]


def test_unknown_or_malformed_archive_ids_are_404(server):
    for image_id in ("1.2.3.4.5.6.7", "1.2.3.4-f2"):
        r = requests.post(f"{server.url}/infer/classify_nodule", params={"image": image_id, "output": "json"},
                          timeout=TIMEOUT)
        assert r.status_code == 404, r.text
        assert "archive" in r.json()["detail"]
    r = requests.post(f"{server.url}/infer/classify_nodule", params={"image": "../etc/passwd", "output": "json"},
                      timeout=TIMEOUT)
    assert r.status_code in (404, 422)
