"""The operating point: chosen on validation data (Youden's J), stored with the model, used by
inference, and settable with ``thyroid-nodule calibrate``."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch

from thyroid_plugin.checkpoint import load_checkpoint, set_threshold, validation_metrics
from thyroid_plugin.inference import NodulePredictor
from thyroid_plugin.metrics import binary_metrics, youden_threshold
from tests.support.metrics import sklearn_metrics
from tests.support.paths import REPO, ddti_subset, write_csv


def test_youden_threshold_maximises_sensitivity_plus_specificity():
    p = [0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.3]
    y = [1, 1, 1, 0, 1, 0, 0]
    t = youden_threshold(p, y)
    # by hand: t = 0.85 gives sens 3/4, spec 3/3 (J = 0.75); t = 0.7 gives 4/4 and 2/3 (J = 0.667)
    assert t == 0.85
    best = max(binary_metrics(p, y, c)["sensitivity"] + binary_metrics(p, y, c)["specificity"] for c in p)
    m = binary_metrics(p, y, t)
    assert m["sensitivity"] + m["specificity"] == pytest.approx(best)


def test_youden_threshold_without_both_classes_is_the_default():
    assert youden_threshold([0.2, 0.9], [1, 1]) == 0.5
    assert youden_threshold([0.2, 0.9], [0, 0], default=0.4) == 0.4


def test_the_stored_operating_point_decides_the_label(tmp_path, small_model):
    model = tmp_path / "m.pt"
    shutil.copyfile(small_model, model)
    frame = ddti_subset(1, 0)[0]["file"]
    p = NodulePredictor(model).predict(frame).probabilities["malignant"]
    for threshold, label in ((max(1e-4, p - 1e-3), "malignant"), (min(0.9999, p + 1e-3), "benign")):
        set_threshold(model, threshold)
        assert load_checkpoint(model)["threshold"] == pytest.approx(threshold)
        predictor = NodulePredictor(model)
        assert predictor.threshold == pytest.approx(threshold)
        result = predictor.predict(frame)
        assert result.label == label and result.threshold == pytest.approx(threshold)
    # an explicit setting wins over the model's
    assert NodulePredictor(model, threshold=0.0001).predict(frame).label == "malignant"
    with pytest.raises(ValueError):
        set_threshold(model, 1.5)


def test_calibrate_command_sets_the_validation_operating_point(tmp_path, small_model):
    model = tmp_path / "m.pt"
    shutil.copyfile(small_model, model)
    rows = ddti_subset(3, 3, offset=40)
    csv_path = write_csv(rows, tmp_path / "val.csv")
    out = subprocess.run([str(REPO / ".venv" / "bin" / "thyroid-nodule"), "calibrate", "--csv", str(csv_path), "--model", str(model),
                          "--no-temperature"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    predictor = NodulePredictor(model)
    probs = [predictor.predict(r["file"]).probabilities["malignant"] for r in rows]
    labels = [int(r["label"] == "malignant") for r in rows]
    assert report["threshold"] == pytest.approx(youden_threshold(probs, labels), abs=1e-5)
    after = load_checkpoint(model)
    assert after["threshold"] == pytest.approx(report["threshold"], abs=1e-5)
    assert np.isclose(predictor.threshold, report["threshold"], atol=1e-5)
    # the stored metrics are now these images' at the new threshold, and the weights are untouched
    expected = sklearn_metrics(probs, labels, after["threshold"])
    assert {k: after["metrics"][k] for k in expected} == pytest.approx(expected, abs=1e-5, nan_ok=True)
    assert {k: predictor.info()["metrics"][k] for k in expected} == pytest.approx(expected, abs=1e-5, nan_ok=True)
    before = load_checkpoint(small_model)["state_dict"]
    assert after["state_dict"].keys() == before.keys()
    assert all(torch.equal(after["state_dict"][k], v) and after["state_dict"][k].dtype == v.dtype for k, v in before.items())


def test_calibrate_command_folds_a_temperature_into_the_weights(tmp_path, small_model):
    """``calibrate --method temperature``: the served probabilities become the old ones with
    their logits divided by the fitted temperature (ranking unchanged), the threshold is Youden's
    on them, and the file records the temperature and the ECE."""
    from thyroid_plugin.calibration import expected_calibration_error, fit_temperature, scale_probabilities

    model = tmp_path / "m.pt"
    shutil.copyfile(small_model, model)
    rows = ddti_subset(4, 4, offset=40)
    csv_path = write_csv(rows, tmp_path / "val.csv")
    before = [NodulePredictor(model).predict(r["file"]).probabilities["malignant"] for r in rows]
    labels = [int(r["label"] == "malignant") for r in rows]
    out = subprocess.run([str(REPO / ".venv" / "bin" / "thyroid-nodule"), "calibrate", "--csv", str(csv_path), "--model", str(model),
                          "--method", "temperature"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    t = fit_temperature(before, labels)
    assert report["calibration"]["temperature"] == pytest.approx(t, rel=1e-3)
    after = [NodulePredictor(model).predict(r["file"]).probabilities["malignant"] for r in rows]
    assert after == pytest.approx(scale_probabilities(before, t).tolist(), abs=2e-3)  # fp16 weights in the file
    payload = load_checkpoint(model)
    assert payload["calibration"]["val_ece_after"] <= payload["calibration"]["val_ece_before"] + 1e-9
    assert payload["calibration"]["val_ece_after"] == pytest.approx(expected_calibration_error(payload["validation"]["prob_malignant"], labels))
    assert payload["threshold"] == pytest.approx(youden_threshold(payload["validation"]["prob_malignant"], labels))
    # calibrating again does not compound the temperature
    again = subprocess.run([str(REPO / ".venv" / "bin" / "thyroid-nodule"), "calibrate", "--csv", str(csv_path), "--model", str(model),
                            "--method", "temperature"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["calibration"]["temperature"] == pytest.approx(t, rel=0.02)


def test_calibrate_command_folds_platt_scaling_into_the_weights_by_default(tmp_path, small_model):
    """``calibrate`` (Platt scaling, the default): the served probabilities become
    ``sigmoid(scale * logit(p) + shift)`` of the old ones with the fitted scale and shift, the
    threshold is Youden's on them, and calibrating again, even after a temperature, does not
    compound: it starts from the file's uncalibrated logits."""
    from thyroid_plugin.calibration import calibrate_probabilities, fit_platt

    model = tmp_path / "m.pt"
    shutil.copyfile(small_model, model)
    rows = ddti_subset(3, 6, offset=48)  # mostly malignant, as DDTI: the shift matters
    csv_path = write_csv(rows, tmp_path / "val.csv")
    uncalibrated = NodulePredictor(model)
    assert uncalibrated.info()["calibration"] is None
    before = [uncalibrated.predict(r["file"]).probabilities["malignant"] for r in rows]
    labels = [int(r["label"] == "malignant") for r in rows]
    cli = [str(REPO / ".venv" / "bin" / "thyroid-nodule"), "calibrate", "--csv", str(csv_path), "--model", str(model)]
    out = subprocess.run(cli, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)["calibration"]
    scale, shift = fit_platt(before, labels)
    assert record["method"] == "platt"
    assert record["scale"] == pytest.approx(scale, rel=1e-3) and record["shift"] == pytest.approx(shift, abs=1e-3)
    calibrated = NodulePredictor(model)
    served = calibrated.info()["calibration"]  # what /info says of the served model
    assert served["method"] == "platt" and set(served) == set(record) - {"model"}
    assert served == pytest.approx({k: v for k, v in record.items() if k not in ("model", "method")} | {"method": "platt"},
                                   abs=1e-3)
    after = [calibrated.predict(r["file"]).probabilities["malignant"] for r in rows]
    assert after == pytest.approx(calibrate_probabilities(before, scale, shift).tolist(), abs=3e-3)  # fp16 weights in the file
    payload = load_checkpoint(model)
    assert payload["threshold"] == pytest.approx(youden_threshold(payload["validation"]["prob_malignant"], labels))
    for method in ("temperature", "platt"):  # a temperature in between, then Platt again: the same answer
        again = subprocess.run(cli + ["--method", method], capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr
    record = json.loads(again.stdout)["calibration"]
    assert record["scale"] == pytest.approx(scale, rel=0.02) and record["shift"] == pytest.approx(shift, abs=0.02)
    again = [NodulePredictor(model).predict(r["file"]).probabilities["malignant"] for r in rows]
    assert again == pytest.approx(after, abs=5e-3)


SCORES = ([0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.3], [1, 1, 1, 0, 1, 0, 0])


@pytest.mark.parametrize("threshold", [None, 0.5, 0.75, 0.9])
def test_validation_metrics_follow_the_threshold_from_the_stored_predictions(threshold):
    payload = {"threshold": 0.85, "metrics": {"auc": 0.9, "loss": 0.4, "accuracy": 0.1, "threshold": 0.85},
               "validation": {"prob_malignant": SCORES[0], "label": SCORES[1]}}
    at = 0.85 if threshold is None else threshold
    metrics = validation_metrics(payload, threshold)
    assert {k: metrics[k] for k in ("auc", "accuracy", "sensitivity", "specificity", "f1", "balanced_accuracy", "threshold")} == \
        pytest.approx(sklearn_metrics(*SCORES, at))
    assert metrics["loss"] == 0.4  # threshold-free figures are kept


def test_validation_metrics_of_a_file_without_stored_predictions():
    # files written before the predictions were stored have their figures at 0.5
    legacy = {"threshold": 0.879, "metrics": {"auc": 0.9, "loss": 0.3, "accuracy": 0.85, "sensitivity": 0.97,
                                              "specificity": 0.18, "f1": 0.92, "balanced_accuracy": 0.57}}
    assert validation_metrics(legacy) == {"auc": 0.9, "loss": 0.3, "threshold": 0.879}  # not shown at the wrong threshold
    assert validation_metrics(legacy, 0.5) == {**legacy["metrics"], "threshold": 0.5}
    damaged = {**legacy, "validation": {"prob_malignant": [0.2, "x"], "label": [0]}}
    assert validation_metrics(damaged) == {"auc": 0.9, "loss": 0.3, "threshold": 0.879}



def test_a_trained_model_calibrates_on_the_validation_predictions_it_keeps(tmp_path, small_model):
    """What a retrain does before it publishes (server and ``thyroid-nodule train``): Platt
    scaling fitted on the best epoch's validation predictions that the file keeps, folded into
    the weights; the threshold follows (the same cut between the same cases). A file whose kept
    predictions hold one class is left byte for byte as it was."""
    from thyroid_plugin.calibration import (calibrate_on_kept_validation, calibrate_probabilities,
                                            expected_calibration_error, fit_platt)
    from thyroid_plugin.checkpoint import apply_operating_point, write_payload

    model = tmp_path / "m.pt"
    rng = np.random.default_rng(0)
    # a class-balanced network on a site where 5 in 6 nodules are malignant: answers near 0.5
    labels = [1] * 25 + [0] * 5
    probs = [float(np.clip(0.5 + 0.08 * (y - 0.5) + rng.normal(0, 0.08), 0.05, 0.95)) for y in labels]
    payload = load_checkpoint(small_model)
    payload.pop("calibration", None)
    write_payload(model, apply_operating_point(payload, 0.5, (probs, labels)))
    frame = ddti_subset(1, 0)[0]["file"]
    before = NodulePredictor(model).predict(frame).probabilities["malignant"]

    record = calibrate_on_kept_validation(str(model))
    scale, shift = fit_platt(probs, labels)
    assert record["method"] == "platt" and record["n"] == 30
    assert record["scale"] == pytest.approx(scale, rel=1e-3) and record["shift"] == pytest.approx(shift, abs=1e-3)
    assert record["val_ece_before"] == pytest.approx(expected_calibration_error(probs, labels))
    assert record["val_ece_after"] < record["val_ece_before"]
    stored = load_checkpoint(model)
    calibrated = calibrate_probabilities(probs, scale, shift)
    assert stored["validation"]["prob_malignant"] == pytest.approx(calibrated.tolist(), abs=1e-6)
    assert stored["threshold"] == pytest.approx(youden_threshold(calibrated.tolist(), labels))
    assert validation_metrics(stored)["auc"] == pytest.approx(validation_metrics(payload)["auc"])  # ranking kept
    served = NodulePredictor(model)
    assert served.info()["calibration"]["method"] == "platt"
    after = served.predict(frame).probabilities["malignant"]
    assert after == pytest.approx(float(calibrate_probabilities([before], scale, shift)[0]), abs=3e-3)  # fp16 weights

    # nothing to calibrate against: the file stays as it was
    one_class = tmp_path / "one_class.pt"
    write_payload(one_class, apply_operating_point(load_checkpoint(small_model), 0.5, (probs[:25], labels[:25])))
    content = one_class.read_bytes()
    assert calibrate_on_kept_validation(str(one_class)) is None
    assert one_class.read_bytes() == content
    with pytest.raises(ValueError, match="unknown calibration method"):
        calibrate_on_kept_validation(str(one_class), "isotonic")
