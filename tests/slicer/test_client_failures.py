"""The REST client and logic facing servers that fail: down, slow, 4xx/5xx, JSON only, garbage,
authentication. Each failure must become one ThyroidNoduleError with a message a clinician can
act on (never a raw traceback, never a hang)."""

from __future__ import annotations

import json
import time
import urllib.parse

import numpy as np
import pytest

from .helpers import RASTER_IJK_TO_RAS, FakeServer, RawServer, add_volume, closed_port_url, json_answer

LOOKS_TECHNICAL = ("Traceback", "Errno", "urlopen", "URLError", "HTTPError", "socket.", "<html")


def assert_readable(error) -> None:
    text = str(error)
    assert text and not any(t in text for t in LOOKS_TECHNICAL), text
    assert text[0].isupper() and text.rstrip().endswith((".", "?")), text


def frame(scene):
    gray = (np.arange(64 * 48, dtype=np.uint32).reshape(1, 48, 64) % 251).astype(np.uint8)
    return add_volume(scene, gray, RASTER_IJK_TO_RAS, "frame")


def result_json(label="malignant", p=0.8, size=(64, 48)):
    return {"label": label, "probabilities": {"benign": round(1 - p, 6), "malignant": p}, "threshold": 0.5, "roi": None,
            "model": "sha256:0123456789abcdef", "saliency": {"mask_threshold": 0.5},
            "image": {"size": list(size), "spacing": [1.0, 1.0, 1.0], "origin": [0.0, 0.0, 0.0],
                      "direction": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], "format": "nrrd",
                      "mask_format": "nrrd"}}


# --------------------------------------------------------------------------------- server down
def test_server_down_says_nothing_is_listening():
    from ThyroidNoduleLib import ConnectionFailedError, MonaiLabelClient, Timeouts

    url = closed_port_url()
    with pytest.raises(ConnectionFailedError) as caught:
        MonaiLabelClient(url, Timeouts(quick=5)).info()
    assert url in str(caught.value) and "connection refused" in str(caught.value)
    assert_readable(caught.value)


def test_unknown_host_and_bad_address():
    from ThyroidNoduleLib import ConnectionFailedError, MonaiLabelClient, ThyroidNoduleError, Timeouts

    with pytest.raises(ConnectionFailedError, match="cannot be found") as caught:
        MonaiLabelClient("http://no-such-host.invalid:8000", Timeouts(quick=10)).info()
    assert_readable(caught.value)
    with pytest.raises(ThyroidNoduleError, match="http:// or https://"):
        MonaiLabelClient("ftp://127.0.0.1:8000")
    with pytest.raises(ThyroidNoduleError, match="Enter the MONAI Label server address"):
        MonaiLabelClient("   ")


def test_server_closing_the_connection_without_answer():
    from ThyroidNoduleLib import ConnectionFailedError, MonaiLabelClient, Timeouts

    with RawServer(None) as raw:
        with pytest.raises(ConnectionFailedError, match="closed the connection") as caught:
            MonaiLabelClient(raw.url, Timeouts(quick=5)).info()
    assert_readable(caught.value)


# ------------------------------------------------------------------------------------- slow
def test_slow_server_times_out_with_the_limit_in_the_message():
    from ThyroidNoduleLib import MonaiLabelClient, ServerTimeoutError, Timeouts

    def slow(handler, body):
        time.sleep(4)
        return json_answer(200, {"name": "late"})

    with FakeServer({"GET /info/": slow}) as fake:
        with pytest.raises(ServerTimeoutError) as caught:
            MonaiLabelClient(fake.url, Timeouts(quick=1)).info()
    assert caught.value.timeout_s == 1
    assert "did not answer within 1 s" in str(caught.value)
    assert_readable(caught.value)


def test_slow_classification_uses_the_classification_limit(scene):
    from ThyroidNoduleLib import NoduleLogic, ServerTimeoutError, Timeouts

    def slow_infer(handler, body):
        time.sleep(4)
        return json_answer(200, result_json())

    with FakeServer({"POST /infer/classify_nodule": slow_infer}) as fake:
        logic = NoduleLogic(scene)
        logic.connect(fake.url, timeouts=Timeouts(infer=1))
        with pytest.raises(ServerTimeoutError, match="while classifying the image"):
            logic.classify(frame(scene))


def test_server_trickling_its_answer_hits_the_total_limit():
    """A server that keeps the connection alive by sending a byte now and then cannot hold the
    client beyond its limit."""
    from ThyroidNoduleLib import MonaiLabelClient, ServerTimeoutError, Timeouts

    def trickle(handler, body):
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", "1000")
        handler.end_headers()
        try:
            for _ in range(30):
                handler.wfile.write(b" ")
                handler.wfile.flush()
                time.sleep(0.2)
        except OSError:
            pass
        return 0, {}, b""

    with FakeServer({"GET /info/": trickle}) as fake:
        with pytest.raises(ServerTimeoutError):
            MonaiLabelClient(fake.url, Timeouts(quick=1.5)).info()


# ---------------------------------------------------------------------------------- 4xx / 5xx
@pytest.mark.parametrize("status,payload,expected", [
    (422, {"detail": "roi [1.0, 2.0, 3.0, 4.0] covers 2x2 pixels of the 64x48 frame; at least 8x8 inside the frame is needed"},
     "refused the request"),
    (413, {"detail": "image of 50000000 pixels is larger than the limit"}, "too large"),
    (404, {"detail": "image 'x' is not in the datastore"}, "could not find"),
    (503, {"detail": "no model is installed yet: train one"}, "cannot do this right now"),
    (429, {"detail": "Train Task is Already Running"}, "busy"),
    (500, {"detail": "Failed to execute infer"}, "failed (HTTP 500)"),
])
def test_http_errors_quote_the_server(status, payload, expected):
    from ThyroidNoduleLib import MonaiLabelClient, ServerError, Timeouts

    with FakeServer({"GET /info/": lambda h, b: json_answer(status, payload)}) as fake:
        with pytest.raises(ServerError) as caught:
            MonaiLabelClient(fake.url, Timeouts(quick=5)).info()
    assert caught.value.status == status
    assert expected in str(caught.value)
    assert payload["detail"] in str(caught.value)
    assert_readable(caught.value)


def test_fastapi_validation_error_list_becomes_one_line():
    from ThyroidNoduleLib import MonaiLabelClient, ServerError, Timeouts

    detail = [{"loc": ["query", "images"], "msg": "value is not a valid enumeration member", "type": "enum"}]
    with FakeServer({"POST /batch/infer/classify_nodule": lambda h, b: json_answer(422, {"detail": detail})}) as fake:
        with pytest.raises(ServerError, match="images: value is not a valid enumeration member"):
            MonaiLabelClient(fake.url, Timeouts(quick=5)).batch_infer("classify_nodule", "all")


def test_plain_text_500_without_detail():
    from ThyroidNoduleLib import MonaiLabelClient, ServerError, Timeouts

    def crash(handler, body):
        return 500, {"Content-Type": "text/plain"}, b"Internal Server Error"

    with FakeServer({"GET /info/": crash}) as fake:
        with pytest.raises(ServerError) as caught:
            MonaiLabelClient(fake.url, Timeouts(quick=5)).info()
    assert "failed (HTTP 500)" in str(caught.value) and "server's log" in str(caught.value)
    assert_readable(caught.value)


def test_classification_error_reaches_the_user_with_the_servers_reason(scene):
    from ThyroidNoduleLib import NoduleLogic, ServerError
    from ThyroidNoduleLib.results import ensure_table

    detail = "invalid image: the frame is 2x2 pixels; at least 8x8 are needed"
    with FakeServer({"POST /infer/classify_nodule": lambda h, b: json_answer(400, {"detail": detail})}) as fake:
        logic = NoduleLogic(scene)
        logic.connect(fake.url)
        with pytest.raises(ServerError) as caught:
            logic.classify(frame(scene))
    assert detail in str(caught.value) and "classifying the image" in str(caught.value)
    assert ensure_table(scene).GetNumberOfRows() == 0  # nothing is recorded for a failed request


# --------------------------------------------------------------------------------- JSON only
def test_json_only_answer_shows_the_classification_without_mask(scene):
    """MONAI Label answers JSON alone when it has no mask file: the module must not crash (the
    official MONAI Label Slicer client does) but show the class and say the mask is missing."""
    from ThyroidNoduleLib import NoduleLogic
    from ThyroidNoduleLib.results import ensure_table, table_rows

    with FakeServer({"POST /infer/classify_nodule": lambda h, b: json_answer(200, result_json("malignant", 0.8))}) as fake:
        logic = NoduleLogic(scene)
        logic.connect(fake.url)
        volume = frame(scene)
        c = logic.classify(volume)
        sent = fake.requests[-1]
    assert c.label == "malignant" and c.probability == pytest.approx(0.8)
    assert c.heat_volume is None and c.mask_segmentation is None
    assert "without a saliency mask" in c.warning
    rows = table_rows(ensure_table(scene))
    assert rows[-1]["Label"] == "malignant" and float(rows[-1]["Probability"]) == pytest.approx(0.8)
    # what was sent: multipart with the frame as NRRD and params JSON, output=all
    assert "output=all" in sent[1]
    assert sent[2]["Content-Type"].startswith("multipart/form-data; boundary=")
    assert b'name="file"; filename="frame.nrrd"' in sent[3] and b"NRRD0004" in sent[3]


def test_an_old_mask_is_not_left_showing_when_a_new_answer_has_none(scene):
    from ThyroidNoduleLib import NoduleLogic
    from ThyroidNoduleLib.display import REF_HEAT, REF_MASK
    from ThyroidNoduleLib.multipart import encode_multipart
    from ThyroidNoduleLib.volumes import write_nrrd

    mask = np.zeros((1, 48, 64), np.uint8)
    mask[0, 10:30, 20:40] = 200
    with_mask = encode_multipart({"params": json.dumps(result_json()),
                                  "image": ("m.nrrd", write_nrrd(mask, np.diag([-1.0, -1.0, 1.0, 1.0]) @ RASTER_IJK_TO_RAS),
                                            "application/octet-stream")})
    answers = iter([(200, {"Content-Type": with_mask[1]}, with_mask[0]), json_answer(200, result_json("benign", 0.2))])
    with FakeServer({"POST /infer/classify_nodule": lambda h, b: next(answers)}) as fake:
        logic = NoduleLogic(scene)
        logic.connect(fake.url)
        volume = frame(scene)
        first = logic.classify(volume)
        assert first.heat_volume is not None and first.warning == ""
        second = logic.classify(volume)
    assert second.label == "benign" and second.heat_volume is None
    assert volume.GetNodeReference(REF_HEAT) is None and volume.GetNodeReference(REF_MASK) is None
    assert first.heat_volume.GetScene() is None and first.mask_segmentation.GetScene() is None


def test_multipart_answer_without_mask_part(scene):
    from ThyroidNoduleLib import NoduleLogic
    from ThyroidNoduleLib.multipart import encode_multipart

    body, ctype = encode_multipart({"params": json.dumps(result_json("benign", 0.3))})
    with FakeServer({"POST /infer/classify_nodule": lambda h, b: (200, {"Content-Type": ctype}, body)}) as fake:
        logic = NoduleLogic(scene)
        logic.connect(fake.url)
        c = logic.classify(frame(scene))
    assert c.label == "benign" and c.heat_volume is None and c.warning


def test_mask_on_another_grid_is_not_displayed(scene):
    """A mask whose grid differs from the image's is refused with an explanation; the class is
    still shown."""
    from ThyroidNoduleLib import NoduleLogic
    from ThyroidNoduleLib.multipart import encode_multipart
    from ThyroidNoduleLib.volumes import write_nrrd

    wrong = write_nrrd(np.zeros((1, 48, 64), np.uint8), np.diag([2.0, 1.0, 1.0, 1.0]))  # 2 mm columns
    body, ctype = encode_multipart({"params": json.dumps(result_json()), "image": ("m.nrrd", wrong, "application/octet-stream")})
    with FakeServer({"POST /infer/classify_nodule": lambda h, b: (200, {"Content-Type": ctype}, body)}) as fake:
        logic = NoduleLogic(scene)
        logic.connect(fake.url)
        c = logic.classify(frame(scene))
    assert c.heat_volume is None and "not on the image's grid" in c.warning and "spacing" in c.warning


def test_result_without_label_is_a_bad_response(scene):
    from ThyroidNoduleLib import BadResponseError, NoduleLogic

    with FakeServer({"POST /infer/classify_nodule": lambda h, b: json_answer(200, {"result": "ok"})}) as fake:
        logic = NoduleLogic(scene)
        logic.connect(fake.url)
        with pytest.raises(BadResponseError, match="benign/malignant") as caught:
            logic.classify(frame(scene))
    assert_readable(caught.value)


# ----------------------------------------------------------------------------------- garbage
def test_html_page_instead_of_json():
    from ThyroidNoduleLib import BadResponseError, MonaiLabelClient, Timeouts

    page = b"<!doctype html><html><body>Proxy login</body></html>"
    with FakeServer({"GET /info/": lambda h, b: (200, {"Content-Type": "text/html"}, page)}) as fake:
        with pytest.raises(BadResponseError, match="not a MONAI Label response") as caught:
            MonaiLabelClient(fake.url, Timeouts(quick=5)).info()
    assert_readable(caught.value)


def test_not_http_at_all():
    from ThyroidNoduleLib import BadResponseError, MonaiLabelClient, Timeouts

    with RawServer(b"SSH-2.0-OpenSSH_9.6\r\n") as raw:
        with pytest.raises(BadResponseError, match="not valid HTTP") as caught:
            MonaiLabelClient(raw.url, Timeouts(quick=5)).info()
    assert_readable(caught.value)


def test_truncated_multipart_answer(scene):
    from ThyroidNoduleLib import BadResponseError, NoduleLogic
    from ThyroidNoduleLib.multipart import encode_multipart

    body, ctype = encode_multipart({"params": json.dumps(result_json())})
    cut = body[: len(body) // 2]
    with FakeServer({"POST /infer/classify_nodule": lambda h, b: (200, {"Content-Type": ctype}, cut)}) as fake:
        logic = NoduleLogic(scene)
        logic.connect(fake.url)
        with pytest.raises(BadResponseError, match="cut off or damaged"):
            logic.classify(frame(scene))


def test_other_app_is_recognised():
    from ThyroidNoduleLib import BadResponseError, NoduleLogic

    info = {"name": "Radiology", "version": "0.8.5", "models": {"segmentation_spleen": {}}}
    with FakeServer({"GET /info/": lambda h, b: json_answer(200, info)}) as fake:
        logic = NoduleLogic(None)
        logic.connect(fake.url)
        with pytest.raises(BadResponseError, match="no classify_nodule model") as caught:
            logic.test_connection()
    assert "segmentation_spleen" in str(caught.value)


def test_server_without_a_usable_model_is_reported():
    from ThyroidNoduleLib import NoduleLogic

    info = {"name": "Thyroid Nodule", "version": "1.0.0",
            "models": {"classify_nodule": {"model": None, "model_error": "no model is installed yet"}},
            "datastore": {"total": 3, "completed": 0, "diagnoses": {"benign": 0, "malignant": 0}}}
    with FakeServer({"GET /info/": lambda h, b: json_answer(200, info)}) as fake:
        logic = NoduleLogic(None)
        logic.connect(fake.url)
        report = logic.test_connection()
    assert report.model is None
    assert "No usable model: no model is installed yet" in report.message()
    assert "3 images, 0 confirmed" in report.message()


def test_next_case_when_every_image_is_confirmed(scene):
    from ThyroidNoduleLib import NoduleLogic

    with FakeServer({"POST /activelearning/uncertain": lambda h, b: json_answer(200, {})}) as fake:
        logic = NoduleLogic(scene)
        logic.connect(fake.url)
        assert logic.next_case() is None
    assert scene.GetNumberOfNodesByClass("vtkMRMLVolumeNode") == 0


def test_training_status_before_any_run():
    from ThyroidNoduleLib import NoduleLogic

    with FakeServer({"GET /train/": lambda h, b: json_answer(404, {"detail": "No Train Tasks Found"})}) as fake:
        logic = NoduleLogic(None)
        logic.connect(fake.url)
        progress = logic.training_progress()
    assert progress.status == "NONE" and not progress.running
    assert "No training has run" in progress.message()


def test_training_failure_reason_is_shown():
    from ThyroidNoduleLib import NoduleLogic

    task = {"status": "DONE", "details": ["[train] epoch 1/5 step 1/1 loss 0.7"]}
    info = {"train_stats": {"classify_nodule": {
        "status": "failed", "error": "DatalistError: training needs at least 4 confirmed cases of both classes"}}}
    with FakeServer({"GET /train/": lambda h, b: json_answer(200, task), "GET /info/": lambda h, b: json_answer(200, info)}) as fake:
        logic = NoduleLogic(None)
        logic.connect(fake.url)
        progress = logic.training_progress()
    assert progress.status == "ERROR"
    assert "Training failed: DatalistError: training needs at least 4 confirmed cases" in progress.message()


# ------------------------------------------------------------------------------ authentication
class AuthServer(FakeServer):
    """A server with MONAI Label's token authentication: user ``doctor`` / ``s3cret``."""

    def __init__(self, tokens=("token-1", "token-2")) -> None:
        self.issued = list(tokens)
        self.valid = set()
        info = {"name": "Thyroid Nodule", "version": "1.0.0", "models": {"classify_nodule": {"model": {
            "model": "sha256:feedfacecafebeef", "metrics": {"auc": 0.81}}}}}

        def auth(handler, body):
            return json_answer(200, {"enabled": True, "client_id": "monailabel-app", "realm": "x"})

        def token(handler, body):
            form = urllib.parse.parse_qs(body.decode())
            if form.get("username") == ["doctor"] and form.get("password") == ["s3cret"] \
                    and handler.headers.get("Content-Type") == "application/x-www-form-urlencoded":
                t = self.issued.pop(0)
                self.valid.add(t)
                return json_answer(200, {"access_token": t, "token_type": "bearer"})
            return json_answer(401, {"detail": "Invalid user credentials"})

        def guarded(handler, body):
            header = handler.headers.get("Authorization", "")
            if header.startswith("Bearer ") and header[7:] in self.valid:
                return json_answer(200, info)
            return json_answer(401, {"detail": "Not authenticated"})

        super().__init__({"GET /auth/": auth, "POST /auth/token": token, "GET /info/": guarded})


def test_login_then_bearer_token_on_requests():
    from ThyroidNoduleLib import NoduleLogic

    with AuthServer() as fake:
        logic = NoduleLogic(None)
        logic.connect(fake.url, username="doctor", password="s3cret")
        report = logic.test_connection()
        info_request = [r for r in fake.requests if r[1].startswith("/info/")][-1]
    assert report.auth and "(logged in)" in report.message()
    assert report.model == "sha256:feedfacecafebeef"
    assert info_request[2]["Authorization"] == "Bearer token-1"


def test_wrong_password_and_missing_login():
    from ThyroidNoduleLib import AuthenticationError, NoduleLogic

    with AuthServer() as fake:
        logic = NoduleLogic(None)
        logic.connect(fake.url, username="doctor", password="wrong")
        with pytest.raises(AuthenticationError, match="check the user name and password") as caught:
            logic.test_connection()
        assert_readable(caught.value)
        logic.connect(fake.url)  # no credentials
        with pytest.raises(AuthenticationError, match="requires a login") as caught:
            logic.test_connection()
        assert caught.value.status == 401
        assert_readable(caught.value)


def test_expired_token_logs_in_again_once():
    from ThyroidNoduleLib import MonaiLabelClient

    with AuthServer() as fake:
        client = MonaiLabelClient(fake.url, username="doctor", password="s3cret")
        client.login()
        fake.valid.clear()  # the server forgot (expired) the token
        info = client.info()
    assert info["name"] == "Thyroid Nodule"
    assert client.token == "token-2"


def test_server_without_auth_needs_no_token():
    from ThyroidNoduleLib import MonaiLabelClient

    info = {"name": "Thyroid Nodule", "models": {}}
    with FakeServer({"GET /info/": lambda h, b: json_answer(200, info)}) as fake:  # /auth/ is 404 there
        client = MonaiLabelClient(fake.url, username="doctor", password="x")
        assert client.login() is None
        assert client.info()["name"] == "Thyroid Nodule"
        assert all("Authorization" not in r[2] for r in fake.requests)
