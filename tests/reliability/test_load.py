"""Under load: the load script (``bench/load_test.py``, shortened) finds no 5xx and no hang, a
saturated server answers ``503`` with a message at once, memory stays bounded; ``/info`` keeps
answering while inferences and a synchronous batch run (MONAI Label 0.8.5 would compute them in
its event loop: the app runs them in worker threads); and inference during a retrain answers with
the previous model until the new one is published, then with the new one, never with a
half-written one."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest
import requests

from tests.support.paths import PYTHON, REPO

from .conftest import SHARED_CONF
from .helpers import TIMEOUT, datastore_objects, served_model, wait_until

pytestmark = pytest.mark.slow


def test_load_script_short_run(shared_server, tmp_path):
    out = tmp_path / "load.json"
    run = subprocess.run([str(PYTHON), str(REPO / "bench" / "load_test.py"), "--url", shared_server.url,
                          "--pid", str(shared_server.process.pid), "--clients", "32", "--duration", "10",
                          "--max-requests", "2000", "--deadline", "60", "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["requests"] > 32 and result["errors"]["count"] == 0 and result["hung_threads"] == 0
    kinds = result["kinds"]
    assert kinds["infer"]["ok"] > 0 and kinds["read"]["ok"] > 0 and kinds["save"]["ok"] > 0
    assert all(int(code) < 500 or code == "503" for code in kinds["all"]["status"] if code != "None")
    # 32 clients against a queue of SHARED_CONF["infer_queue"]: the overflow is told so, quickly
    busy = result["busy"]
    assert busy["count"] > 0 and busy["all_with_message"] and busy["all_within_deadline"], busy
    assert "busy" in busy["messages"][0]
    assert result["info_under_load"]["failed"] == 0 and result["info_under_load"]["max_ms"] < 3000
    assert 0 < result["rss_mb"]["peak"] < 6000
    assert SHARED_CONF["infer_queue"] == 4


def test_info_answers_while_inferences_and_a_batch_run(shared_server):
    url = shared_server.url
    frames = [p.read_bytes() for p in sorted(shared_server.studies.glob("*.png"))[:4]]
    stop = threading.Event()
    batch_running = threading.Event()
    failures = []

    def batches():
        while not stop.is_set():
            batch_running.set()
            r = requests.post(f"{url}/batch/infer/classify_nodule", params={"images": "all", "run_sync": "true"},
                              json={"label_tag": "busy_batch"}, timeout=600)
            batch_running.clear()
            if r.status_code != 200:
                failures.append(("batch", r.status_code, r.text[:200]))

    def infers(k):
        while not stop.is_set():
            r = requests.post(f"{url}/infer/classify_nodule", params={"output": "json"},
                              files={"file": ("f.png", frames[k % len(frames)])}, timeout=TIMEOUT)
            if r.status_code not in (200, 503):
                failures.append(("infer", r.status_code, r.text[:200]))

    workers = [threading.Thread(target=batches, daemon=True)] + [
        threading.Thread(target=infers, args=(k,), daemon=True) for k in range(4)]
    for w in workers:
        w.start()
    latencies, during_batch = [], 0
    try:
        wait_until(batch_running.is_set, timeout=30, interval=0.05, what="a batch running")
        end = time.time() + 12
        while time.time() < end:
            in_batch = batch_running.is_set()
            t = time.perf_counter()
            r = requests.get(f"{url}/info/", timeout=TIMEOUT)
            latencies.append(time.perf_counter() - t)
            assert r.status_code == 200
            during_batch += in_batch and batch_running.is_set()
            time.sleep(0.2)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=600)
    assert not failures, failures[:3]
    assert during_batch >= 5, "the batch did not overlap the /info requests"
    assert max(latencies) < 3.0, f"/info took {max(latencies):.2f} s while inference ran"


def test_inference_during_a_retrain_switches_once_to_the_complete_new_model(shared_server):
    url = shared_server.url
    requests.delete(f"{url}/model/classify_nodule", timeout=TIMEOUT)  # start from the shipped model
    wait_until(lambda: requests.get(f"{url}/train/", timeout=TIMEOUT).status_code == 404
               or requests.get(f"{url}/train/", timeout=TIMEOUT).json()["status"] != "RUNNING", what="no training")
    old = served_model(url)
    frame = (shared_server.studies / f"{sorted(datastore_objects(url))[0]}.png").read_bytes()
    seen = {0: [], 1: []}
    errors = []
    stop = threading.Event()

    def client(k):
        while not stop.is_set():
            try:
                r = requests.post(f"{url}/infer/classify_nodule", params={"output": "json"},
                                  files={"file": ("f.png", frame)}, timeout=TIMEOUT)
            except requests.RequestException as e:
                errors.append(repr(e))
                continue
            if r.status_code == 200:
                seen[k].append(r.json()["model"])
            elif r.status_code != 503:
                errors.append((r.status_code, r.text[:200]))
            time.sleep(0.05)

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in seen]
    for t in threads:
        t.start()
    try:
        r = requests.post(f"{url}/train/classify_nodule", json={"max_epochs": 1, "publish": "always"}, timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        status = wait_until(lambda: (lambda s: s if s["status"] in ("DONE", "ERROR", "STOPPED") else None)(
            requests.get(f"{url}/train/", timeout=TIMEOUT).json()), timeout=900, interval=1, what="training done")
        assert status["status"] == "DONE", status.get("details")
        new = served_model(url)
        count = [len(v) for v in seen.values()]
        wait_until(lambda: all(len(v) >= c + 3 for v, c in zip(seen.values(), count)), timeout=60, what="answers after")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=TIMEOUT)
    assert not errors, errors[:3]
    assert new != old
    stats = requests.get(f"{url}/info/", timeout=TIMEOUT).json()["train_stats"]["classify_nodule"]
    assert stats["published"] is True and stats["model"] == new
    for k, models in seen.items():
        assert set(models) <= {old, new}, set(models)
        assert models[0] == old and models[-1] == new
        switch = models.index(new)  # one switch, never back: old ... old new ... new
        assert models[:switch] == [old] * switch and models[switch:] == [new] * (len(models) - switch), k
        assert switch > 3, "the previous model answered while the retrain ran"
    requests.delete(f"{url}/model/classify_nodule", timeout=TIMEOUT)  # serve the shipped model again
