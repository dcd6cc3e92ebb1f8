"""The batch route's task in this process (no server): the app's ``PersistingBatchInfer`` with a
real ``ClassifyNodule`` over a real model file and a real studies datastore of DDTI frames. What a
pipeline relies on: every result ends up stored as its label (what a restarted server reads),
progress counts saved chunks, and a write that fails (a full disk) ends the batch with that error,
keeping the chunks saved before it and leaving no partial file."""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path

import pytest

from thyroid_plugin.monailabel_adapter import ConfirmedCasesDatastore
from tests.reliability.helpers import check_studies_consistent, partial_files
from tests.support.paths import REPO, ddti_subset

APP_DIR = REPO / "apps" / "thyroid_nodule"
if str(APP_DIR) not in sys.path:  # the app's ``lib`` package, as MONAI Label imports it
    sys.path.insert(0, str(APP_DIR))

CHUNK = 2


class RecordingStore(ConfirmedCasesDatastore):
    """The studies datastore, recording which images each ``save_labels`` call stores; a call can
    fail as a full disk does."""

    def __init__(self, path: str, fail_call: int | None = None) -> None:
        super().__init__(path)
        self.fail_call = fail_call
        self.calls: list[list[str]] = []

    def save_labels(self, labels, label_tag):
        self.calls.append([image_id for image_id, _, _ in labels])
        if len(self.calls) == self.fail_call:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().save_labels(labels, label_tag)


@pytest.fixture
def batch_parts(tmp_path, small_model):
    from lib.batch import PersistingBatchInfer
    from lib.infers.classify_nodule import ClassifyNodule

    task = ClassifyNodule([str(small_model)], predictor_args={"compile": "off", "precision": "fp32"}, device="cpu")
    frames = ddti_subset(3, 3)

    def make(**kw):
        store = RecordingStore(str(tmp_path / "studies"), **kw)
        for r in frames:
            store.add_image(Path(r["file"]).stem, r["file"], {"case": r["case"]})
        return PersistingBatchInfer(task, max_pixels=40_000_000, batch_size=CHUNK), store

    return make


def _progress(out: str) -> list[tuple[int, int]]:
    lines = [json.loads(line)["batch_progress"] for line in out.splitlines() if line.startswith('{"batch_progress"')]
    return [(p["done"], p["total"]) for p in lines]


def test_every_result_is_kept_as_its_label_chunk_by_chunk(batch_parts, capsys):
    batch, store = batch_parts()
    summary = batch({"images": "all"}, store, None)
    ids = sorted(store.list_images())
    assert summary["total"] == 6 and summary["failed"] == 0, summary
    assert store.calls == [ids[k : k + CHUNK] for k in range(0, 6, CHUNK)]
    assert _progress(capsys.readouterr().out) == [(2, 6), (4, 6), (6, 6)]
    reopened = ConfirmedCasesDatastore(str(store._datastore_path))  # what a restarted server sees
    for image_id in ids:
        stored = reopened.get_label_info(image_id, "original")["params"]
        assert stored["label"] in ("benign", "malignant")
        assert stored["probabilities"] == summary["results"][image_id]["probabilities"]
        assert Path(reopened.get_label_uri(image_id, "original")).is_file()
    phases = summary["phase_seconds"]
    assert set(phases) == {"read", "classify", "save"} and sum(phases.values()) <= summary["seconds"] + 0.05


def test_a_write_that_fails_ends_the_batch_and_keeps_the_chunks_saved_before(batch_parts, capsys):
    batch, store = batch_parts(fail_call=2)
    with pytest.raises(OSError, match="No space left"):
        batch({"images": "all"}, store, None)
    ids = sorted(store.list_images())
    reopened = ConfirmedCasesDatastore(str(store._datastore_path))
    assert [i for i in ids if reopened.get_labels_by_image_id(i)] == ids[:CHUNK]
    assert _progress(capsys.readouterr().out) == [(2, 6)]
    assert partial_files(Path(store._datastore_path)) == []
    check_studies_consistent(Path(store._datastore_path))
