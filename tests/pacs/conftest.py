"""A real Orthanc (DICOMweb) holding realistic ultrasound studies, and the app served on it."""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from pydicom.uid import generate_uid

from tests.support.orthanc import OrthancServer, orthanc_available
from tests.support.paths import APP_DIR, ddti_subset
from tests.support.server import MonaiLabelServer
from tests.support.us_dicom import Study, gray_frame, rgb_frame, us_dataset

if str(APP_DIR) not in sys.path:  # the app's ``lib`` package (lib.archive), as MONAI Label imports it
    sys.path.insert(0, str(APP_DIR))

#: Sequence of Ultrasound Regions deltas (cm per pixel, x then y) of the test objects
DELTA_CM = (0.0075, 0.008)


@dataclass
class ArchiveContent:
    """What was stored: the datasets by kind, and each frame id's source (dataset, 0-based frame)."""

    datasets: dict
    frames: dict
    rows: list


def build_studies(rows: list) -> dict:
    """Two patients: one study with a gray uncompressed and an RGB JPEG-baseline single frame,
    one with a gray JPEG-baseline cine clip of 3 frames and a gray uncompressed single frame."""
    a, b = Study("TN-0001", "Doe^Jane"), Study("TN-0002", "Roe^Ann")
    s1, s2, s3 = generate_uid(), generate_uid(), generate_uid()
    return {
        "gray": us_dataset(a, s1, [gray_frame(rows[0]["file"])], 1, delta_cm=DELTA_CM),
        "rgb_jpeg": us_dataset(a, s1, [rgb_frame(rows[1]["file"])], 2, jpeg=True, delta_cm=DELTA_CM),
        "clip_jpeg": us_dataset(b, s2, [gray_frame(r["file"]) for r in rows[2:5]], 1, jpeg=True, delta_cm=DELTA_CM),
        "gray_b": us_dataset(b, s3, [gray_frame(rows[5]["file"])], 1, delta_cm=DELTA_CM, series_number=2),
    }


def frame_ids(datasets: dict) -> dict:
    out = {}
    for kind, ds in datasets.items():
        n = int(ds.get("NumberOfFrames", 1))
        if n == 1:
            out[ds.SOPInstanceUID] = (kind, 0)
        else:
            for i in range(n):
                out[f"{ds.SOPInstanceUID}-f{i + 1}"] = (kind, i)
    return out


def store(orthanc: OrthancServer, datasets, auth=None) -> None:
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session_from_user_pass

    session = create_session_from_user_pass(*auth) if auth else None
    DICOMwebClient(orthanc.dicomweb, session=session).store_instances(list(datasets))


def archive_objects(orthanc: OrthancServer, modality: str) -> list:
    """(study, series, sop) of the archive's instances of ``modality``."""
    from dicomweb_client.api import DICOMwebClient

    rows = DICOMwebClient(orthanc.dicomweb).search_for_instances(search_filters={"Modality": modality})
    return [tuple(row[t]["Value"][0] for t in ("0020000D", "0020000E", "00080018")) for row in rows]


def retrieve(orthanc: OrthancServer, uids):
    from dicomweb_client.api import DICOMwebClient

    return DICOMwebClient(orthanc.dicomweb).retrieve_instance(*uids)


def results_status(server: MonaiLabelServer) -> dict:
    """``/info``'s count of single results written to the archive (``datastore.archive.results``)."""
    return requests.get(f"{server.url}/info/", timeout=60).json()["datastore"]["archive"]["results"]


def wait_until(condition, what: str, seconds: float = 30.0):
    """``condition()``'s first true value, polled for at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"not within {seconds:g}s: {what}")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    missing = orthanc_available()
    if missing:
        raise RuntimeError(missing)  # CI installs it (scripts/setup_pacs.sh): fail, do not skip
    with OrthancServer(tmp_path_factory.mktemp("orthanc")) as o:
        yield o


@pytest.fixture(scope="module")
def archive(orthanc) -> ArchiveContent:
    rows = ddti_subset(3, 3)
    datasets = build_studies(rows)
    store(orthanc, datasets.values())
    return ArchiveContent(datasets, frame_ids(datasets), rows)


@pytest.fixture(scope="module")
def app_model_dir(tmp_path_factory, small_model) -> Path:
    d = tmp_path_factory.mktemp("pacs_model")
    shutil.copyfile(small_model, d / "pretrained_classify_nodule.pt")
    return d


def archive_server(root: Path, orthanc: OrthancServer, model_dir: Path, cache: Path, **conf) -> MonaiLabelServer:
    """The app on the archive (``--studies`` = its DICOMweb root); not started."""
    root.mkdir(parents=True, exist_ok=True)
    settings = {"archive_cache": str(cache), "archive_timeout": "3", "archive_refresh_s": "1"}
    settings.update({k: str(v) for k, v in conf.items()})
    server = MonaiLabelServer(root, model_dir, conf=settings, log_path=root / "server.log")
    server.studies = orthanc.dicomweb  # MonaiLabelServer passes it as --studies
    return server
