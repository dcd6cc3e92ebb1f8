"""Tests without a server (fast, except the kill test) of what keeps the studies folder whole:
atomic writes whose temporary files no image pattern matches, leftovers of a crash removed before
MONAI Label's start-up reconciliation could adopt them, a write that fails (disk full) changing
nothing, uploads checked and stored by content, a kill in the middle of a label save, the backup
lock, the nasty corpus refused before decoding, and the HTTP layer's checks (storage errors,
upload names, ``params``)."""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import shutil
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from thyroid_plugin.errors import ImageTooLargeError, InvalidImageError
from thyroid_plugin.io import atomic_copy_file, is_partial_file, load_image
from thyroid_plugin.monailabel_adapter import ConfirmedCasesDatastore
from thyroid_plugin.studies import InvalidRequestError, StudiesFolderError
from tests.support.limits import file_size_limit
from tests.support.nasty import EXPECTED, nasty_files
from tests.support.paths import PYTHON, REPO

from .helpers import IMAGE_PATTERNS, check_studies_consistent, partial_files, rows


@pytest.fixture
def frames() -> list[dict]:
    return rows(2, 2, offset=30)


@pytest.fixture
def store(tmp_path, frames) -> ConfirmedCasesDatastore:
    ds = ConfirmedCasesDatastore(str(tmp_path / "studies"))
    for r in frames:
        ds.add_image(Path(r["file"]).stem, r["file"], {"case": r["case"]})
    return ds


# ------------------------------------------------------------------------------ atomic files
def test_temporary_files_match_no_image_pattern(tmp_path, frames):
    seen = []
    dst = tmp_path / "10_1.png"
    atomic_copy_file(frames[0]["file"], dst, before_replace=lambda: seen.extend(os.listdir(tmp_path)))
    assert len(seen) == 1 and seen[0] != dst.name
    temp = seen[0]
    assert temp.startswith(".10_1.png.") and temp.endswith(".partial") and is_partial_file(temp)
    assert not any(fnmatch.fnmatch(temp, p) for p in IMAGE_PATTERNS)
    assert dst.read_bytes() == Path(frames[0]["file"]).read_bytes()
    assert os.listdir(tmp_path) == [dst.name]


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    """A real "file too large" (RLIMIT_FSIZE) in the middle of the write: the old file stays."""
    target = tmp_path / "model.pt"
    target.write_bytes(b"old content")
    code = textwrap.dedent(f"""
        from thyroid_plugin.io import atomic_write_bytes
        try:
            atomic_write_bytes({str(target)!r}, b"x" * 300_000)
        except OSError as e:
            print("errno", e.errno)
    """)
    out = subprocess.run([str(PYTHON), "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         preexec_fn=file_size_limit(100_000))
    assert out.stdout.strip() == f"errno {errno.EFBIG}", out.stderr
    assert target.read_bytes() == b"old content"
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]


def test_a_failing_record_step_keeps_the_old_file(tmp_path, frames):
    dst = tmp_path / "a.png"
    atomic_copy_file(frames[0]["file"], dst)

    def fail():
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        atomic_copy_file(frames[1]["file"], dst, before_replace=fail)
    assert dst.read_bytes() == Path(frames[0]["file"]).read_bytes()
    assert os.listdir(tmp_path) == ["a.png"]


# --------------------------------------------------------------------------- the datastore
def test_crash_leftovers_are_removed_and_never_adopted(tmp_path, frames):
    studies = tmp_path / "studies"
    ConfirmedCasesDatastore(str(studies))
    png = Path(frames[0]["file"]).read_bytes()
    leftovers = [studies / ".10_1.png.k2j3h4.partial", studies / ".tmp-abc12310_1.png",  # current and older naming
                 studies / "labels" / "final" / ".x.png.0a9s8d.partial", studies / "labels" / "final" / ".tmp-zzzx.png"]
    for p in leftovers:
        p.write_bytes(png[: len(png) // 2])
    store = ConfirmedCasesDatastore(str(studies))
    assert partial_files(studies) == []
    assert store.list_images() == []
    check_studies_consistent(studies)


def test_images_and_labels_are_stored_by_content_not_by_name(store, frames, tmp_path):
    image_id = Path(frames[0]["file"]).stem
    upload = tmp_path / "upload.sh"  # a client's name says nothing about the content
    shutil.copyfile(frames[0]["mask"], upload)
    store.save_label(image_id, str(upload), "final", {"diagnosis": "benign", "roi": [1, 2, 100, 120]})
    labels = os.path.join(store.path, "labels", "final")
    assert os.listdir(labels) == [f"{image_id}.png"]
    # a label saved again as NRRD replaces the PNG one (no stale second file)
    import nrrd

    mask = np.asarray(Image.open(frames[0]["mask"]).convert("L"))
    nrrd.write(str(tmp_path / "m.nrrd"), np.ascontiguousarray(mask.T), {"space": "left-posterior-superior"})
    shutil.copyfile(tmp_path / "m.nrrd", tmp_path / "mask.bin")
    store.save_label(image_id, str(tmp_path / "mask.bin"), "final", {"diagnosis": "malignant"})
    assert os.listdir(labels) == [f"{image_id}.nrrd"]
    # the diagnosis and the label were written in the same datastore write
    saved = json.loads(Path(store.config_path).read_text())["objects"][image_id]
    assert saved["image"]["info"]["diagnosis"] == "malignant" and saved["labels"]["final"]["ext"] == ".nrrd"
    # something that is not an image is refused as a label, and nothing changes
    (tmp_path / "notes.png").write_text("not a mask")
    with pytest.raises(InvalidImageError):
        store.save_label(image_id, str(tmp_path / "notes.png"), "final", {})
    assert os.listdir(labels) == [f"{image_id}.nrrd"]
    check_studies_consistent(Path(store.path))


@pytest.mark.parametrize("info", [{"roi": [float("nan"), 1, 2, 3]}, {"notes": {"score": float("inf")}},
                                  {"diagnosis": "benign", "x": [float("-inf")]}])
def test_nan_and_infinity_never_reach_the_datastore_file(store, frames, info):
    image_id = Path(frames[1]["file"]).stem
    before = Path(store.config_path).read_bytes()
    with pytest.raises(InvalidRequestError):
        store.update_image_info(image_id, info)
    with pytest.raises(InvalidRequestError):
        store.save_label(image_id, frames[1]["mask"], "final", info)
    assert Path(store.config_path).read_bytes() == before
    json.loads(before)  # still plain JSON, readable by MONAI Label


def test_a_write_that_fails_changes_nothing_not_even_in_memory(tmp_path, frames):
    """Disk full while the datastore file is written: the request fails, the image and its
    record are not there, and the change is not written later by the next successful one."""

    class FullDisk(ConfirmedCasesDatastore):
        fail = False

        def _update_datastore_file(self, lock: bool = True) -> None:
            if self.fail:
                raise OSError(errno.ENOSPC, "No space left on device")
            super()._update_datastore_file(lock)

    studies = tmp_path / "studies"
    ds = FullDisk(str(studies))
    ds.add_image("a", frames[0]["file"], {})
    ds.fail = True
    with pytest.raises(OSError):
        ds.add_image("b", frames[1]["file"], {"case": "b"})
    with pytest.raises(OSError):
        ds.update_image_info("a", {"diagnosis": "malignant"})
    with pytest.raises(OSError):
        ds.save_label("a", frames[0]["mask"], "final", {"diagnosis": "benign"})
    assert sorted(ds.list_images()) == ["a"] and "diagnosis" not in ds.get_image_info("a")
    assert not (studies / "b.png").exists() and os.listdir(studies / "labels" / "final") == []
    ds.fail = False
    ds.update_image_info("a", {"case": "later"})
    saved = json.loads((studies / "datastore_v2.json").read_text())["objects"]
    assert sorted(saved) == ["a"] and "diagnosis" not in saved["a"]["image"]["info"]
    check_studies_consistent(studies)


class CountingWrites(ConfirmedCasesDatastore):
    """The server's datastore, counting its datastore-file writes; ``fail`` makes them fail as on a full disk."""
    writes = 0
    fail = False

    def _update_datastore_file(self, lock: bool = True) -> None:
        if self.fail:
            raise OSError(errno.ENOSPC, "No space left on device")
        super()._update_datastore_file(lock)
        self.writes += 1


def test_a_batch_of_labels_is_saved_in_one_datastore_write_and_bad_ones_are_named(tmp_path, frames):
    """The batch route's save: every good label stored (file and record, as ``save_label``
    stores one) with one write of the datastore file; a label that cannot be stored (a mask off
    its image's grid, an image the store does not hold, a file that is no image) is named with
    a reason and stops nothing else."""
    studies = tmp_path / "studies"
    ds = CountingWrites(str(studies))
    ids = []
    for r in frames:
        ids.append(ds.add_image(Path(r["file"]).stem, r["file"], {"case": r["case"]}))
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "small.png")
    (tmp_path / "notes.png").write_text("not a mask")
    labels = [(i, r["mask"], {"model": "m", "params": {"probability": 0.25 * k}}) for k, (i, r) in enumerate(zip(ids, frames))]
    labels[1] = (ids[1], str(tmp_path / "small.png"), {"model": "m"})
    labels[3] = (ids[3], str(tmp_path / "notes.png"), {"model": "m"})
    labels.append(("not_in_the_store", frames[0]["mask"], {"model": "m"}))
    ds.writes = 0
    errors = ds.save_labels(labels, "original")
    assert ds.writes == 1
    assert set(errors) == {ids[1], ids[3], "not_in_the_store"}
    assert all(isinstance(m, str) and m and "\n" not in m for m in errors.values()), errors
    assert "not found" in errors["not_in_the_store"]
    reopened = ConfirmedCasesDatastore(str(studies))  # what a restarted server sees
    for k in (0, 2):
        assert reopened.get_label_info(ids[k], "original")["params"] == {"probability": 0.25 * k}
        assert Path(reopened.get_label_uri(ids[k], "original")).read_bytes() == Path(frames[k]["mask"]).read_bytes()
    assert reopened.get_labels_by_image_id(ids[1]) == {} and reopened.get_labels_by_image_id(ids[3]) == {}
    check_studies_consistent(studies)


def test_a_batch_of_labels_that_cannot_be_recorded_changes_nothing(tmp_path, frames):
    """Disk full while the batch's record is written: the save fails as a whole, no label file
    and no temporary file is left, the labels saved before are kept, and nothing of the failed
    batch is written later by the next successful change."""
    studies = tmp_path / "studies"
    ds = CountingWrites(str(studies))
    ids = [ds.add_image(Path(r["file"]).stem, r["file"], {}) for r in frames]
    assert ds.save_labels([(ids[0], frames[0]["mask"], {"n": 1})], "original") == {}
    before = {p.name: p.read_bytes() for p in (studies / "labels" / "original").iterdir()}
    ds.fail = True
    with pytest.raises(OSError):
        ds.save_labels([(i, r["mask"], {"n": 2}) for i, r in zip(ids, frames)], "original")
    assert {p.name: p.read_bytes() for p in (studies / "labels" / "original").iterdir()} == before
    assert partial_files(studies) == []
    assert ds.get_label_info(ids[0], "original") == {"n": 1, "ts": ds.get_label_info(ids[0], "original")["ts"],
                                                     "name": f"{ids[0]}.png"}
    ds.fail = False
    ds.update_image_info(ids[1], {"case": "later"})
    saved = json.loads((studies / "datastore_v2.json").read_text())["objects"]
    assert [i for i in ids if saved[i]["labels"]] == [ids[0]]
    check_studies_consistent(studies)


@pytest.mark.slow
def test_kill_during_a_label_save_leaves_the_old_or_the_new_label(tmp_path, frames):
    """SIGKILL a process while it writes a label (caught while its ``.partial`` file exists):
    the reopened datastore holds a complete label, never a torn one, and nothing left over."""
    studies = tmp_path / "studies"
    ds = ConfirmedCasesDatastore(str(studies))
    rng = np.random.default_rng(0)
    masks = []
    for i in range(2):  # big masks (about 9 MB each), so that writing one takes a while
        path = tmp_path / f"mask{i}.png"
        Image.fromarray(rng.integers(0, 256, (3000, 3000), dtype=np.uint8)).save(path, compress_level=0)
        masks.append(path)
    ds.add_image("a", str(masks[0]), {})  # an image of the masks' size: a label must be on its grid
    ds.save_label("a", str(masks[0]), "final", {})
    code = textwrap.dedent(f"""
        from thyroid_plugin.monailabel_adapter import ConfirmedCasesDatastore
        ds = ConfirmedCasesDatastore({str(studies)!r})
        n = 0
        while True:
            ds.save_label("a", {str(masks[1])!r} if n % 2 == 0 else {str(masks[0])!r}, "final", {{"n": n}})
            n += 1
    """)
    proc = subprocess.Popen([str(PYTHON), "-c", code], cwd=REPO)
    labels = studies / "labels" / "final"
    caught = False
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if any(is_partial_file(e.name) for e in os.scandir(labels)):
                proc.send_signal(signal.SIGKILL)
                caught = True
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert caught, "the label write was never caught in progress"
    reopened = ConfirmedCasesDatastore(str(studies))
    stored = Path(reopened.get_label_uri("a", "final")).read_bytes()
    assert stored in (masks[0].read_bytes(), masks[1].read_bytes())
    check_studies_consistent(studies)


# ------------------------------------------------------------------------------ the folder
def test_an_unusable_studies_folder_is_one_clear_error(tmp_path):
    a_file = tmp_path / "not_a_folder"
    a_file.write_text("x")
    labels_is_a_file = tmp_path / "studies"
    labels_is_a_file.mkdir()
    (labels_is_a_file / "labels").write_text("x")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "datastore_v2.json").write_text('{"name": "x", "objects": {')
    for path, words in [(a_file / "studies", "Not a directory"), (a_file, "a file, not a folder"),
                        (labels_is_a_file, "labels"), (damaged, "damaged")]:
        with pytest.raises(StudiesFolderError) as e:
            ConfirmedCasesDatastore(str(path))
        message = str(e.value)
        assert "\n" not in message and str(path) in message and words in message, message


# ------------------------------------------------------------------------------ bad files
@pytest.mark.parametrize("name", list(EXPECTED))
def test_nasty_files_are_refused_before_decoding(name):
    path = next(p for p in nasty_files() if p.name == name)
    expected = EXPECTED[name]
    if expected == 200:
        load_image(path)
        return
    error = ImageTooLargeError if expected == 413 else InvalidImageError
    with pytest.raises(error) as e:
        load_image(path)
    assert type(e.value) is error or expected == 400
    assert str(e.value) and "\n" not in str(e.value) and str(path.parent) not in str(e.value)


def test_nasty_corpus_is_up_to_date(tmp_path):
    from tests.support.nasty import write_corpus

    for made in write_corpus(tmp_path):
        committed = next(p for p in nasty_files() if p.name == made.name)
        assert committed.read_bytes() == made.read_bytes(), f"regenerate {committed} (python -m tests.support.nasty)"


# ------------------------------------------------------------------------------ HTTP layer
@pytest.mark.parametrize("err, status", [(errno.ENOSPC, 507), (errno.EDQUOT, 507), (errno.EFBIG, 507),
                                         (errno.EROFS, 503), (errno.EACCES, 503), (errno.EPERM, 503), (errno.EIO, 503)])
def test_storage_errors_become_clear_http_answers(err, status):
    from fastapi import HTTPException

    from lib.http import http_errors

    with pytest.raises(HTTPException) as e:
        with http_errors():
            raise OSError(err, os.strerror(err), "/data/studies/x.png")
    assert e.value.status_code == status
    assert os.strerror(err) in e.value.detail and "nothing was saved" in e.value.detail or status == 503
    assert "/data/studies" not in e.value.detail


def test_a_studies_folder_error_in_a_request_is_a_503():
    from fastapi import HTTPException

    from lib.http import http_errors

    with pytest.raises(HTTPException) as e:
        with http_errors():
            raise StudiesFolderError("the studies folder /x cannot be used: Read-only file system")
    assert e.value.status_code == 503 and "Read-only" in e.value.detail


@pytest.mark.parametrize("name, safe", [
    ("frame.png", "frame.png"), ("../../../../tmp/evil.png", "evil.png"), ("/etc/passwd", "passwd"),
    ("a\x00b.png", "upload.png"), ("x" * 300 + ".png", "upload.png"), ("a" + ".x" * 200, "a"), ("..", "upload"),
    ("evil.sh", "evil"), ("IMG_1.NII.GZ", "IMG_1.nii.gz"), ("..\\..\\win.dcm", "win.dcm"), ("", "upload"),
    (None, "upload"), (".png", "upload"), ("....png", "upload.png"), (" x.png", "upload.png"),
])
def test_upload_names_are_neutralised(name, safe):
    from lib.routes import safe_upload_name

    assert safe_upload_name(name) == safe


@pytest.mark.parametrize("text, status", [
    ('{"roi": [1, 2, 3, 4]}', None), ("", None), ('{"roi": [NaN, 1, 2, 3]}', 422), ('{"x": Infinity}', 422),
    ("[" * 100_000 + "]" * 100_000, 422), ('{"a": ' * 5000 + "1" + "}" * 5000, 422), ("[1]", 422), ('"text"', 422),
    ("{bad", 422), ('{"a": 1}{"b": 2}', 422),
])
def test_params_json_is_checked(text, status):
    from fastapi import HTTPException

    from lib.routes import json_object_field

    if status is None:
        json_object_field("params", text)
        return
    with pytest.raises(HTTPException) as e:
        json_object_field("params", text)
    assert e.value.status_code == status and "params" in e.value.detail


def test_infer_params_keep_roi_and_frame_only():
    from fastapi import HTTPException

    from lib.routes import infer_params

    assert json.loads(infer_params('{"roi": [1, 2, 30, 40], "frame": 2, "label_info": [1]}')) == {"roi": [1, 2, 30, 40],
                                                                                                "frame": 2}
    assert infer_params("") == "{}"
    for key in ("image", "image_path", "save_label", "model", "device", "logging", "skip_writer", "session"):
        with pytest.raises(HTTPException) as e:
            infer_params(json.dumps({key: "x"}))
        assert e.value.status_code == 422 and key in e.value.detail


def test_the_documented_backup_lock_holds_writers_back(store, frames):
    """``flock <studies>/.writer.lock <copy command>`` (docs/operating.md, Backups) makes
    writers wait, so a backup taken under it is consistent as a whole."""
    studies = Path(store.path)
    holder = subprocess.Popen(["flock", str(studies / ".writer.lock"), "sleep", "2"])
    try:
        time.sleep(0.5)  # the lock is taken
        t = time.time()
        store.update_image_info(Path(frames[0]["file"]).stem, {"case": "after the backup"})
        waited = time.time() - t
    finally:
        holder.wait(timeout=30)
    assert waited > 1.0, f"the write did not wait for the backup ({waited:.2f} s)"
