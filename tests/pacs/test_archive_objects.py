"""The archive's building blocks without a server: image ids, one frame of a clip as a file,
the bounded cache, the SR and SEG written and read back (fast)."""

from __future__ import annotations

import io
import os
import time

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.pacs.conftest import DELTA_CM
from tests.support.paths import ddti_subset
from tests.support.us_dicom import Study, gray_frame, rgb_frame, us_dataset
from thyroid_plugin.io import load_image

from lib.archive import reports  # noqa: E402 (the app's lib, on the path through tests/pacs/conftest.py)
from lib.archive.frames import FrameCache, parse_image_id, refs_of_instance, single_frame_file

RESULT = {"label": "malignant", "probabilities": {"benign": 0.21, "malignant": 0.79}, "threshold": 0.61,
          "roi": [10, 20, 200, 210], "model": "sha256:0123456789abcdef"}


@pytest.fixture(scope="module")
def rows():
    return ddti_subset(2, 2)


def as_bytes(ds) -> bytes:
    return reports.dataset_bytes(ds)


def test_image_ids_map_to_uids_and_frames():
    assert parse_image_id("1.2.840.1234") == ("1.2.840.1234", None)
    assert parse_image_id("1.2.840.1234-f12") == ("1.2.840.1234", 12)
    for bad in ("1.2.840.1234-f0", "abc", "1.2/3", "1.2.3-f", "", "1." * 40):
        with pytest.raises(ValueError):
            parse_image_id(bad)


def test_qido_rows_become_one_id_per_frame():
    def row(sop_class, frames=None):
        r = {"0020000D": {"Value": ["1.2"]}, "0020000E": {"Value": ["1.2.3"]}, "00080018": {"Value": ["1.2.3.4"]},
             "00080016": {"Value": [sop_class]}}
        if frames:
            r["00280008"] = {"Value": [frames]}
        return r

    assert [r.image_id for r in refs_of_instance(row("1.2.840.10008.5.1.4.1.1.6.1"))] == ["1.2.3.4"]
    assert [r.image_id for r in refs_of_instance(row("1.2.840.10008.5.1.4.1.1.3.1", 3))] == \
        ["1.2.3.4-f1", "1.2.3.4-f2", "1.2.3.4-f3"]
    assert refs_of_instance(row("1.2.840.10008.5.1.4.1.1.7")) == []  # secondary capture: not a US frame
    assert refs_of_instance(row("1.2.840.10008.5.1.4.1.1.88.33")) == []  # an SR
    hostile = row("1.2.840.10008.5.1.4.1.1.6.1")
    hostile["00080018"] = {"Value": ["../../../etc/x"]}  # an archive's answer never names a path
    assert refs_of_instance(hostile) == []


def test_cache_names_are_uids_only(tmp_path):
    cache = FrameCache(tmp_path, 1 << 20)
    for kind, name in (("instances", "../x"), ("frames", "1.2/3"), ("other", "1.2"), ("instances", "")):
        with pytest.raises(ValueError):
            cache.path(kind, name)
    assert cache.path("frames", "1.2.3-f2") == tmp_path / "frames" / "1.2.3-f2.dcm"


def test_a_cache_file_names_its_image_and_no_other_file_does(tmp_path):
    cache = FrameCache(tmp_path / "cache", 1 << 20)
    assert cache.image_id_of(str(cache.path("instances", "1.2.3"))) == "1.2.3"
    assert cache.image_id_of(cache.path("frames", "1.2.3-f2")) == "1.2.3-f2"
    for other in (cache.path("reports", "1.2.3"), tmp_path / "frames" / "1.2.3.dcm", tmp_path / "upload.dcm",
                  tmp_path / "cache" / "frames" / "x.dcm", tmp_path / "cache" / "frames" / "1.2.3.png", None):
        assert cache.image_id_of(other) is None


@pytest.mark.parametrize("jpeg", [False, True])
def test_one_frame_of_a_clip_keeps_its_pixels_and_region_spacing(tmp_path, rows, jpeg):
    frames = [gray_frame(r["file"]) for r in rows[:3]]
    clip = us_dataset(Study("P1", "A^B"), generate_uid(), frames, 1, jpeg=jpeg, delta_cm=DELTA_CM)
    path = tmp_path / "frame.dcm"
    path.write_bytes(single_frame_file(as_bytes(clip), 2))
    image = load_image(path)
    assert image.spacing[:2] == pytest.approx((DELTA_CM[0] * 10, DELTA_CM[1] * 10))
    error = np.abs(image.array.astype(int) - frames[1].astype(int)).mean()
    assert error < (3 if jpeg else 1e-9)
    assert image.header["dataset"].SOPInstanceUID == clip.SOPInstanceUID
    with pytest.raises(ValueError):
        single_frame_file(as_bytes(clip), 4)


def test_the_cache_stays_within_its_bound_and_keeps_recently_used_files(tmp_path):
    cache = FrameCache(tmp_path, max_bytes=2500)
    for name in ("1.1", "1.2"):
        cache.get("instances", name, lambda: b"x" * 1000)
        time.sleep(0.01)
    old = time.time() - 100
    os.utime(cache.path("instances", "1.2"), (old, old))  # 1.2: least recently used
    calls = []
    cache.get("instances", "1.1", lambda: calls.append(1) or b"")  # a hit: not made again
    assert not calls
    cache.get("frames", "1.3-f1", lambda: b"y" * 1000)
    assert cache.size() <= 2500
    assert cache.path("instances", "1.1").exists() and not cache.path("instances", "1.2").exists()


@pytest.mark.parametrize("frame", [None, 2])
def test_result_sr_holds_the_answer_and_reads_back(rows, frame):
    import highdicom as hd

    frames = [rgb_frame(rows[0]["file"])] if frame is None else [gray_frame(r["file"]) for r in rows[:3]]
    source = us_dataset(Study("P1", "A^B"), generate_uid(), frames, 1, jpeg=True)
    sr = pydicom.dcmread(io.BytesIO(as_bytes(reports.result_sr(source, frame, RESULT, "1.0"))))
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == source.PatientID
    assert hd.sr.ComprehensiveSR.from_dataset(sr) is not None
    (finding,) = reports.parse_sr(sr)
    assert (finding.sop, finding.frame, finding.label) == (source.SOPInstanceUID, frame, "malignant")
    assert finding.probability == pytest.approx(0.79) and finding.threshold == pytest.approx(0.61)
    assert finding.roi == [10, 20, 200, 210] and finding.model == RESULT["model"]
    assert finding.note == reports.RESEARCH_NOTE
    # the same result for the same frame and model has the same UID (no duplicate in the archive)
    again = reports.result_sr(source, frame, RESULT, "1.0")
    assert again.SOPInstanceUID == sr.SOPInstanceUID
    other = reports.result_sr(source, frame, dict(RESULT, model="sha256:fedcba9876543210"), "1.0")
    assert other.SOPInstanceUID != sr.SOPInstanceUID


def test_confirmation_sr_names_the_user_and_the_diagnosis(rows):
    source = us_dataset(Study("P1", "A^B"), generate_uid(), [gray_frame(rows[0]["file"])], 1)
    sr = pydicom.dcmread(io.BytesIO(as_bytes(reports.confirmed_sr(source, None, "benign", None, "dr.who", "1.0"))))
    (finding,) = reports.parse_sr(sr)
    assert finding.kind == "confirmed" and finding.label == "benign" and finding.observer.rstrip("^") == "dr.who"
    assert finding.roi == [0, 0, 300, 300]  # no box given: the whole frame


def test_saliency_seg_holds_the_exact_mask_values(rows):
    source = us_dataset(Study("P1", "A^B"), generate_uid(), [rgb_frame(rows[1]["file"])], 1, jpeg=True)
    mask = (np.arange(300 * 300) % 256).astype(np.uint8).reshape(300, 300)
    seg = pydicom.dcmread(io.BytesIO(as_bytes(reports.saliency_object(source, None, mask, RESULT["model"], "1.0"))))
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.SegmentationType == "FRACTIONAL"
    assert np.array_equal(seg.pixel_array, mask)
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_training_datalist_fetches_confirmed_frames_only():
    """An archive-backed datastore downloads what ``get_image_uri`` names: the datalist of
    confirmed cases must not ask for the others."""
    from thyroid_plugin.data import datalist_from_datastore

    class Store:
        fetched = []

        def list_images(self):
            return ["1.2.1", "1.2.2", "1.2.3"]

        def get_image_info(self, image_id):
            return {"diagnosis": "benign", "case": "P1"} if image_id == "1.2.2" else {"case": "P2"}

        def get_image_uri(self, image_id):
            self.fetched.append(image_id)
            return f"/cache/{image_id}.dcm"

    store = Store()
    items = datalist_from_datastore(store)
    assert [i["id"] for i in items] == ["1.2.2"] and items[0]["label"] == 0
    assert store.fetched == ["1.2.2"]
