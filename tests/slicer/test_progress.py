"""The progress contract as the module reads it: training progress from ``/info`` ->
``train_stats``, batch progress from the batch's JSON progress line; log lines are never parsed.
(The server side of the contract: ``test_training.py`` and ``test_server_logic.py`` against a real
server.)"""

from __future__ import annotations

import json

import pytest

from .helpers import FakeServer, json_answer


def test_training_progress_counts_completed_epochs_of_the_running_run():
    from ThyroidNoduleLib import training_progress_from

    p = training_progress_from("RUNNING", {"status": "running", "epoch": 3, "total_epochs": 12, "start_ts": 1})
    assert (p.epoch, p.total_epochs, p.fraction, p.running) == (3, 12, 0.25, True)
    assert p.message() == "Training: 3 of 12 epochs done."


@pytest.mark.parametrize("stats", [
    {"status": "done", "epoch": 40, "total_epochs": 40},  # the previous run's: this one has not written yet
    {"status": "running", "epoch": -1, "total_epochs": 4},
    {"status": "running", "epoch": "2", "total_epochs": 4},
    {"status": "running", "epoch": 1, "total_epochs": 0},
    {"status": "running", "epoch": True, "total_epochs": 4},
    {},
])
def test_training_progress_without_usable_stats_is_unknown(stats):
    from ThyroidNoduleLib import training_progress_from

    details = ["[train] epoch 3/4 step 1/2 loss 0.7"]  # a log line: never read
    p = training_progress_from("RUNNING", stats, details)
    assert p.running and p.epoch is None and p.fraction is None
    assert p.message() == "Training is starting..."


def test_finished_training_reads_the_stats_and_shows_log_lines_only_as_a_reason():
    from ThyroidNoduleLib import training_progress_from

    done = training_progress_from("DONE", {"status": "stopped early", "epoch": 5, "total_epochs": 40, "published": False,
                                           "model": "sha256:aa", "metrics": {"auc": 0.8}, "best_metric": 0.8})
    assert (done.status, done.fraction, done.epoch, done.total_epochs) == ("DONE", 1.0, 5, 40)
    assert "Training finished (5/40 epochs): validation auc 0.80; the served model was kept" in done.message()
    assert "whole frame" not in done.message()  # a server that does not count boxes
    boxed = {"status": "done", "epoch": 3, "total_epochs": 3, "published": True, "model": "sha256:bb", "metrics": {"auc": 0.7},
             "boxes": {"train": {"roi": 5, "mask": 1, "none": 2}, "val": {"roi": 1, "mask": 0, "none": 1}}}
    shown = training_progress_from("DONE", boxed)
    assert (shown.whole_frames, shown.cases) == (3, 10)
    assert shown.message().endswith("3 of 10 cases had no nodule box and were trained on the whole frame: confirm with a box "
                                    "to train on the nodule.")
    every_box = {**boxed, "boxes": {"train": {"roi": 7, "mask": 1, "none": 0}, "val": {"roi": 2, "mask": 0, "none": 0}}}
    assert "whole frame" not in training_progress_from("DONE", every_box).message()
    assert training_progress_from("DONE", {**boxed, "boxes": {"train": {"roi": "x"}}}).whole_frames is None

    failed = training_progress_from("DONE", {"status": "failed", "error": "DatalistError: too few cases"})
    assert failed.status == "ERROR" and failed.fraction is None and failed.error == "DatalistError: too few cases"

    stopped = training_progress_from("DONE", {"status": "stopped", "error": "stopped on request"})
    assert stopped.status == "STOPPED" and not stopped.running and stopped.fraction is None

    crashed = training_progress_from("ERROR", {}, ["loading", "  MemoryError  "])
    assert crashed.error == "MemoryError" and "Training failed: MemoryError." == crashed.message()
    assert training_progress_from("STOPPED", {"status": "done", "epoch": 2}).message().startswith("Training was stopped")


def test_training_progress_asks_info_only_while_running_or_finished():
    from ThyroidNoduleLib import NoduleLogic

    state = {"status": "SUBMITTED"}
    info = {"train_stats": {"classify_nodule": {"status": "running", "epoch": 1, "total_epochs": 2}}}
    with FakeServer({"GET /train/": lambda h, b: json_answer(200, state),
                     "GET /info/": lambda h, b: json_answer(200, info)}) as fake:
        logic = NoduleLogic(None)
        logic.connect(fake.url)
        submitted = logic.training_progress()
        state["status"] = "RUNNING"
        running = logic.training_progress()
    assert submitted.message() == "Training is starting..."
    assert running.fraction == 0.5
    assert [r[1] for r in fake.requests] == ["/train/", "/train/", "/info/"]


def _line(done, total) -> str:
    return json.dumps({"batch_progress": {"done": done, "total": total, "unit": "images"}})


def test_batch_progress_reads_the_last_progress_record():
    from ThyroidNoduleLib import batch_progress_from

    details = [_line(8, 20), "[batch] 16/20 images", "INFO something {not json", _line(16, 20), '{"other": 1}',
               "[batch] 20/20 images"]
    p = batch_progress_from({"status": "RUNNING", "details": details})
    assert (p.done, p.total) == (16, 20)
    assert p.message() == "Classifying the server's images: 16/20."


@pytest.mark.parametrize("details", [
    ["[batch] 3/4 images"],
    [_line(5, 4)],
    [_line(-1, 4)],
    [_line(1.5, 4)],
    ['{"batch_progress": [1, 4]}'],
    ["[1, 2]"],
    [],
])
def test_batch_progress_without_a_valid_record_is_unknown(details):
    from ThyroidNoduleLib import batch_progress_from

    p = batch_progress_from({"status": "RUNNING", "details": details})
    assert p.done is None and p.total is None
    assert p.message() == "Batch classification is starting..."
