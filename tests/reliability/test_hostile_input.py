"""Hostile and bad input against a real server: the nasty corpus, hostile upload names, path
traversal in ids and tags on every datastore route, the upload cap, routes the app does not
serve, bad batch options and bad model files. Every answer is a 4xx with a message (never a
5xx), nothing is read or written outside the studies folder, and the server keeps working."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import requests

from tests.support.nasty import EXPECTED, NASTY_NAMES, nasty_files

from .helpers import TIMEOUT, check_studies_consistent, datastore_objects, files_under, served_model

pytestmark = pytest.mark.slow

PNG = None


def png_bytes(server) -> bytes:
    image_id = sorted(datastore_objects(server.url))[0]
    return (server.studies / f"{image_id}.png").read_bytes()


@pytest.fixture(scope="module")
def outside(shared_server):
    """A secret next to the studies folder, and everything outside the studies folder that a
    traversal could touch, to compare before and after."""
    secret = shared_server.root / "secret.png"
    shutil.copyfile(next(iter(shared_server.studies.glob("*.png"))), secret)
    return secret


def outside_state(server) -> dict:
    root = server.root
    state = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.iterdir() if p.is_file() and p.suffix != ".log"}
    state["tmp_evil"] = sorted(str(p) for p in Path("/tmp").glob("*evil*"))
    state["etc"] = sorted(str(p) for p in Path("/etc/cron.d").glob("evil*")) if Path("/etc/cron.d").exists() else []
    return state


def alive(server) -> None:
    r = requests.get(f"{server.url}/info/", timeout=TIMEOUT)
    assert r.status_code == 200, r.text


# --------------------------------------------------------------------------- nasty corpus
@pytest.mark.parametrize("name", list(EXPECTED))
def test_nasty_files_get_a_clear_answer_and_change_nothing(shared_server, outside, name):
    server = shared_server
    path = next(p for p in nasty_files() if p.name == name)
    expected = EXPECTED[name]
    before_outside = outside_state(server)
    before = files_under(server.studies)
    r = requests.post(f"{server.url}/infer/classify_nodule", params={"output": "json"},
                      files={"file": (name, path.read_bytes(), "application/octet-stream")}, timeout=TIMEOUT)
    assert r.status_code == expected, r.text
    if expected != 200:
        assert isinstance(r.json()["detail"], str) and r.json()["detail"]
    image_id = "nasty_" + re.sub(r"[^A-Za-z0-9_]", "_", name)
    r = requests.put(f"{server.url}/datastore/image", params={"image": image_id},
                     files={"file": (name, path.read_bytes(), "application/octet-stream")}, timeout=TIMEOUT)
    assert r.status_code == (200 if expected == 200 else expected), r.text
    # a label must be on its image's grid: the valid image is its own label
    target = image_id if expected == 200 else sorted(datastore_objects(server.url))[0]
    r = requests.put(f"{server.url}/datastore/label", params={"image": target, "tag": "nasty"},
                     files={"label": (name, path.read_bytes(), "application/octet-stream")}, timeout=TIMEOUT)
    assert r.status_code == (200 if expected == 200 else expected), r.text
    if expected != 200:
        assert files_under(server.studies) == before
    assert outside_state(server) == before_outside
    alive(server)


# -------------------------------------------------------------------------- upload names
@pytest.mark.parametrize("name", NASTY_NAMES, ids=[repr(n)[:40] for n in NASTY_NAMES])
def test_hostile_upload_names_never_reach_the_file_system(shared_server, outside, name):
    server = shared_server
    data = png_bytes(server)
    before_outside = outside_state(server)
    r = requests.post(f"{server.url}/infer/classify_nodule", params={"output": "json"},
                      files={"file": (name, data, "image/png")}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    r = requests.put(f"{server.url}/datastore/image", params={"image": "named_upload"},
                     files={"file": (name, data, "image/png")}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    r = requests.put(f"{server.url}/datastore/image", files={"file": (name, data, "image/png")}, timeout=TIMEOUT)
    assert r.status_code in (200, 422), r.text  # the id comes from the name: a plain one, or refused
    r = requests.put(f"{server.url}/datastore/label", params={"image": "named_upload", "tag": "final"},
                     files={"label": (name, data, "image/png")}, data={"params": "{}"}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert outside_state(server) == before_outside
    # every stored file is <id><extension by content>, in the studies folder or a label folder
    for rel in files_under(server.studies):
        assert re.fullmatch(r"(labels/[A-Za-z0-9_-]+/)?[A-Za-z0-9_(][A-Za-z0-9._()+\- ]*\.(png|nrrd|nii\.gz|nii|dcm|jpg|bmp|tif)"
                            r"|\.lock|\.writer\.lock|datastore_v2\.json", rel), rel
    check_studies_consistent(server.studies)


# ------------------------------------------------------------------------- path traversal
BAD_IDS = ["../secret", "../../../../etc/passwd", "/etc/passwd", "..", ".", "a/../../secret", "..\\secret",
           "a\x00b", "secret\x00.png", "x" * 5000, ".hidden", "%2e%2e%2fsecret", " spaced", "labels/final/x",
           "\u202esecret"]


@pytest.mark.parametrize("bad", BAD_IDS, ids=[repr(b)[:30] for b in BAD_IDS])
def test_ids_and_tags_cannot_escape_the_studies_folder(shared_server, outside, bad):
    server = shared_server
    url = server.url
    good = sorted(datastore_objects(url))[0]
    before_outside = outside_state(server)
    before = files_under(server.studies)
    data = png_bytes(server)
    calls = [
        ("get", "/datastore/image", {"image": bad}, {}),
        ("head", "/datastore/image", {"image": bad}, {}),
        ("get", "/datastore/image/info", {"image": bad}, {}),
        ("get", "/datastore/label", {"label": bad, "tag": "final"}, {}),
        ("get", "/datastore/label", {"label": good, "tag": bad}, {}),
        ("head", "/datastore/label", {"image": bad, "tag": "final"}, {}),
        ("get", "/datastore/label/info", {"label": bad, "tag": "final"}, {}),
        ("get", "/datastore/label/info", {"label": good, "tag": bad}, {}),
        ("put", "/datastore/image/info", {"image": bad}, {"data": {"info": json.dumps({"diagnosis": "benign"})}}),
        ("put", "/datastore/label/info", {"label": good, "tag": bad}, {"data": {"info": "{}"}}),
        ("put", "/datastore/image", {"image": bad}, {"files": {"file": ("f.png", data)}}),
        ("put", "/datastore/label", {"image": bad, "tag": "final"}, {"files": {"label": ("m.png", data)}}),
        ("put", "/datastore/label", {"image": good, "tag": bad}, {"files": {"label": ("m.png", data)}}),
        ("delete", "/datastore/image", {"id": bad}, {}),
        ("delete", "/datastore/label", {"id": bad, "tag": "final"}, {}),
        ("delete", "/datastore/label", {"id": good, "tag": bad}, {}),
        ("post", "/infer/classify_nodule", {"image": bad, "output": "json"}, {}),
    ]
    for method, path, params, kwargs in calls:
        r = getattr(requests, method)(url + path, params=params, timeout=TIMEOUT, **kwargs)
        assert 400 <= r.status_code < 500, (method, path, params, r.status_code, r.text[:200])
        if method != "head":
            assert r.json().get("detail"), (method, path, r.text[:200])
        assert not r.content.startswith(b"\x89PNG"), (method, path, "served a file")
    assert files_under(server.studies) == before
    assert outside_state(server) == before_outside
    assert outside.exists()
    alive(server)


# --------------------------------------------------------------------------- size limits
def test_uploads_over_the_cap_are_refused_before_they_are_read(shared_server):
    url = shared_server.url
    big = os.urandom(25 << 20)  # the shared server's cap is 24 MiB
    t = time.time()
    r = requests.post(f"{url}/infer/classify_nodule", files={"file": ("big.png", big)}, timeout=TIMEOUT)
    assert r.status_code == 413 and "24 MiB" in r.json()["detail"]

    body = (b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n" + big + b"\r\n--xyz--\r\n")

    def chunks():  # no Content-Length: the limit is counted while the body arrives
        for i in range(0, len(body), 1 << 16):
            yield body[i:i + (1 << 16)]

    r = requests.put(f"{url}/datastore/image", params={"image": "chunked"}, data=chunks(),
                     headers={"Content-Type": "multipart/form-data; boundary=xyz"}, timeout=TIMEOUT)
    assert r.status_code == 413 and "24 MiB" in r.json()["detail"], r.text
    assert time.time() - t < 30
    alive(shared_server)


# --------------------------------------------------------------------- routes not served
@pytest.mark.parametrize("method, path", [("get", "/ohif/../../etc/passwd"), ("get", "/ohif/%2e%2e"),
                                          ("get", "/proxy/dicom/wado/studies"), ("post", "/proxy/dicom/stow/x"),
                                          ("post", "/infer/wsi/classify_nodule"), ("post", "/infer/wsi_v2/classify_nodule"),
                                          ("post", "/reload"), ("put", "/session/"), ("get", "/session/..%2f..%2fetc"),
                                          ("delete", "/session/abc"), ("get", "/logs/gpu"),
                                          ("post", "/activelearning/no_such_strategy"), ("post", "/scoring/no_such_method"),
                                          ("post", "/train/no_such_model"), ("post", "/batch/infer/no_such_model"),
                                          ("get", "/model/no_such_model"), ("put", "/model/no_such_model")])
def test_routes_the_app_does_not_serve_answer_without_a_crash(shared_server, method, path):
    kwargs = {}
    if method == "put":
        kwargs = {"files": {"files" if path.startswith("/session") else "file": ("x.png", b"x")}}
    r = getattr(requests, method)(shared_server.url + path, timeout=TIMEOUT, **kwargs)
    assert 400 <= r.status_code < 500 or (path == "/logs/gpu" and r.status_code == 503), (r.status_code, r.text[:200])
    assert r.text
    alive(shared_server)


@pytest.mark.parametrize("params", [{"image": "SECRET"}, {"image_path": "SECRET"}, {"save_label": True, "label_tag": "x"},
                                    {"model": "other"}, {"device": "cuda:7"}, {"logging": "DEBUG"},
                                    {"skip_writer": "true"}, {"session": {"image": "SECRET"}}])
def test_params_cannot_redirect_an_inference(shared_server, outside, params):
    """MONAI Label merges ``params`` into the request: without the app's filter, ``image`` would
    make the server classify (read) any file it can see, ``save_label`` write to the datastore."""
    server = shared_server
    params = {k: (str(outside) if v == "SECRET" else v) for k, v in params.items()}
    if "session" in params:
        params["session"] = {"image": str(outside)}
    before = files_under(server.studies)
    r = requests.post(f"{server.url}/infer/classify_nodule", params={"output": "json"},
                      files={"file": ("f.png", b"not an image")}, data={"params": json.dumps(params)}, timeout=TIMEOUT)
    assert r.status_code == 422 and "may not set" in r.json()["detail"], r.text
    good = sorted(datastore_objects(server.url))[0]
    r = requests.post(f"{server.url}/infer/classify_nodule", params={"output": "json", "image": good},
                      data={"params": json.dumps(params)}, timeout=TIMEOUT)
    assert r.status_code == 422, r.text
    assert files_under(server.studies) == before


def test_infer_with_a_session_id_or_dicom_seg_output_is_refused(shared_server):
    r = requests.post(f"{shared_server.url}/infer/classify_nodule", params={"session_id": "../../../etc", "output": "json"},
                      timeout=TIMEOUT)
    assert r.status_code == 422 and "session" in r.json()["detail"]
    r = requests.post(f"{shared_server.url}/infer/classify_nodule", params={"output": "dicom_seg"},
                      files={"file": ("f.dcm", next(p for p in nasty_files() if p.suffix == ".dcm").read_bytes())},
                      timeout=TIMEOUT)
    assert r.status_code == 422 and "dicom_seg" in r.json()["detail"]


@pytest.mark.parametrize("params", [{"images": 123}, {"images": [1, 2]}, {"batch_size": "abc"}, {"batch_size": -1},
                                    {"max_batch_size": 1.5}, {"label_tag": "../../x"}, {"images": ["../../etc/passwd"],
                                                                                        "label_tag": "ok"}])
def test_bad_batch_options_are_refused(shared_server, params):
    before = files_under(shared_server.studies)
    r = requests.post(f"{shared_server.url}/batch/infer/classify_nodule", params={"run_sync": "true"}, json=params,
                      timeout=TIMEOUT)
    if params.get("label_tag") == "ok":  # a bad id in the list: that image fails, the batch answers
        assert r.status_code == 200 and r.json()["failed"] == 1, r.text
    else:
        assert r.status_code == 422, r.text
    assert files_under(shared_server.studies) == before


# ------------------------------------------------------------------------------ model files
def test_model_uploads_are_checked_published_atomically_and_removable(shared_server, small_model, other_small_model,
                                                                      tmp_path):
    from thyroid_plugin.checkpoint import model_identity, save_checkpoint
    from thyroid_plugin.networks import SaliencyGuidedClassifier

    url = shared_server.url
    requests.delete(f"{url}/model/classify_nodule", timeout=TIMEOUT)  # a model an earlier test published, if any
    served = served_model(url)
    assert served == model_identity(small_model)
    for name, data in [("garbage.pt", b"not a model"), ("empty.pt", b""),
                       ("pickle.pt", b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93.")]:
        r = requests.put(f"{url}/model/classify_nodule", files={"file": (name, data)}, timeout=TIMEOUT)
        assert r.status_code == 422, r.text
    # a real model file of another network configuration
    other = SaliencyGuidedClassifier(base_channels=8)
    save_checkpoint(tmp_path / "other_net.pt", other, {**other.network_def()}, 64)
    r = requests.put(f"{url}/model/classify_nodule", files={"file": ("m.pt", (tmp_path / "other_net.pt").read_bytes())},
                     timeout=TIMEOUT)
    assert r.status_code == 422 and "serves" in r.json()["detail"], r.text
    assert served_model(url) == served
    assert not any(p.name == "classify_nodule.pt" for p in shared_server.model_dir.iterdir())
    # a good one is installed and served at once
    r = requests.put(f"{url}/model/classify_nodule", files={"file": ("new.pt", other_small_model.read_bytes())},
                     timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == model_identity(other_small_model) == served_model(url)
    # a model whose recorded metrics include NaN (AUC of a one-class validation split): /info stays JSON
    import torch

    payload = torch.load(other_small_model, weights_only=True)
    payload["metrics"] = {**payload["metrics"], "auc": float("nan")}
    payload.pop("validation", None)  # no stored predictions: the stored figures are served as they are
    torch.save(payload, tmp_path / "nan_metrics.pt")
    r = requests.put(f"{url}/model/classify_nodule", files={"file": ("m.pt", (tmp_path / "nan_metrics.pt").read_bytes())},
                     timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    info = requests.get(f"{url}/info/", timeout=TIMEOUT)
    assert info.status_code == 200 and info.json()["models"]["classify_nodule"]["model"]["metrics"]["auc"] is None
    # removing it serves the shipped model again; the shipped one is never removed
    r = requests.delete(f"{url}/model/classify_nodule", timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["model"] == model_identity(small_model), r.text
    assert served_model(url) == model_identity(small_model)
    r = requests.delete(f"{url}/model/classify_nodule", timeout=TIMEOUT)
    assert r.status_code == 404 and "shipped" in r.json()["detail"]
    assert (shared_server.model_dir / "pretrained_classify_nodule.pt").exists()
