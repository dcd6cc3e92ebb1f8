"""A single classification by archive id writes its result SR and saliency back to a real Orthanc
(in the background, once per model and frame); an archive that is down or full of work costs
the answer nothing and shows in ``/info``."""

from __future__ import annotations

import io
import time

import numpy as np
import pydicom
import pytest
import requests

from tests.pacs.conftest import archive_objects, archive_server, results_status, retrieve, wait_until

pytestmark = pytest.mark.slow

TIMEOUT = 120


@pytest.fixture(scope="module")
def server(tmp_path_factory, orthanc, archive, app_model_dir):
    root = tmp_path_factory.mktemp("pacs_results")
    with archive_server(root, orthanc, app_model_dir, root / "cache", archive_timeout=2) as s:
        yield s


def frame_id(archive, kind: str, frame: int = 1) -> str:
    ds = archive.datasets[kind]
    return ds.SOPInstanceUID if int(ds.get("NumberOfFrames", 1)) == 1 else f"{ds.SOPInstanceUID}-f{frame}"


def classify(server, image_id: str, roi=None) -> requests.Response:
    import json

    data = {"params": json.dumps({"roi": roi})} if roi else None
    return requests.post(f"{server.url}/infer/classify_nodule", params={"image": image_id, "output": "json"},
                         data=data, timeout=TIMEOUT)


def result_objects(orthanc, sop: str, frame):
    """The archive's result SR and saliency object of the source ``sop`` / ``frame``, or None."""
    from lib.archive import reports

    srs = [u for u in archive_objects(orthanc, "SR") if retrieve(orthanc, u).SeriesDescription == reports.RESULT_SERIES]
    found = [(u, f) for u in srs for f in reports.parse_sr(retrieve(orthanc, u)) if f.sop == sop and f.frame == frame]
    if not found:
        return None
    saliency = [u for modality in ("SEG", "OT") for u in archive_objects(orthanc, modality)
                if u[2] == reports.result_uid("saliency", found[0][1].model, sop, frame)]
    return found, saliency


@pytest.mark.parametrize("kind", ["gray", "clip_jpeg"])
def test_a_classification_by_id_writes_its_sr_and_saliency_linked_to_the_source(server, orthanc, archive, kind):
    import highdicom as hd

    from lib.archive import reports

    source = archive.datasets[kind]
    frame = 2 if kind == "clip_jpeg" else None
    image_id = frame_id(archive, kind, frame or 1)
    assert result_objects(orthanc, source.SOPInstanceUID, frame) is None
    r = classify(server, image_id, roi=[30, 40, 260, 250])
    assert r.status_code == 200, r.text
    answer = r.json()
    found, saliency = wait_until(lambda: result_objects(orthanc, source.SOPInstanceUID, frame), "the result SR")
    ((sr_uids, finding),) = found
    sr = retrieve(orthanc, sr_uids)
    assert hd.sr.ComprehensiveSR.from_dataset(sr) is not None
    assert finding.label == answer["label"] and finding.model == answer["model"]
    assert finding.probability == pytest.approx(answer["probabilities"]["malignant"], abs=1e-6)
    assert finding.threshold == pytest.approx(answer["threshold"])
    assert finding.roi == pytest.approx(answer["roi"])
    assert finding.note == reports.RESEARCH_NOTE
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == source.PatientID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    assert evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    # the saliency is stored before the SR: it is there
    (saliency_uids,) = saliency
    mask = retrieve(orthanc, saliency_uids)
    assert mask.StudyInstanceUID == source.StudyInstanceUID
    if frame is None:
        seg = hd.seg.Segmentation.from_dataset(mask)
        referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
        assert referenced == source.SOPInstanceUID
        assert seg.pixel_array.shape[-2:] == (source.Rows, source.Columns)
    else:  # a frame of a clip: a Secondary Capture that names the clip and the frame
        assert mask.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert int(mask.SourceImageSequence[0].ReferencedFrameNumber) == frame
        assert mask.pixel_array.shape == (source.Rows, source.Columns)
    assert np.asarray(mask.pixel_array).max() > 0
    assert results_status(server)["failed"] == 0


def test_classifying_a_frame_again_with_the_same_model_writes_nothing_new(server, orthanc, archive):
    source = archive.datasets["rgb_jpeg"]
    image_id = frame_id(archive, "rgb_jpeg")
    assert classify(server, image_id).status_code == 200
    wait_until(lambda: result_objects(orthanc, source.SOPInstanceUID, None), "the first result")
    counts = {m: len(archive_objects(orthanc, m)) for m in ("SR", "SEG", "OT")}
    before = results_status(server)
    r = classify(server, image_id, roi=[10, 10, 200, 200])  # another ROI: still this model's result for the frame
    assert r.status_code == 200, r.text
    after = wait_until(lambda: (s := results_status(server))["already_stored"] > before["already_stored"] and s,
                       "the second result found already stored")
    assert after["stored"] == before["stored"] and after["writing"] == 0
    assert {m: len(archive_objects(orthanc, m)) for m in ("SR", "SEG", "OT")} == counts
    # an upload of the same frame is no archive frame: nothing is handed to the writer (which
    # would be writing it, or would have found it stored, by the time the answer is read)
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, source, write_like_original=False)
    r = requests.post(f"{server.url}/infer/classify_nodule", params={"output": "json"},
                      files={"file": ("f.dcm", buf.getvalue(), "application/dicom")}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    status = results_status(server)
    assert status["writing"] == 0 and status["already_stored"] == after["already_stored"]


def test_with_the_archive_stopped_classification_answers_and_info_counts_the_failure(server, orthanc, archive):
    from pydicom.uid import generate_uid

    from tests.pacs.conftest import store
    from tests.support.us_dicom import Study, gray_frame, us_dataset

    new = us_dataset(Study("TN-0031", "Poe^Ed"), generate_uid(), [gray_frame(archive.rows[5]["file"])], 1)
    store(orthanc, [new])  # never fetched by the server
    cached, uncached = frame_id(archive, "gray_b"), new.SOPInstanceUID
    assert classify(server, cached).status_code == 200  # now in the cache (its result is written)
    wait_until(lambda: results_status(server)["writing"] == 0, "the writer idle")
    failed = results_status(server)["failed"]
    orthanc.stop()
    try:
        r = classify(server, cached)
        assert r.status_code == 200, r.text
        r = classify(server, uncached)
        assert r.status_code == 503 and "cannot be reached" in r.json()["detail"], r.text
        status = wait_until(lambda: (s := results_status(server))["failed"] > failed and s, "the failure counted")
        assert "cannot be reached" in status["last_error"] and status["writing"] == 0
        start = time.monotonic()
        assert requests.get(f"{server.url}/info/", timeout=TIMEOUT).status_code == 200
        assert time.monotonic() - start < 5
    finally:
        orthanc.start()


def test_a_full_queue_drops_results_and_counts_them(tmp_path, orthanc, archive):
    """The datastore itself, one result allowed to wait: while the archive is frozen the worker
    is stuck on the first result, the second waits, the third is dropped."""
    from lib.archive.datastore import ArchiveDatastore
    from thyroid_plugin.io import encode_mask, load_image

    store = ArchiveDatastore(orthanc.dicomweb, str(tmp_path / "cache"), timeout=2, result_queue=1)
    store.refresh()
    ids = [frame_id(archive, "clip_jpeg", 1), frame_id(archive, "gray"), frame_id(archive, "rgb_jpeg")]
    model = f"sha256:{time.time_ns():x}"  # a model the archive has no result of
    jobs = []
    for image_id in ids:
        path = store.get_image_uri(image_id)
        image = load_image(path)
        mask = encode_mask(image, np.full(image.array.shape[:2], 128, np.uint8))
        result = {"label": "benign", "probabilities": {"benign": 0.7, "malignant": 0.3}, "threshold": 0.5,
                  "roi": None, "model": model}
        jobs.append((path, mask, result))
    assert store.keep_result(str(tmp_path / "elsewhere.dcm"), jobs[0][1], jobs[0][2]) is False  # not an archive frame
    orthanc.pause()
    try:
        assert store.keep_result(*jobs[0]) is True
        wait_until(lambda: store.results.status()["waiting"] == 0, "the worker taking the first result", 5)
        assert store.keep_result(*jobs[1]) is True
        assert store.keep_result(*jobs[1]) is False  # already queued: not twice
        assert store.keep_result(*jobs[2]) is False
        status = store.results.status()
        assert status["dropped"] == 1 and status["waiting"] == 1 and "not written" in status["last_error"]
        wait_until(lambda: store.results.status()["failed"] == 1, "the frozen archive's timeout", 15)
    finally:
        orthanc.resume()
    status = wait_until(lambda: (s := store.results.status())["writing"] == 0 and s, "the queue drained")
    assert (status["stored"], status["failed"], status["dropped"]) == (1, 1, 1)
    from lib.archive import reports

    stored = {u[2] for u in archive_objects(orthanc, "SR")}
    assert reports.result_uid("sr", model, archive.datasets["gray"].SOPInstanceUID, None) in stored
    assert reports.result_uid("sr", model, archive.datasets["rgb_jpeg"].SOPInstanceUID, None) not in stored
    assert reports.result_uid("sr", model, archive.datasets["clip_jpeg"].SOPInstanceUID, 1) not in stored
