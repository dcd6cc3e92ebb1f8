"""Faults: the server process killed (SIGKILL) while it saves labels, while a model is being
published and during a background batch; a training run killed or stopped; a full disk; a
studies folder that cannot be used. After a restart the datastore is consistent, every
acknowledged label is there, the served model is a complete one, and the batch runs again."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from thyroid_plugin.checkpoint import model_identity
from thyroid_plugin.io import is_partial_file
from tests.support.limits import file_size_limit
from tests.support.paths import PYTHON, REPO
from tests.support.server import MonaiLabelServer, free_port

from .helpers import (
    TIMEOUT,
    check_studies_consistent,
    datastore_objects,
    make_model_dir,
    make_studies,
    partial_files,
    rows,
    served_model,
    subprocess_of,
    wait_until,
)

pytestmark = pytest.mark.slow


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def noise_png(path: Path, seed: int, side: int = 2500) -> bytes:
    """A big valid mask (about ``side``² bytes, stored uncompressed) so that writing it takes a while."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8)).save(path, compress_level=0)
    return path.read_bytes()


def kill_when_partial(server: MonaiLabelServer, folders, stop: threading.Event, min_acks, timeout: float = 180) -> bool:
    """SIGKILL the server's process group as soon as a ``.partial`` file exists in ``folders``
    (a write in progress), once ``min_acks()`` is true. Returns whether it caught one."""
    deadline = time.time() + timeout
    while time.time() < deadline and not stop.is_set():
        if min_acks():
            for folder in folders():
                try:
                    entries = list(os.scandir(folder))
                except FileNotFoundError:
                    continue
                if any(is_partial_file(e.name) for e in entries):
                    os.killpg(server.process.pid, signal.SIGKILL)
                    return True
        else:
            time.sleep(0.01)
    return False


# --------------------------------------------------------------------------- label saves
def test_kill_during_label_saves_loses_no_acknowledged_label(tmp_path, small_model):
    studies = make_studies(tmp_path, rows(2, 2, offset=14))
    server = MonaiLabelServer(studies, make_model_dir(tmp_path, small_model), log_path=tmp_path / "server.log")
    server.start()
    try:
        masks = [noise_png(tmp_path / f"mask{i}.png", i) for i in range(4)]
        images = []
        for i in range(2):  # images of the masks' size (a label must be on its image's grid)
            r = requests.put(f"{server.url}/datastore/image", params={"image": f"big{i}"},
                             files={"file": ("big.png", masks[i])}, timeout=TIMEOUT)
            assert r.status_code == 200, r.text
            images.append(f"big{i}")
        acked: dict = {}  # (image, tag) -> (n, sha) of the last acknowledged save
        in_flight: dict = {}  # (image, tag) -> (n, sha) of the save sent last
        lock = threading.Lock()
        stop = threading.Event()

        def client(k: int) -> None:
            key = (images[k % len(images)], f"reader{k}")
            n = 0
            while not stop.is_set():
                data = masks[(k + n) % len(masks)]
                with lock:
                    in_flight[key] = (n, sha(data))
                try:
                    r = requests.put(f"{server.url}/datastore/label", params={"image": key[0], "tag": key[1]},
                                     files={"label": ("mask.png", data, "image/png")},
                                     data={"params": json.dumps({"n": n, "reader": k})}, timeout=TIMEOUT)
                except requests.RequestException:
                    return  # the server was killed under this request: not acknowledged
                if r.status_code == 200:
                    with lock:
                        acked[key] = (n, sha(data))
                else:
                    assert r.status_code < 500, r.text
                n += 1

        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(4)]
        for t in threads:
            t.start()
        labels = studies / "labels"
        caught = kill_when_partial(server, lambda: [labels, *labels.glob("*")] + [studies], stop,
                                   lambda: sum(1 for _ in acked) >= 4)
        stop.set()
        for t in threads:
            t.join(timeout=TIMEOUT)
        assert caught, "no label write was caught in progress"
        server.stop()
        server.start()
        objects = check_studies_consistent(studies)
        for key, (n, digest) in acked.items():
            r = requests.get(f"{server.url}/datastore/label", params={"label": key[0], "tag": key[1]}, timeout=TIMEOUT)
            assert r.status_code == 200, (key, r.text)
            # the acknowledged label, or the one that was in flight when the server died: whole
            assert sha(r.content) in {digest, in_flight[key][1]}, key
            assert objects[key[0]]["labels"][key[1]]["info"]["n"] in (n, in_flight[key][0]), key
        assert requests.get(f"{server.url}/info/", timeout=TIMEOUT).status_code == 200
    finally:
        server.stop()


# ---------------------------------------------------------------------- model publication
def test_kill_during_model_publication_serves_a_complete_model(tmp_path, small_model, other_small_model):
    """The trainer publishes with ``atomic_write_bytes`` and ``PUT /model`` with
    ``install_model``: kill a process doing both in a loop while a model file is half written,
    then start the server on that model folder."""
    model_dir = make_model_dir(tmp_path, small_model)
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO / "apps" / "thyroid_nodule")!r})
        from lib.configs.classify_nodule import ClassifyNoduleConfig
        from thyroid_plugin.io import atomic_write_bytes
        config = ClassifyNoduleConfig()
        config.init("classify_nodule", {str(model_dir)!r}, {{"model_dir": {str(model_dir)!r}}}, None)
        models = [open({str(small_model)!r}, "rb").read(), open({str(other_small_model)!r}, "rb").read()]
        paths = [{str(small_model)!r}, {str(other_small_model)!r}]
        n = 0
        while True:
            if n % 2:
                atomic_write_bytes(config.trained_path, models[(n // 2) % 2])  # what training does to publish
            else:
                config.install_model(paths[(n // 2) % 2])  # what PUT /model does
            n += 1
            print(n, flush=True)
    """)
    proc = subprocess.Popen([str(PYTHON), "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    caught = False
    try:
        first = proc.stdout.readline()  # one publication done: the trained model exists
        assert first.strip(), "the publisher did not start"
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if any(is_partial_file(e.name) for e in os.scandir(model_dir)):
                os.killpg(proc.pid, signal.SIGKILL)
                caught = True
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert caught, "no model publication was caught in progress"
    assert any(is_partial_file(p.name) for p in model_dir.iterdir()), "the half-written file should be there"
    studies = make_studies(tmp_path, rows(1, 1, offset=16))
    with MonaiLabelServer(studies, model_dir, log_path=tmp_path / "server.log") as server:
        assert served_model(server.url) in {model_identity(small_model), model_identity(other_small_model)}
        frame = next(studies.glob("*.png"))
        r = requests.post(f"{server.url}/infer/classify_nodule", params={"output": "json"},
                          files={"file": ("f.png", frame.read_bytes())}, timeout=TIMEOUT)
        assert r.status_code == 200 and r.json()["model"] == served_model(server.url), r.text
        assert not any(is_partial_file(p.name) for p in model_dir.iterdir()), "left-overs are removed at start"


# ------------------------------------------------------------------------- batch inference
def test_kill_during_a_background_batch_then_run_it_again(tmp_path, small_model):
    studies = make_studies(tmp_path, rows(5, 5, offset=17), rows(5, 5, offset=22))
    server = MonaiLabelServer(studies, make_model_dir(tmp_path, small_model), log_path=tmp_path / "server.log")
    server.start()
    try:
        total = len(datastore_objects(server.url))
        r = requests.post(f"{server.url}/batch/infer/classify_nodule", params={"images": "all"},
                          json={"label_tag": "nightly", "batch_size": 1}, timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        nightly = studies / "labels" / "nightly"
        wait_until(lambda: nightly.is_dir() and any(p.suffix == ".png" for p in nightly.iterdir()), timeout=300,
                   interval=0.02, what="the first batch result")
        os.killpg(server.process.pid, signal.SIGKILL)  # the server and its batch process
        server.stop()
        done_before = len(list(nightly.glob("*.png")))
        assert 0 < done_before < total, "the batch was not killed in the middle"
        server.start()
        objects = check_studies_consistent(studies)
        for image_id, obj in objects.items():  # every result kept is complete: mask and its JSON together
            if "nightly" in obj["labels"]:
                assert obj["labels"]["nightly"]["info"]["params"]["label"] in ("benign", "malignant")
        r = requests.post(f"{server.url}/batch/infer/classify_nodule", params={"images": "all", "run_sync": "true"},
                          json={"label_tag": "nightly"}, timeout=600)
        assert r.status_code == 200 and r.json()["total"] == total and r.json()["failed"] == 0, r.text
        objects = check_studies_consistent(studies)
        assert all(obj["labels"]["nightly"]["info"]["params"]["label"] in ("benign", "malignant")
                   for obj in objects.values())
    finally:
        server.stop()


# ------------------------------------------------------------------------------- training
def test_a_training_run_that_crashes_or_is_stopped_changes_nothing_and_says_why(shared_server):
    url = shared_server.url
    model = served_model(url)
    objects = datastore_objects(url)

    def model_files() -> dict:
        return {p.name: sha(p.read_bytes()) for p in shared_server.model_dir.glob("*.pt")}

    models = model_files()

    def start():
        wait_until(lambda: requests.get(f"{url}/train/", timeout=TIMEOUT).status_code == 404
                   or requests.get(f"{url}/train/", timeout=TIMEOUT).json()["status"] != "RUNNING", what="no training")
        r = requests.post(f"{url}/train/classify_nodule", json={"max_epochs": 50, "publish": "always"}, timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        wait_until(lambda: requests.get(f"{url}/info/", timeout=TIMEOUT).json()["train_stats"]
                   .get("classify_nodule", {}).get("status") == "running", timeout=300, what="training running")

    def final_status() -> dict:
        return wait_until(lambda: (lambda s: s if s["status"] in ("DONE", "ERROR", "STOPPED") else None)(
            requests.get(f"{url}/train/", timeout=TIMEOUT).json()), timeout=120, what="training ended")

    # a crash (the training process killed, as the kernel's OOM killer would)
    start()
    trainer = wait_until(lambda: subprocess_of(shared_server.process.pid, "-m train"), what="the training process")
    trainer.kill()
    assert final_status()["status"] == "ERROR"
    stats = requests.get(f"{url}/info/", timeout=TIMEOUT).json()["train_stats"]["classify_nodule"]
    assert stats["status"] == "failed" and "ended before finishing" in stats["error"] and "kept" in stats["error"]
    assert served_model(url) == model and datastore_objects(url) == objects
    assert model_files() == models

    # stopped on request
    start()
    r = requests.delete(f"{url}/train/", timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["status"] == "STOPPED"
    stats = requests.get(f"{url}/info/", timeout=TIMEOUT).json()["train_stats"]["classify_nodule"]
    assert stats["status"] == "stopped" and "stopped on request" in stats["error"]
    assert served_model(url) == model and datastore_objects(url) == objects
    assert model_files() == models


# ------------------------------------------------------------------------------ full disk
def test_a_full_disk_is_a_507_and_corrupts_nothing(tmp_path, small_model):
    """The server runs with a 2 MB file size limit (RLIMIT_FSIZE): every write past it fails
    with EFBIG, as writes fail on a full disk."""
    studies = make_studies(tmp_path, [], rows(2, 2, offset=27))  # unconfirmed cases
    server = MonaiLabelServer(studies, make_model_dir(tmp_path, small_model), log_path=tmp_path / "server.log",
                              preexec_fn=file_size_limit(2_000_000))
    server.start()
    try:
        url = server.url
        ids = sorted(datastore_objects(url))
        big = noise_png(tmp_path / "big.png", 7, side=1600)  # 2.6 MB: more than the limit
        frame = (studies / f"{ids[0]}.png").read_bytes()
        for i in (0, 1):  # grow the datastore file close to the limit with long notes
            r = requests.put(f"{url}/datastore/image/info", params={"image": ids[i]},
                             data={"info": json.dumps({"notes": "n" * 900_000})}, timeout=TIMEOUT)
            assert r.status_code == 200, r.text
        before = json.loads((studies / "datastore_v2.json").read_text())
        files_before = sorted(str(p.relative_to(studies)) for p in studies.rglob("*") if p.is_file())
        attempts = [
            ("a big upload", lambda: requests.put(f"{url}/datastore/image", params={"image": "big"},
                                                  files={"file": ("big.png", big)}, timeout=TIMEOUT)),
            ("a new image", lambda: requests.put(f"{url}/datastore/image", params={"image": "new"},
                                                 files={"file": ("f.png", frame)},
                                                 data={"params": json.dumps({"notes": "x" * 300_000})}, timeout=TIMEOUT)),
            ("a label with its diagnosis", lambda: requests.put(
                f"{url}/datastore/label", params={"image": ids[2], "tag": "final"},
                files={"label": ("m.png", (studies / f"{ids[2]}.png").read_bytes())},
                data={"params": json.dumps({"diagnosis": "benign", "notes": "x" * 300_000})}, timeout=TIMEOUT)),
            ("a diagnosis", lambda: requests.put(f"{url}/datastore/image/info", params={"image": ids[3]},
                                                 data={"info": json.dumps({"diagnosis": "malignant", "notes": "y" * 300_000})},
                                                 timeout=TIMEOUT)),
        ]
        for what, attempt in attempts:
            r = attempt()
            assert r.status_code == 507, (what, r.status_code, r.text)
            assert "storage is full" in r.json()["detail"] and "nothing was saved" in r.json()["detail"]
        assert json.loads((studies / "datastore_v2.json").read_text()) == before
        assert sorted(str(p.relative_to(studies)) for p in studies.rglob("*") if p.is_file()) == files_before
        assert partial_files(studies) == []
        # what was refused is not shown either, and small writes still work
        assert "diagnosis" not in requests.get(f"{url}/datastore/image/info", params={"image": ids[3]},
                                               timeout=TIMEOUT).json()
        r = requests.put(f"{url}/datastore/image/info", params={"image": ids[3]},
                         data={"info": json.dumps({"diagnosis": "malignant"})}, timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        r = requests.post(f"{url}/infer/classify_nodule", params={"output": "json"}, files={"file": ("f.png", frame)},
                          timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        server.stop()
        server.preexec_fn = None
        server.start()
        objects = check_studies_consistent(studies)
        assert objects[ids[3]]["image"]["info"]["diagnosis"] == "malignant" and "new" not in objects
    finally:
        server.stop()


# --------------------------------------------------------------------- unusable studies
def test_an_unusable_studies_folder_stops_the_server_with_one_line(tmp_path, small_model):
    a_file = tmp_path / "not_a_folder"
    a_file.write_text("a regular file")
    # the run script: the studies folder's parent is a regular file
    env = {**os.environ, "STUDIES": str(a_file / "studies"), "PORT": str(free_port()), "HOST": "127.0.0.1"}
    out = subprocess.run(["bash", str(REPO / "scripts" / "run_server.sh")], env=env, capture_output=True, text=True,
                         timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    assert "Traceback" not in text
    assert "cannot be used: Not a directory" in text.strip().splitlines()[-1], text
    # the server started directly on a studies "folder" that is a file
    server = MonaiLabelServer(a_file, make_model_dir(tmp_path, small_model), log_path=tmp_path / "server.log")
    with pytest.raises(RuntimeError) as e:
        server.start(timeout=180)
    assert "exited with 2" in str(e.value)
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log
    errors = [line for line in log.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1 and f"the studies folder {a_file} cannot be used: it is a file, not a folder" in errors[0], log
