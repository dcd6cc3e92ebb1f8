"""Helpers of the reliability tests: studies folders of real DDTI frames, consistency checks of a
studies folder on disk, polling, and the process tree of a server."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import psutil
import requests

from tests.support.paths import APP_DIR, ddti_subset

TIMEOUT = 60
#: the datastore's image patterns (a file matching one is adopted as an image at start-up)
IMAGE_PATTERNS = ["*.png", "*.jpg", "*.jpeg", "*.bmp", "*.tif", "*.tiff", "*.dcm", "*.nii.gz", "*.nii", "*.nrrd"]


def app_lib() -> None:
    """Make the app's ``lib`` package importable (the server puts the app folder on its path)."""
    if str(APP_DIR) not in sys.path:
        sys.path.insert(0, str(APP_DIR))


def datalist(rows: list[dict]) -> list[dict]:
    return [{"image": r["file"], "label": 0 if r["label"] == "benign" else 1, "group": r["case"]} for r in rows]


def make_studies(root: Path, confirmed: list[dict], unconfirmed: Iterable[dict] = ()) -> Path:
    from thyroid_plugin.monailabel_adapter import import_collection

    studies = root / "studies"
    import_collection(datalist(confirmed), studies)
    unconfirmed = list(unconfirmed)
    if unconfirmed:
        import_collection(datalist(unconfirmed), studies, with_diagnosis=False)
    return studies


def make_model_dir(root: Path, model: Path) -> Path:
    d = root / "model"
    d.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model, d / "pretrained_classify_nodule.pt")
    return d


def wait_until(condition: Callable[[], object], timeout: float = 120, interval: float = 0.5, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what} not reached within {timeout} s")


def served_model(url: str, headers: Optional[dict] = None) -> Optional[str]:
    task = requests.get(f"{url}/info/", headers=headers, timeout=TIMEOUT).json()["models"]["classify_nodule"]
    return (task.get("model") or {}).get("model")


def datastore_objects(url: str, headers: Optional[dict] = None) -> dict:
    r = requests.get(f"{url}/datastore/", params={"output": "all"}, headers=headers, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return r.json()["objects"]


def partial_files(root: Path) -> list[Path]:
    from thyroid_plugin.io import is_partial_file

    return [p for p in Path(root).rglob("*") if p.is_file() and is_partial_file(p.name)]


def files_under(root: Path) -> set:
    return {str(p.relative_to(root)) for p in Path(root).rglob("*") if p.is_file()}


def check_studies_consistent(studies: Path) -> dict:
    """The studies folder as a restarted server leaves it: the datastore JSON parses; every
    image and label it lists exists and is a readable frame; every image file on disk is
    listed; nothing half-written is left. Returns the JSON's objects."""
    from thyroid_plugin.io import load_image

    studies = Path(studies)
    config = studies / "datastore_v2.json"
    objects = json.loads(config.read_text())["objects"] if config.exists() else {}
    for image_id, obj in objects.items():
        load_image(studies / f"{image_id}{obj['image']['ext']}")
        for tag, label in obj["labels"].items():
            load_image(studies / "labels" / tag / f"{image_id}{label['ext']}")
    on_disk = [n for n in os.listdir(studies) if any(fnmatch.fnmatch(n, p) for p in IMAGE_PATTERNS)]
    listed = {f"{i}{o['image']['ext']}" for i, o in objects.items()}
    assert set(on_disk) <= listed, f"image files not in the datastore: {set(on_disk) - listed}"
    assert partial_files(studies) == [], partial_files(studies)
    return objects


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def tree_rss_mb(pid: int) -> float:
    total = 0
    for p in process_tree(pid):
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def subprocess_of(pid: int, marker: str) -> Optional[psutil.Process]:
    """The first child process of ``pid`` whose command line contains ``marker``."""
    for p in process_tree(pid)[1:]:
        try:
            if marker in " ".join(p.cmdline()):
                return p
        except psutil.NoSuchProcess:
            continue
    return None


def rows(n_benign: int, n_malignant: int, offset: int = 0) -> list[dict]:
    return ddti_subset(n_benign, n_malignant, offset=offset)
