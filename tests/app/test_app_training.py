"""Retraining through the real server: the served model changes only when a run completes, the
validation cases stay fixed, and a stopped run leaves everything as it was."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import requests

from thyroid_plugin.checkpoint import load_checkpoint
from thyroid_plugin.config import load_config
from thyroid_plugin.io import load_image
from thyroid_plugin.lesion import lesion_box, margin_box
from thyroid_plugin.monailabel_adapter import import_collection
from tests.support.paths import ddti_subset
from tests.support.server import MonaiLabelServer

pytestmark = pytest.mark.slow

TIMEOUT = 60


def wait_for_train(url: str, timeout: float = 900) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = requests.get(f"{url}/train/", timeout=TIMEOUT)
        if r.status_code == 200 and r.json().get("status") in ("DONE", "ERROR", "STOPPED"):
            return r.json()
        time.sleep(2)
    raise AssertionError("training did not finish in time")


def served(url: str) -> str:
    return requests.get(f"{url}/info/", timeout=TIMEOUT).json()["models"]["classify_nodule"]["model"]["model"]


def classify(url: str, path: str) -> dict:
    r = requests.post(f"{url}/infer/classify_nodule", params={"output": "json"},
                      files={"file": ("f.png", open(path, "rb"), "image/png")}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def server(tmp_path_factory, small_model):
    root = tmp_path_factory.mktemp("train")
    model_dir = root / "model"
    model_dir.mkdir()
    shutil.copyfile(small_model, model_dir / "pretrained_classify_nodule.pt")
    rows = ddti_subset(5, 5, offset=3)
    items = [{"image": r["file"], "label": 0 if r["label"] == "benign" else 1, "group": r["case"]} for r in rows]
    for item, row in list(zip(items, rows))[::2]:  # half the cases confirmed with a loose box, as users draw them
        item["roi"] = list(margin_box(lesion_box(load_image(row["mask"]).array), 0.25, load_image(row["file"]).shape))
    import_collection(items, root / "studies")
    with MonaiLabelServer(root / "studies", model_dir) as s:
        s.rows = rows
        s.boxed = sum(1 for item in items if item.get("roi"))
        yield s


def test_too_few_confirmed_cases_fail_with_a_reason(tmp_path, small_model):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copyfile(small_model, model_dir / "pretrained_classify_nodule.pt")
    rows = ddti_subset(0, 3)
    import_collection([{"image": r["file"], "label": 1, "group": r["case"]} for r in rows], tmp_path / "studies")
    with MonaiLabelServer(tmp_path / "studies", model_dir) as s:
        before = served(s.url)
        assert requests.post(f"{s.url}/train/classify_nodule", json={"max_epochs": 1}, timeout=TIMEOUT).status_code == 200
        assert wait_for_train(s.url)["status"] == "ERROR"
        stats = requests.get(f"{s.url}/info/", timeout=TIMEOUT).json()["train_stats"]["classify_nodule"]
        assert stats["status"] == "failed" and "both classes" in stats["error"]
        assert served(s.url) == before


def test_stopping_a_run_leaves_the_served_model(server):
    before = served(server.url)
    r = requests.post(f"{server.url}/train/classify_nodule", json={"max_epochs": 50, "publish": "always"}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    deadline = time.time() + 600
    while time.time() < deadline:  # wait until it is really training
        details = requests.get(f"{server.url}/train/", timeout=TIMEOUT).json().get("details", [])
        if any("[train] epoch" in line for line in details):
            break
        time.sleep(1)
    else:
        raise AssertionError("no training progress was reported")
    stopped = requests.delete(f"{server.url}/train/", timeout=TIMEOUT).json()
    assert stopped["status"] == "STOPPED"
    assert served(server.url) == before
    stats = requests.get(f"{server.url}/info/", timeout=TIMEOUT).json()["train_stats"]["classify_nodule"]
    assert stats["status"] in ("stopped", "failed")


def test_training_publishes_a_new_model_that_the_server_follows(server):
    image = server.rows[0]["file"]
    before_id = served(server.url)
    before = classify(server.url, image)
    r = requests.post(f"{server.url}/train/classify_nodule", json={"max_epochs": 1, "publish": "always"}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    result = wait_for_train(server.url)
    assert result["status"] == "DONE", result.get("details")
    assert any("[train] epoch 1/1" in line for line in result["details"])
    after_id = served(server.url)
    assert after_id != before_id
    after = classify(server.url, image)
    assert after["model"] == after_id
    assert after["probabilities"] != before["probabilities"]
    stats = requests.get(f"{server.url}/info/", timeout=TIMEOUT).json()["train_stats"]["classify_nodule"]
    assert stats["status"] == "done" and stats["published"] is True and stats["model"] == after_id
    assert set(stats["metrics"]) >= {"auc", "accuracy", "sensitivity", "specificity", "f1", "balanced_accuracy"}
    assert stats["val_size"] > 0 and stats["train_size"] > 0
    # the shipped model's recipe at its input size: the cases confirmed with a box were cut around it, the others whole
    published = load_checkpoint(server.model_dir / "classify_nodule.pt")
    assert published["image_size"] == load_config("train")["image_size"] == 96
    boxes = stats["boxes"]
    assert boxes == published["train"]["boxes"]
    assert boxes["train"]["roi"] + boxes["val"]["roi"] == server.boxed
    assert boxes["train"]["none"] + boxes["val"]["none"] == len(server.rows) - server.boxed
    # every model's figures are at the threshold it serves with: the new one's, and the old one's as the baseline
    assert stats["metrics"]["threshold"] == after["threshold"]
    assert stats["baseline"]["metrics"]["threshold"] == before["threshold"]
    # published calibrated on the site's held-out confirmed cases: /info says how, as the run's stats do
    assert stats["calibration"]["method"] == "platt" and stats["calibration"]["n"] == stats["val_size"]
    shown = requests.get(f"{server.url}/info/", timeout=TIMEOUT).json()["models"]["classify_nodule"]["model"]["calibration"]
    assert shown["scale"] == pytest.approx(stats["calibration"]["scale"])
    assert shown["shift"] == pytest.approx(stats["calibration"]["shift"])

    # a second run on more cases keeps every earlier case on its side of the split
    split_file = server.model_dir / "classify_nodule_split.json"
    first = json.loads(split_file.read_text())["groups"]
    for row in ddti_subset(2, 2, offset=12):  # new confirmed cases arrive over REST
        image_id = f"new_{row['case']}"
        r = requests.put(f"{server.url}/datastore/image", params={"image": image_id},
                         files={"file": ("f.png", open(row["file"], "rb"), "image/png")}, timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        r = requests.put(f"{server.url}/datastore/image/info", params={"image": image_id},
                         data={"info": json.dumps({"diagnosis": row["label"], "case": row["case"]})}, timeout=TIMEOUT)
        assert r.status_code == 200, r.text
    requests.post(f"{server.url}/train/classify_nodule", json={"max_epochs": 1, "publish": "if_better"}, timeout=TIMEOUT)
    assert wait_for_train(server.url)["status"] == "DONE"
    second = json.loads(split_file.read_text())["groups"]
    assert {g: second[g] for g in first} == first
    assert len(second) > len(first)


def test_metrics_follow_a_configured_threshold(tmp_path, small_model):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copyfile(small_model, model_dir / "pretrained_classify_nodule.pt")
    rows = ddti_subset(3, 3, offset=3)
    import_collection([{"image": r["file"], "label": int(r["label"] == "malignant"), "group": r["case"]} for r in rows],
                      tmp_path / "studies")
    with MonaiLabelServer(tmp_path / "studies", model_dir, conf={"threshold": 0.3}) as s:
        r = requests.post(f"{s.url}/train/classify_nodule", json={"max_epochs": 1, "publish": "always"}, timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        assert wait_for_train(s.url)["status"] == "DONE"
        info = requests.get(f"{s.url}/info/", timeout=TIMEOUT).json()
        stats, model = info["train_stats"]["classify_nodule"], info["models"]["classify_nodule"]["model"]
        assert classify(s.url, rows[0]["file"])["threshold"] == 0.3
        assert model["metrics"]["threshold"] == stats["metrics"]["threshold"] == stats["baseline"]["metrics"]["threshold"] == 0.3
        assert {k: model["metrics"][k] for k in stats["metrics"]} == pytest.approx(stats["metrics"], nan_ok=True)


def test_a_synchronous_training_runs_in_its_own_process_and_classification_goes_on(server):
    """``POST /train/...?run_sync=true`` waits for the run, but the run is a separate process (as
    a background one is): training under autocast with gradients in the server process beside the
    served model's threads can deadlock them (issue 12). Classification answers meanwhile."""
    import threading

    result: dict = {}

    def train_sync():
        r = requests.post(f"{server.url}/train/classify_nodule", params={"run_sync": "true"},
                          json={"max_epochs": 1}, timeout=900)
        result["status"], result["body"] = r.status_code, r.json()

    before = served(server.url)
    runner = threading.Thread(target=train_sync)
    runner.start()
    commands: set = set()
    answered = 0
    while runner.is_alive():
        commands |= _child_commands(server.process.pid)
        classify(server.url, server.rows[answered % len(server.rows)]["file"])
        answered += 1
    runner.join()
    assert result["status"] == 200, result
    assert result["body"]["status"] == "done" and "published" in result["body"], result["body"]
    assert any("monailabel.interfaces.utils.app -m train" in c for c in commands), commands
    assert answered >= 2
    assert result["body"]["published"] is (served(server.url) != before)


def _child_commands(pid: int) -> set:
    """Command lines of the server's child processes now."""
    import psutil

    commands = set()
    try:
        for child in psutil.Process(pid).children(recursive=True):
            try:
                commands.add(" ".join(child.cmdline()))
            except psutil.NoSuchProcess:
                pass
    except psutil.NoSuchProcess:
        pass
    return commands
