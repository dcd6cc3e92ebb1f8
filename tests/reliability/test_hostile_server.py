"""Hostile and faulty input, second round (issue 17), against a real server whose temp folder
(``TMPDIR``) belongs to the test: header fields that drive work, compressed bombs, a large
allowed frame, temp files of failed requests, unplanned 500s, invalid data accepted silently,
server paths and tracebacks in answers, and clients that never finish their headers or body.

The last test checks the server after all of it: resident memory within 300 MB of where it
started, nothing left in its temp folder, and classification as fast as before."""

from __future__ import annotations

import json
import socket
import threading
import time

import psutil
import pytest
import requests

from tests.support.nasty import GENERATED_EXPECTED, _dicom, generated_payloads
from tests.support.paths import REPO
from tests.support.server import MonaiLabelServer, parse_multipart

from .helpers import TIMEOUT, datastore_objects, make_model_dir, make_studies, rows, wait_until

pytestmark = pytest.mark.slow

#: short limits so that the slow-client tests are quick
CONF = {"max_upload_mb": 24, "header_timeout_s": 2, "body_idle_timeout_s": 2, "body_timeout_s": 20}
HUGE = 10 ** 400


@pytest.fixture(scope="module")
def server(tmp_path_factory, small_model):
    """Two confirmed cases (too few to train: a run fails, with a traceback in its output) and
    two unconfirmed ones; ``TMPDIR`` a folder of the test."""
    root = tmp_path_factory.mktemp("hostile_server")
    tmp = root / "tmp"
    tmp.mkdir()
    studies = make_studies(root, rows(1, 1, offset=30), rows(1, 1, offset=32))
    srv = MonaiLabelServer(studies, make_model_dir(root, small_model), conf=CONF, env={"TMPDIR": str(tmp)},
                           log_path=root / "server.log")
    srv.start()
    srv.root, srv.tmp = root, tmp
    started_tmp = tmp_files(srv)  # what start-up leaves there (MONAI Label's log config), before any request
    image_id = sorted(datastore_objects(srv.url))[0]
    srv.image_id = image_id
    srv.png = (studies / f"{image_id}.png").read_bytes()
    classify(srv)  # warm: the first inference loads what it needs
    srv.baseline = {"classify_s": min(timed_classify(srv) for _ in range(3))}
    srv.baseline["tmp"] = started_tmp
    check_tmp_as_at_start(srv)
    srv.baseline["rss_mb"] = rss_mb(srv)
    yield srv
    srv.stop()


def rss_mb(server) -> float:
    return psutil.Process(server.process.pid).memory_info().rss / 2**20


def tmp_files(server) -> set:
    return {str(p.relative_to(server.tmp)) for p in server.tmp.rglob("*")}


def check_tmp_as_at_start(server) -> None:
    """The temp folder holds what it held before the first request, once the files of answers
    already sent are gone (MONAI Label deletes those just after the answer: a fast client can
    look before that)."""
    deadline = time.time() + 10
    while tmp_files(server) != server.baseline["tmp"] and time.time() < deadline:
        time.sleep(0.2)
    now = tmp_files(server)
    assert now == server.baseline["tmp"], ("left:", now - server.baseline["tmp"], "gone:", server.baseline["tmp"] - now)


def classify(server, data: bytes = None, name: str = "frame.png", output: str = "json", params=None, **kw):
    return requests.post(f"{server.url}/infer/classify_nodule", params={"output": output, **kw},
                         files={"file": (name, server.png if data is None else data, "application/octet-stream")},
                         data={"params": json.dumps(params or {})}, timeout=TIMEOUT)


def timed_classify(server) -> float:
    t = time.perf_counter()
    r = classify(server)
    assert r.status_code == 200, r.text
    return time.perf_counter() - t


def detail(r) -> str:
    return r.json()["detail"]


# --------------------------------------------------------------- payloads of the fuzz corpus
PAYLOADS = generated_payloads()


@pytest.mark.parametrize("name", list(GENERATED_EXPECTED))
def test_generated_payloads_get_a_clear_answer(server, name):
    """Line skip 10^12 (a core busy for good), bzip2/gzip/deflated bombs (hundreds of MB), NaN or
    singular geometry (a 500, or NaN in the JSON), a 6000 x 6000 frame (6 GB)."""
    expected = GENERATED_EXPECTED[name]
    data = PAYLOADS[name]
    before = rss_mb(server)
    peak = {"mb": before}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak["mb"] = max(peak["mb"], rss_mb(server))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.time()
    try:
        r = classify(server, data, name, output="all" if expected == 200 else "json")
    finally:
        done.set()
        sampler.join()
    assert r.status_code == expected, r.text[:300]
    assert time.time() - t < 60
    if expected == 200:
        params, mask = parse_multipart(r)
        assert "NaN" not in json.dumps(params) and mask
    else:
        assert detail(r) and "Traceback" not in detail(r)
    assert peak["mb"] - before < 1500, f"{peak['mb'] - before:.0f} MB more while answering"
    assert rss_mb(server) - before < 300, f"{rss_mb(server) - before:.0f} MB more after answering"
    r = requests.put(f"{server.url}/datastore/image", params={"image": "generated_" + name.split(".")[0]},
                     files={"file": (name, data)}, timeout=TIMEOUT)
    assert r.status_code == expected, r.text[:300]


# ------------------------------------------------------------------------------ temp files
def test_failed_uploads_leave_nothing_in_the_temp_folder(server):
    check_tmp_as_at_start(server)
    text = b"this is not an image\n"
    assert classify(server, text, "x.png").status_code == 400
    r = requests.put(f"{server.url}/datastore/image", params={"image": "not_an_image"}, files={"file": ("x.png", text)},
                     timeout=TIMEOUT)
    assert r.status_code == 400, r.text
    r = requests.put(f"{server.url}/datastore/label", params={"image": server.image_id, "tag": "final"},
                     files={"label": ("x.png", text)}, timeout=TIMEOUT)
    assert r.status_code == 400, r.text
    r = classify(server, params={"roi": [0, 0, 2, 2]})  # refused after the upload was spooled
    assert r.status_code == 422, r.text
    check_tmp_as_at_start(server)


# ---------------------------------------------------------------------------- 500s -> 4xx
def test_huge_integers_and_unknown_checksums_are_4xx(server):
    r = classify(server, params={"roi": [HUGE, 0, 10, 10]})
    assert r.status_code == 422 and "roi" in detail(r), r.text[:300]
    r = requests.put(f"{server.url}/datastore/image/info", params={"image": server.image_id},
                     data={"info": json.dumps({"roi": [HUGE, 0, 10, 10]})}, timeout=TIMEOUT)
    assert r.status_code == 422, r.text[:300]
    r = requests.put(f"{server.url}/datastore/label", params={"image": server.image_id, "tag": "final"},
                     files={"label": ("m.png", server.png)},
                     data={"params": json.dumps({"diagnosis": "benign", "roi": [0, 0, HUGE, 10]})}, timeout=TIMEOUT)
    assert r.status_code == 422, r.text[:300]
    r = requests.head(f"{server.url}/datastore/image", params={"image": server.image_id, "check_sum": "FOO:x"},
                      timeout=TIMEOUT)  # the check-only request (a HEAD answer has no body to read)
    assert r.status_code == 422, r.status_code


# ------------------------------------------------------------------------ invalid data
def _unconfirmed(server) -> str:
    objects = datastore_objects(server.url)
    return sorted(k for k, v in objects.items() if not v["image"]["info"].get("diagnosis"))[0]


def test_labels_that_do_not_fit_and_bad_infos_are_refused(server):
    from PIL import Image
    import io

    image_id = _unconfirmed(server)
    buf = io.BytesIO()
    Image.new("L", (50, 50)).save(buf, format="PNG")
    labels = [("small.png", buf.getvalue(), "final"), ("m.dcm", _dicom(64, 64, bytes(64 * 64)), "final"),
              ("m.png", server.png, "final\n")]
    for name, data, tag in labels:
        r = requests.put(f"{server.url}/datastore/label", params={"image": image_id, "tag": tag},
                         files={"label": (name, data)}, data={"params": json.dumps({"diagnosis": "malignant"})},
                         timeout=TIMEOUT)
        assert r.status_code == 422, (name, r.text[:300])
    assert not any("\n" in p.name for p in (server.studies / "labels").iterdir())
    for info in [{"roi": [300, 300, -5, 1e300]}, {"ts": 1}, {"name": "other.png"}, {"diagnosis": "maybe"}]:
        r = requests.put(f"{server.url}/datastore/image/info", params={"image": image_id},
                         data={"info": json.dumps(info)}, timeout=TIMEOUT)
        assert r.status_code == 422, (info, r.text[:300])
    confirmed = sorted(set(datastore_objects(server.url)) - {image_id})[0]
    r = requests.put(f"{server.url}/datastore/label/info", params={"label": server.image_id, "tag": "final"},
                     data={"info": json.dumps({"diagnosis": "maybe"})}, timeout=TIMEOUT)
    assert r.status_code in (404, 422), r.text[:300]
    info = datastore_objects(server.url)[image_id]["image"]["info"]
    assert "diagnosis" not in info and "roi" not in info and info["name"].startswith(image_id)
    assert confirmed


def test_bad_train_options_are_refused_before_anything_is_written(server):
    split = server.model_dir / "classify_nodule_split.json"
    before = sorted(p.name for p in server.model_dir.rglob("*"))
    for options in [{"max_epochs": -1}, {"val_split": 2, "learning_rate": "abc"}, {"learning_rate": "abc"}]:
        r = requests.post(f"{server.url}/train/classify_nodule", json=options, timeout=TIMEOUT)
        assert r.status_code == 422, (options, r.text[:300])
    assert not split.exists()
    assert sorted(p.name for p in server.model_dir.rglob("*")) == before


# ------------------------------------------------------------------------------- leaks
def test_answers_carry_no_server_paths_or_tracebacks(server):
    r = requests.post(f"{server.url}/train/classify_nodule", params={"run_sync": "true"}, json={"max_epochs": 1},
                      timeout=300)  # in the server process: too few cases is the client's to fix
    assert r.status_code == 422 and "confirmed cases" in detail(r), r.text[:300]
    r = requests.post(f"{server.url}/train/classify_nodule", json={"max_epochs": 1}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text[:300]  # a training process that fails with a traceback in its output

    def finished():
        task = requests.get(f"{server.url}/train/", timeout=TIMEOUT).json()
        return task.get("status") not in ("RUNNING", "SUBMITTED")

    wait_until(finished, timeout=300, what="the failing training run to end")
    secrets = [str(REPO), str(server.root), "Traceback", 'File "', "object at 0x"]
    answers = [requests.get(f"{server.url}/train/", params={"all": "true"}, timeout=TIMEOUT),
               requests.get(f"{server.url}/datastore/image/info", params={"image": server.image_id}, timeout=TIMEOUT),
               requests.get(f"{server.url}/datastore/", params={"output": "train"}, timeout=TIMEOUT),
               requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=TIMEOUT),
               classify(server, b"\x89PNG\r\n\x1a\n" + bytes(64), "f.png")]
    train_text = answers[0].text
    assert "DatalistError" in train_text or "confirmed cases" in train_text, train_text[-2000:]
    for r in answers:
        assert r.status_code < 500, r.text[:300]
        leaked = [s for s in secrets if s in r.text]
        assert not leaked, (r.url, leaked, r.text[:500])
    assert "/tmp" not in answers[-1].text and "tmp" not in detail(answers[-1]).split("(")[0]


# --------------------------------------------------------------------------- slow clients
def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` within ``seconds`` (an answer before closing is read)."""
    sock.settimeout(seconds)
    t = time.time()
    try:
        while time.time() - t < seconds:
            if not sock.recv(65536):
                return True
    except socket.timeout:
        return False
    except ConnectionResetError:
        return True
    return False


def test_clients_that_never_finish_headers_or_body_are_cut_off(server):
    host, port = "127.0.0.1", server.port
    partial = []
    for _ in range(300):
        s = socket.create_connection((host, port), timeout=10)
        s.sendall(b"GET /info/ HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        partial.append(s)
    assert requests.get(f"{server.url}/info/", timeout=TIMEOUT).status_code == 200  # still answering meanwhile
    assert all(_closed_within(s, 10) for s in partial)
    for s in partial:
        s.close()
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(b"PUT /datastore/image/info?image=" + server.image_id.encode() + b" HTTP/1.1\r\nHost: x\r\n"
              b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\ninfo=%7B%7D")
    t = time.time()
    assert _closed_within(s, 15)
    assert time.time() - t < 12
    s.close()
    assert requests.get(f"{server.url}/info/", timeout=TIMEOUT).status_code == 200


# ---------------------------------------------------------------------------- afterwards
def test_after_the_hostile_suite_the_server_is_as_it_was(server):
    assert rss_mb(server) - server.baseline["rss_mb"] < 300, (rss_mb(server), server.baseline)
    check_tmp_as_at_start(server)
    took = min(timed_classify(server) for _ in range(3))
    assert took < max(3 * server.baseline["classify_s"], server.baseline["classify_s"] + 2), (took, server.baseline)
