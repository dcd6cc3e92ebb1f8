"""Train from the module: start, follow the progress, see the resulting metrics; stop a run.

These tests train on a server of their own: a finished run changes the served model, which the
other tests of this folder must not see whatever the order they run in."""

from __future__ import annotations

import pytest

from .conftest import start_server
from .helpers import wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory, small_model):
    """This file's own server (replaces the shared one for the ``logic`` fixture)."""
    srv = start_server(tmp_path_factory.mktemp("slicer_training_server"), small_model)
    yield srv
    srv.stop()


def test_train_shows_progress_and_resulting_metrics(logic):
    from ThyroidNoduleLib import TrainingProgress

    task = logic.start_training(max_epochs=2, publish="always", options={"val_split": 0.25})
    assert task.get("status") in ("SUBMITTED", "RUNNING", "QUEUED")
    seen: list[TrainingProgress] = []

    def finished():
        progress = logic.training_progress()
        seen.append(progress)
        return not progress.running

    wait_for(finished, timeout=600, interval=0.5, what="training to finish")

    # progress while running came from /info -> train_stats: completed epochs of the 2 asked for
    counted = [p for p in seen if p.running and p.fraction is not None]
    assert counted, f"no running state with an epoch count was seen: {[p.message() for p in seen]}"
    # (the task may still run, publishing, after its stats count both epochs)
    assert all(p.total_epochs == 2 and p.fraction == p.epoch / 2 and p.epoch <= 2 for p in counted), \
        [(p.epoch, p.total_epochs, p.fraction) for p in counted]
    assert [p.epoch for p in counted] == sorted(p.epoch for p in counted)
    final = seen[-1]
    assert final.status == "DONE", final.message()
    assert final.fraction == 1.0
    assert final.epoch == 2 and final.total_epochs == 2
    assert {"auc", "accuracy", "sensitivity", "specificity"} <= set(final.metrics)
    assert final.published is True and final.model.startswith("sha256:")
    assert "Training finished" in final.message() and final.model in final.message()
    # the new model serves now, and "Test connection" says so
    assert logic.test_connection().model == final.model


def test_train_stop(logic):
    served = logic.test_connection().model
    logic.start_training(max_epochs=200, publish="always")
    wait_for(lambda: logic.training_progress().status == "RUNNING", timeout=300, interval=1.0, what="training to run")

    logic.stop_training()

    final = wait_for(lambda: (lambda p: p if not p.running else None)(logic.training_progress()), timeout=120,
                     interval=1.0, what="training to stop")
    assert final.status == "STOPPED"
    assert "stopped" in final.message()
    assert logic.test_connection().model == served  # a stopped run publishes nothing


def test_train_refuses_invalid_options_before_sending(logic):
    from ThyroidNoduleLib import InputError

    with pytest.raises(InputError, match="at least one epoch"):
        logic.start_training(max_epochs=0)
    with pytest.raises(InputError, match="publish"):
        logic.start_training(max_epochs=1, publish="sometimes")
