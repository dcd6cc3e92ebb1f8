"""The archive down, frozen or refusing: clear 502/503/504 answers within a bounded time, nothing
stored, ``/info`` answering throughout; and the archive's credentials never reach the log."""

from __future__ import annotations

import json
import time

import pytest
import requests

from tests.pacs.conftest import archive_server, build_studies, frame_ids, store
from tests.support.orthanc import OrthancServer
from tests.support.paths import ddti_subset

pytestmark = pytest.mark.slow

USER, PASSWORD = "pacsreader", "s3cret-Archive-Pw"
TIMEOUT = 60


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """An Orthanc that wants a user name and password, holding the test studies."""
    with OrthancServer(tmp_path_factory.mktemp("orthanc_auth"), users={USER: PASSWORD}) as o:
        datasets = build_studies(ddti_subset(3, 3))
        store(o, datasets.values(), auth=(USER, PASSWORD))
        ids = sorted(frame_ids(datasets))
        # single frames first: frames of a clip share one cached instance
        o.frames = [i for i in ids if "-f" not in i] + [i for i in ids if "-f" in i]
        yield o


@pytest.fixture(scope="module")
def server(tmp_path_factory, secured, app_model_dir):
    root = tmp_path_factory.mktemp("pacs_fail")
    s = archive_server(root, secured, app_model_dir, root / "cache", archive_timeout=2)
    s.env = {"THYROID_ARCHIVE_USER": USER, "THYROID_ARCHIVE_PASSWORD": PASSWORD}
    with s:
        yield s


def classify(server, image_id: str) -> requests.Response:
    return requests.post(f"{server.url}/infer/classify_nodule", params={"image": image_id, "output": "json"},
                         timeout=TIMEOUT)


def timed(fn, *args):
    start = time.monotonic()
    result = fn(*args)
    return result, time.monotonic() - start


def test_credentials_from_the_environment_work_and_never_reach_the_log(server, secured):
    assert classify(server, secured.frames[0]).status_code == 200
    assert requests.get(f"{server.url}/datastore/", timeout=TIMEOUT).status_code == 200
    log = server.log_path.read_text(errors="replace")
    assert PASSWORD not in log


def test_wrong_credentials_are_a_502_that_says_so(tmp_path, secured, app_model_dir):
    s = archive_server(tmp_path / "wrong", secured, app_model_dir, tmp_path / "cache")
    s.env = {"THYROID_ARCHIVE_USER": USER, "THYROID_ARCHIVE_PASSWORD": "wrong"}
    with s:
        r = classify(s, secured.frames[1])
        assert r.status_code == 502 and "credentials" in r.json()["detail"]
        assert requests.get(f"{s.url}/info/", timeout=TIMEOUT).status_code == 200


def test_a_frozen_archive_is_a_504_within_the_timeout_and_info_keeps_answering(server, secured):
    cached, uncached = secured.frames[0], secured.frames[1]
    assert classify(server, cached).status_code == 200
    secured.pause()
    try:
        r, seconds = timed(classify, server, uncached)
        assert r.status_code == 504, r.text
        assert "did not answer" in r.json()["detail"] and seconds < 15
        info, seconds = timed(requests.get, f"{server.url}/info/")
        assert info.status_code == 200 and seconds < 5
        r = classify(server, cached)  # a cached frame needs no archive
        assert r.status_code == 200, r.text
    finally:
        secured.resume()
    assert classify(server, uncached).status_code == 200


def test_a_stopped_archive_is_a_503_and_nothing_is_stored(server, secured):
    image_id = secured.frames[3]  # a frame of the clip
    secured.stop()
    try:
        r, seconds = timed(classify, server, secured.frames[2])  # a single frame, never fetched
        assert r.status_code == 503 and "cannot be reached" in r.json()["detail"] and seconds < 10
        assert r.headers.get("Retry-After")
        r = requests.put(f"{server.url}/datastore/image/info", params={"image": image_id},
                         data={"info": json.dumps({"diagnosis": "benign"})}, timeout=TIMEOUT)
        assert r.status_code == 503, r.text
        time.sleep(1.1)  # the listing is older than archive_refresh_s: it must be read again
        r = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=TIMEOUT)
        assert r.status_code == 503, r.text
        info = requests.get(f"{server.url}/info/", timeout=TIMEOUT)
        assert info.status_code == 200
    finally:
        secured.start()
    time.sleep(1.5)  # the listing (archive_refresh_s = 1) is read again
    info = requests.get(f"{server.url}/datastore/image/info", params={"image": image_id}, timeout=TIMEOUT).json()
    assert "diagnosis" not in info
    assert requests.get(f"{server.url}/info/", timeout=TIMEOUT).json()["datastore"]["completed"] == 0


def test_the_server_starts_and_answers_info_while_the_archive_is_down(tmp_path, app_model_dir):
    from tests.support.server import free_port

    class Nowhere:  # a DICOMweb root on a closed loopback port
        dicomweb = f"http://127.0.0.1:{free_port()}/dicom-web"

    with archive_server(tmp_path / "app", Nowhere, app_model_dir, tmp_path / "cache") as s:
        info = requests.get(f"{s.url}/info/", timeout=TIMEOUT)
        assert info.status_code == 200
        deadline = time.time() + 20  # the background listing fails and says so
        while time.time() < deadline:
            archive = requests.get(f"{s.url}/info/", timeout=TIMEOUT).json()["datastore"]["archive"]
            if archive["error"]:
                break
            time.sleep(0.5)
        assert archive["reachable"] is False and "cannot be reached" in archive["error"]
        r = classify(s, "1.2.3.4.5")
        assert r.status_code == 503 and "cannot be reached" in r.json()["detail"]
