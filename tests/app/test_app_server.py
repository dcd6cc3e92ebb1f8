"""The MONAI Label app served by a real ``monailabel start_server`` process, driven over HTTP with
MONAI Label's own client and with raw requests, on real thyroid ultrasound images."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import time
from pathlib import Path

import nrrd
import numpy as np
import pytest
import requests
from PIL import Image

from monailabel.client import MONAILabelClient
from thyroid_plugin.checkpoint import load_checkpoint
from thyroid_plugin.monailabel_adapter import import_collection
from tests.support.images import write_png_bomb, write_slicer_file, write_truncated, write_volume_nrrd
from tests.support.paths import ddti_subset
from tests.support.server import MonaiLabelServer, parse_multipart, wait_for_batch

pytestmark = pytest.mark.slow

TIMEOUT = 120


def sha_id(path: Path) -> str:
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


@pytest.fixture(scope="module")
def images() -> list[dict]:
    """Real DDTI frames: 4 benign and 4 malignant, one per case."""
    return ddti_subset(4, 4)


@pytest.fixture(scope="module")
def server(tmp_path_factory, small_model, images):
    root = tmp_path_factory.mktemp("app")
    studies = root / "studies"
    model_dir = root / "model"
    model_dir.mkdir()
    shutil.copyfile(small_model, model_dir / "pretrained_classify_nodule.pt")
    items = [{"image": r["file"], "label": 0 if r["label"] == "benign" else 1, "group": r["case"]} for r in images]
    import_collection(items[:2] + items[4:6], studies)  # 4 confirmed cases
    import_collection(items[2:4] + items[6:], studies, with_diagnosis=False)  # 4 unconfirmed
    with MonaiLabelServer(studies, model_dir) as s:
        yield s


def test_info_describes_the_app_and_the_served_model(server, small_model):
    info = requests.get(f"{server.url}/info/", timeout=TIMEOUT).json()
    task = info["models"]["classify_nodule"]
    assert task["type"] == "classification" and task["labels"] == ["benign", "malignant"]
    assert task["model"]["model"] == sha_id(small_model)
    assert set(task["model"]["metrics"]) >= {"auc", "accuracy", "sensitivity", "specificity", "threshold"}
    # the thresholded figures are at the threshold the model serves with
    assert task["model"]["metrics"]["threshold"] == load_checkpoint(small_model)["threshold"]
    # how its probabilities were calibrated, as the model file records it (None: never)
    assert task["model"]["calibration"] == load_checkpoint(small_model).get("calibration")
    assert "classify_nodule" in info["trainers"]
    assert "uncertain" in info["strategies"]
    assert info["datastore"]["total"] == 8 and info["datastore"]["completed"] == 4
    assert info["datastore"]["diagnoses"] == {"benign": 2, "malignant": 2}


@pytest.mark.parametrize("roi", [None, [60, 40, 240, 230]])
def test_infer_json_from_png(server, images, small_model, roi):
    params = {"roi": roi} if roi else {}
    r = requests.post(f"{server.url}/infer/classify_nodule", params={"output": "json"},
                      files={"file": ("frame.png", open(images[0]["file"], "rb"), "image/png")},
                      data={"params": json.dumps(params)}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    result = r.json()
    p = result["probabilities"]
    assert set(p) == {"benign", "malignant"} and abs(sum(p.values()) - 1.0) < 1e-4
    assert result["label"] == ("malignant" if p["malignant"] >= result["threshold"] else "benign")
    assert result["model"] == sha_id(small_model)
    assert result["roi"] == roi
    assert result["image"]["size"] == [300, 300]


def test_infer_image_only_returns_the_mask_on_the_input_grid(server, images):
    roi = [60, 40, 240, 230]
    r = requests.post(f"{server.url}/infer/classify_nodule", params={"output": "image"},
                      files={"file": ("frame.png", open(images[1]["file"], "rb"), "image/png")},
                      data={"params": json.dumps({"roi": roi})}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("image/png")
    mask = np.array(Image.open(io.BytesIO(r.content)))
    assert mask.shape == (300, 300) and mask.dtype == np.uint8
    outside = np.ones_like(mask, dtype=bool)
    outside[40:230, 60:240] = False
    assert mask[outside].max() == 0, "the mask is zero outside the box"
    assert mask[~outside].max() > 0


def test_mask_format_nrrd_returns_the_same_mask_as_an_nrrd_on_the_frame_grid(server, images, tmp_path):
    """``mask_format: nrrd`` (what Slicer asks for a frame it names by id) answers the PNG
    frame's mask as an NRRD with the same pixels, one slice on the frame's grid."""
    import nrrd

    def ask(params):
        return requests.post(f"{server.url}/infer/classify_nodule", params={"output": "image"},
                             files={"file": ("frame.png", open(images[1]["file"], "rb"), "image/png")},
                             data={"params": json.dumps(params)}, timeout=TIMEOUT)

    native, as_nrrd = ask({"roi": [60, 40, 240, 230]}), ask({"roi": [60, 40, 240, 230], "mask_format": "nrrd"})
    assert native.status_code == as_nrrd.status_code == 200, as_nrrd.text
    (tmp_path / "mask.nrrd").write_bytes(as_nrrd.content)
    data, header = nrrd.read(str(tmp_path / "mask.nrrd"), index_order="C")
    assert list(header["sizes"]) == [300, 300, 1] and header["space"] == "left-posterior-superior"
    np.testing.assert_array_equal(data[0], np.array(Image.open(io.BytesIO(native.content))))


def test_infer_all_with_monai_label_client(server, images, tmp_path):
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    mask_path, result = client.infer("classify_nodule", "", {}, file=images[2]["file"])
    assert result["label"] in ("benign", "malignant")
    mask = np.array(Image.open(mask_path))
    assert mask.shape == (300, 300)
    # the same answer with raw HTTP and output=all: one response carries both
    r = requests.post(f"{server.url}/infer/classify_nodule", params={"output": "all"},
                      files={"file": ("frame.png", open(images[2]["file"], "rb"), "image/png")}, timeout=TIMEOUT)
    params, image = parse_multipart(r)
    assert params["probabilities"] == pytest.approx(result["probabilities"], abs=1e-6)
    assert np.array_equal(np.array(Image.open(io.BytesIO(image))), mask)


@pytest.mark.parametrize("rgb", [False, True])
def test_infer_slicer_nrrd_returns_mask_on_the_same_grid(server, images, tmp_path, rgb):
    gray = np.array(Image.open(images[3]["file"]).convert("L"))
    array = np.stack([gray, gray // 2, gray], axis=-1) if rgb else gray
    directions = np.array([[0.0, -1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # rotated in-plane
    src = write_slicer_file(array, tmp_path / "frame.nrrd", spacing=(0.11, 0.13, 1.0), origin=(4.0, -20.0, 7.5),
                            directions=directions)
    r = requests.post(f"{server.url}/infer/classify_nodule", params={"output": "all"},
                      files={"file": ("frame.nrrd", src.read_bytes(), "application/octet-stream")},
                      data={"params": json.dumps({"roi": [50, 50, 250, 250]})}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    params, image = parse_multipart(r)
    out = tmp_path / "mask.nrrd"
    out.write_bytes(image)
    mask, header = nrrd.read(str(out))
    _, src_header = nrrd.read(str(src))
    domain = slice(1, None) if rgb else slice(None)
    assert list(header["sizes"]) == list(src_header["sizes"])[domain]
    assert np.allclose(header["space directions"], np.asarray(src_header["space directions"])[domain])
    assert np.allclose(header["space origin"], src_header["space origin"])
    assert header["space"] == src_header["space"]
    assert params["image"]["size"] == [300, 300]
    assert params["image"]["spacing"] == pytest.approx([0.11, 0.13, 1.0])


def test_infer_by_datastore_image_id(server):
    r = requests.post(f"{server.url}/infer/classify_nodule", params={"image": next(iter(_ids(server))), "output": "json"},
                      timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert r.json()["label"] in ("benign", "malignant")


def _ids(server) -> list[str]:
    return sorted(requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=TIMEOUT).json()["objects"])


def test_batch_inference_persists_every_result(server):
    r = requests.post(f"{server.url}/batch/infer/classify_nodule", params={"images": "all", "run_sync": "true"},
                      json={}, timeout=600)
    assert r.status_code == 200, r.text
    summary = r.json()
    assert summary["total"] == 8 and summary["failed"] == 0
    # where the batch's time went (read, classify, save), adding up to no more than the whole
    phases = summary["phase_seconds"]
    assert set(phases) == {"read", "classify", "save"} and all(v >= 0 for v in phases.values())
    assert phases["classify"] > 0 and sum(phases.values()) <= summary["seconds"] + 0.05
    for image_id in _ids(server):
        info = requests.get(f"{server.url}/datastore/label/info", params={"label": image_id, "tag": "original"},
                            timeout=TIMEOUT).json()
        assert info["params"]["label"] in ("benign", "malignant"), image_id
        mask = requests.get(f"{server.url}/datastore/label", params={"label": image_id, "tag": "original"}, timeout=TIMEOUT)
        assert mask.status_code == 200
        assert np.array(Image.open(io.BytesIO(mask.content))).shape == (300, 300)


def test_asynchronous_batch_inference_persists_results_too(server):
    unconfirmed = [i for i in _ids(server)
                   if "diagnosis" not in requests.get(f"{server.url}/datastore/image/info", params={"image": i}).json()]
    r = requests.post(f"{server.url}/batch/infer/classify_nodule", params={"images": "unlabeled"},
                      json={"label_tag": "nightly"}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    status = wait_for_batch(server.url)
    assert status["status"] == "DONE", status
    for image_id in unconfirmed:
        deadline = time.time() + 30  # the server notices the background task's writes
        while True:
            r = requests.get(f"{server.url}/datastore/label/info", params={"label": image_id, "tag": "nightly"}, timeout=TIMEOUT)
            if r.json().get("params") or time.time() > deadline:
                break
            time.sleep(0.5)
        assert r.json()["params"]["label"] in ("benign", "malignant"), image_id
        assert requests.get(f"{server.url}/datastore/label", params={"label": image_id, "tag": "nightly"},
                            timeout=TIMEOUT).status_code == 200


def test_active_learning_returns_an_unconfirmed_image(server):
    r = requests.post(f"{server.url}/activelearning/uncertain", json={}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    proposal = r.json()
    info = requests.get(f"{server.url}/datastore/image/info", params={"image": proposal["id"]}, timeout=TIMEOUT).json()
    assert "diagnosis" not in info
    assert 0.0 <= proposal["prob_malignant"] <= 1.0


def test_ground_truth_is_recorded_with_and_without_mask_and_survives_restart(server, images):
    unconfirmed = [i for i in _ids(server)
                   if "diagnosis" not in requests.get(f"{server.url}/datastore/image/info", params={"image": i}).json()]
    a, b = unconfirmed[:2]
    r = requests.put(f"{server.url}/datastore/image/info", params={"image": a},
                     data={"info": json.dumps({"diagnosis": "benign", "roi": [10, 20, 200, 210]})}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    mask_file = next(x["mask"] for x in images if Path(x["file"]).stem == b)
    r = requests.put(f"{server.url}/datastore/label", params={"image": b, "tag": "final"},
                     files={"label": ("mask.png", open(mask_file, "rb"), "image/png")},
                     data={"params": json.dumps({"diagnosis": "malignant"})}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    server.restart()
    info_a = requests.get(f"{server.url}/datastore/image/info", params={"image": a}, timeout=TIMEOUT).json()
    info_b = requests.get(f"{server.url}/datastore/image/info", params={"image": b}, timeout=TIMEOUT).json()
    assert info_a["diagnosis"] == "benign" and info_a["roi"] == [10, 20, 200, 210]
    assert info_b["diagnosis"] == "malignant"
    stored = requests.get(f"{server.url}/datastore/label", params={"label": b, "tag": "final"}, timeout=TIMEOUT)
    assert stored.content == Path(mask_file).read_bytes()
    assert requests.get(f"{server.url}/info/", timeout=TIMEOUT).json()["datastore"]["completed"] == 6


# ------------------------------------------------------------------------------------ bad input
def _snapshot(server) -> tuple:
    store = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=TIMEOUT).json()
    files = sorted(str(p.relative_to(server.studies)) for p in server.studies.rglob("*") if p.is_file() and p.name != ".lock"
                   and p.name != "datastore_v2.json")
    return json.dumps(store["objects"], sort_keys=True), files


BAD_UPLOADS = {
    "truncated_png": (lambda tmp, src: write_truncated(src, tmp / "t.png"), 400),
    "text_file": (lambda tmp, src: (tmp / "notes.png").write_text("not an image") and tmp / "notes.png", 400),
    "empty_upload": (lambda tmp, src: (tmp / "empty.png").write_bytes(b"") or tmp / "empty.png", 400),
    "3d_volume": (lambda tmp, src: write_volume_nrrd(tmp / "vol.nrrd"), 400),
    "absurd_size": (lambda tmp, src: write_png_bomb(tmp / "bomb.png"), 413),
}


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
def test_bad_uploads_get_a_4xx_with_a_message_and_nothing_is_lost(server, images, tmp_path, case):
    make, status = BAD_UPLOADS[case]
    path = make(tmp_path, Path(images[0]["file"]))
    before = _snapshot(server)
    r = requests.post(f"{server.url}/infer/classify_nodule", params={"output": "json"},
                      files={"file": (path.name, path.read_bytes(), "application/octet-stream")}, timeout=TIMEOUT)
    assert r.status_code == status, r.text
    assert r.json()["detail"]
    # the same file offered to the datastore is refused too
    r = requests.put(f"{server.url}/datastore/image", params={"image": "bad_upload"},
                     files={"file": (path.name, path.read_bytes(), "application/octet-stream")}, timeout=TIMEOUT)
    assert 400 <= r.status_code < 500, r.text
    assert _snapshot(server) == before
    assert requests.get(f"{server.url}/info/", timeout=TIMEOUT).status_code == 200


BAD_REQUESTS = {
    "unknown_image_id": (dict(params={"image": "no_such_image", "output": "json"}), 404),
    "path_traversal_id": (dict(params={"image": "../../../etc/passwd", "output": "json"}), 422),
    "malformed_params": (dict(params={"output": "json"}, data={"params": "{roi: [1, 2"}), 422),
    "params_not_object": (dict(params={"output": "json"}, data={"params": "[1, 2, 3]"}), 422),
    "roi_outside": (dict(params={"output": "json"}, data={"params": json.dumps({"roi": [400, 400, 500, 500]})}), 422),
    "roi_not_numbers": (dict(params={"output": "json"}, data={"params": json.dumps({"roi": ["a", 1, 2, 3]})}), 422),
    "frame_negative": (dict(params={"output": "json"}, data={"params": json.dumps({"frame": -1})}), 400),
    "mask_format_unknown": (dict(params={"output": "json"}, data={"params": json.dumps({"mask_format": "../x"})}), 422),
    "no_image_at_all": (dict(params={"output": "json"}), 422),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_get_a_4xx_with_a_message(server, images, case):
    kwargs, status = BAD_REQUESTS[case]
    kwargs = dict(kwargs)
    if case.startswith(("malformed", "params_not", "roi", "frame", "mask_format")):
        kwargs["files"] = {"file": ("frame.png", open(images[0]["file"], "rb"), "image/png")}
    before = _snapshot(server)
    r = requests.post(f"{server.url}/infer/classify_nodule", timeout=TIMEOUT, **kwargs)
    assert r.status_code == status, r.text
    assert isinstance(r.json()["detail"], str) and r.json()["detail"]
    assert _snapshot(server) == before


def test_bad_ground_truth_is_refused(server):
    image_id = _ids(server)[0]
    before = _snapshot(server)
    for info in ({"diagnosis": "probably bad"}, {"diagnosis": "benign", "roi": [1, 2]}):
        r = requests.put(f"{server.url}/datastore/image/info", params={"image": image_id}, data={"info": json.dumps(info)},
                         timeout=TIMEOUT)
        assert r.status_code == 422, r.text
    r = requests.put(f"{server.url}/datastore/image/info", params={"image": "nope"},
                     data={"info": json.dumps({"diagnosis": "benign"})}, timeout=TIMEOUT)
    assert r.status_code == 404
    r = requests.put(f"{server.url}/datastore/label", params={"image": "../x", "tag": "final"},
                     files={"label": ("m.png", b"\x89PNG", "image/png")}, timeout=TIMEOUT)
    assert r.status_code == 422
    assert _snapshot(server) == before


def test_missing_model_is_a_clear_503(tmp_path, images):
    studies = tmp_path / "studies"
    import_collection([{"image": images[0]["file"], "label": 0, "group": "a"}], studies)
    with MonaiLabelServer(studies, tmp_path / "empty_models") as s:
        info = requests.get(f"{s.url}/info/", timeout=TIMEOUT).json()
        assert info["models"]["classify_nodule"]["model"] is None
        r = requests.post(f"{s.url}/infer/classify_nodule", params={"output": "json"},
                          files={"file": ("f.png", open(images[0]["file"], "rb"), "image/png")}, timeout=TIMEOUT)
        assert r.status_code == 503 and "no model" in r.json()["detail"]
        assert requests.get(f"{s.url}/info/", timeout=TIMEOUT).status_code == 200


def test_a_frame_sent_without_a_box_is_classified_in_the_box_the_shipped_localiser_draws(tmp_path, small_model, images):
    """The shipped model folder's localiser is served by default; a user's box wins over it; a
    batch over the datastore uses it for every frame (none has a box); ``/info`` describes it."""
    from tests.support.paths import APP_DIR

    shipped = APP_DIR / "model" / "pretrained_nodule_localiser.pt"
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copyfile(small_model, model_dir / "pretrained_classify_nodule.pt")
    shutil.copyfile(shipped, model_dir / "pretrained_nodule_localiser.pt")
    studies = tmp_path / "studies"
    import_collection([{"image": r["file"], "label": 0 if r["label"] == "benign" else 1, "group": r["case"]} for r in images[:2]],
                      studies, with_diagnosis=False)
    with MonaiLabelServer(studies, model_dir) as s:
        localiser = requests.get(f"{s.url}/info/", timeout=TIMEOUT).json()["models"]["classify_nodule"]["model"]["localiser"]
        assert localiser["model"] == sha_id(shipped) and localiser["margin"] == 0.25 and localiser["val_box_iou"] > 0.5
        answers = {}
        for params in ({}, {"roi": [60, 40, 240, 230]}):
            r = requests.post(f"{s.url}/infer/classify_nodule", params={"output": "json"},
                              files={"file": ("frame.png", open(images[0]["file"], "rb"), "image/png")},
                              data={"params": json.dumps(params)}, timeout=TIMEOUT)
            assert r.status_code == 200, r.text
            answers["roi" in params] = r.json()
        drawn = answers[False]
        assert drawn["roi_source"] == "localiser" and len(drawn["roi"]) == 4 and "localiser drew" in drawn["warnings"][0]
        x0, y0, x1, y1 = drawn["roi"]
        assert 0 <= x0 < x1 <= 300 and 0 <= y0 < y1 <= 300 and (x1 - x0) * (y1 - y0) < 0.9 * 300 * 300
        assert answers[True]["roi_source"] == "request" and answers[True]["roi"] == [60, 40, 240, 230]
        assert answers[True]["warnings"] == []
        r = requests.post(f"{s.url}/batch/infer/classify_nodule", params={"images": "all", "run_sync": "true"}, json={},
                          timeout=600)
        assert r.status_code == 200 and r.json()["failed"] == 0, r.text
        for image_id in _ids(s):
            kept = requests.get(f"{s.url}/datastore/label/info", params={"label": image_id, "tag": "original"},
                                timeout=TIMEOUT).json()["params"]
            assert kept["roi_source"] == "localiser" and len(kept["roi"]) == 4, kept
    with MonaiLabelServer(studies, model_dir, conf={"localiser": "none"}) as s:  # switched off: whole frames
        assert requests.get(f"{s.url}/info/", timeout=TIMEOUT).json()["models"]["classify_nodule"]["model"]["localiser"] is None
        r = requests.post(f"{s.url}/infer/classify_nodule", params={"output": "json"},
                          files={"file": ("frame.png", open(images[0]["file"], "rb"), "image/png")}, timeout=TIMEOUT)
        assert r.json()["roi"] is None and r.json()["roi_source"] is None and "whole image" in r.json()["warnings"][0]
