"""``thyroid-nodule`` end to end as a user runs it (real subprocesses, real DDTI frames), and
``python -m monai.bundle run`` on the same config.

The slow commands run concurrently in one module fixture to keep the suite short.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
import slicer
from PIL import Image
from sklearn.metrics import roc_auc_score

from thyroid_plugin.checkpoint import load_checkpoint, model_identity
from thyroid_plugin.batch_files import predict_files
from thyroid_plugin.inference import NodulePredictor
from thyroid_plugin.io import image_id, load_image
from thyroid_plugin.metrics import METRIC_NAMES, OPERATING_POINT_METRICS
from tests.support.paths import DDTI, PYTHON, REPO, ddti_subset, write_csv

from .helpers import slicer_write

CLI = str(REPO / ".venv" / "bin" / "thyroid-nodule")
CONFIGS = REPO / "configs"
LOCALISER = REPO / "apps" / "thyroid_nodule" / "model" / "pretrained_nodule_localiser.pt"


@dataclass
class Finished:
    rc: int
    stdout: str
    stderr: str


class Proc:
    """A command started now and collected later (output to files: no pipe can fill up)."""

    def __init__(self, args: list[str], cwd: Path, name: str) -> None:
        self.out = cwd / f"{name}.stdout"
        self.err = cwd / f"{name}.stderr"
        # several commands share the CPU: one compute thread each avoids oversubscription
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with open(self.out, "wb") as o, open(self.err, "wb") as e:
            self.p = subprocess.Popen(args, cwd=cwd, stdout=o, stderr=e, stdin=subprocess.DEVNULL, env=env)

    def result(self, timeout: float = 600) -> Finished:
        try:
            rc = self.p.wait(timeout=timeout)
        finally:
            self.stop()
        return Finished(rc, self.out.read_text(), self.err.read_text())

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def _ok(r: Finished, what: str) -> Finished:
    assert r.rc == 0, f"{what} failed ({r.rc}): {r.stderr[-3000:]}"
    return r


def _strict_json(line: str):
    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    return json.loads(line, parse_constant=refuse)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    write_csv(ddti_subset(3, 3, offset=5), d / "train.csv")
    write_csv(ddti_subset(3, 3, offset=12), d / "test.csv")
    return d


# ------------------------------------------------------------------------------- real commands
@pytest.fixture(scope="module")
def runs(work, request) -> dict:
    """Train with the CLI and with MONAI's bundle runner, evaluate and predict with a small real model."""
    procs = {
        "train": Proc([CLI, "train", "--csv", str(work / "train.csv"), "--out", str(work / "train"), "--epochs", "1",
                       "--image-size", "64", "--val-fraction", "0.5", "--seed", "0"], work, "train"),
        "bundle": Proc([str(PYTHON), "-m", "monai.bundle", "run", "--config_file", str(CONFIGS / "train.json"),
                        "--meta_file", str(CONFIGS / "metadata.json"), "--dataset", str(work / "train.csv"),
                        "--output_dir", str(work / "bundle"), "--image_size", "64", "--training#epochs", "1",
                        "--val_fraction", "0.5"], work, "bundle"),
    }
    try:
        model = request.getfixturevalue("small_model")  # trained here while the two trainings run
        frame = ddti_subset(0, 1, offset=20)[0]["file"]
        gray = np.array(Image.open(frame).convert("L"))
        slicer_write(slicer.vtkMRMLScalarVolumeNode(), gray[None, :, :250], work / "frame.nrrd")  # a Slicer NRRD frame
        procs["evaluate"] = Proc([CLI, "evaluate", "--csv", str(work / "test.csv"), "--model", str(model), "--out",
                                  str(work / "evaluate"), "--overlays", "1"], work, "evaluate")
        procs["predict"] = Proc([CLI, "predict", frame, str(work / "frame.nrrd"), "--model", str(model), "--out",
                                 str(work / "predict")], work, "predict")
        procs["predict_localised"] = Proc([CLI, "predict", frame, "--model", str(model), "--out", str(work / "localised"),
                                           "--localiser", str(LOCALISER)], work, "predict_localised")
        results = {name: p.result() for name, p in procs.items()}
    finally:
        for p in procs.values():
            p.stop()
    return {"results": results, "model": model, "frame": frame, "work": work}


@pytest.mark.slow
def test_train_command(runs):
    work = runs["work"]
    r = _ok(runs["results"]["train"], "thyroid-nodule train")
    summary = _strict_json(r.stdout.strip().splitlines()[-1])
    assert Path(summary["model"]) == work / "train" / "model.pt"
    assert set(summary["metrics"]) == set(OPERATING_POINT_METRICS)
    payload = load_checkpoint(work / "train" / "model.pt")
    assert payload["image_size"] == 64 and payload["train"]["settings"]["epochs"] == 1
    metrics = json.loads((work / "train" / "metrics.json").read_text())
    assert set(metrics) == set(OPERATING_POINT_METRICS)
    stats = json.loads((work / "train" / "train_stats.json").read_text())
    assert stats["status"] == "done" and stats["train_size"] + stats["val_size"] == 6
    # configs/train.json's recipe: every frame of the CSV has an expert mask, so every one was cut around its lesion
    assert payload["train"]["recipe"]["val_margin"] == 0.25
    assert payload["train"]["boxes"] == {"train": {"mask": stats["train_size"], "roi": 0, "none": 0},
                                         "val": {"mask": stats["val_size"], "roi": 0, "none": 0}}
    # calibrated (configs/train.json: Platt) on its validation frames; the figures are at the calibrated threshold
    assert summary["calibration"]["method"] == "platt" and summary["calibration"]["n"] == stats["val_size"]
    assert payload["calibration"]["scale"] == pytest.approx(summary["calibration"]["scale"])
    assert summary["metrics"]["threshold"] == pytest.approx(payload["threshold"], abs=1e-4)
    assert metrics["threshold"] == pytest.approx(payload["threshold"])
    assert stats["metrics"] == metrics and stats["calibration"]["scale"] == payload["calibration"]["scale"]


@pytest.mark.slow
def test_bundle_run_trains_the_same_model_as_the_cli(runs):
    work = runs["work"]
    _ok(runs["results"]["bundle"], "monai.bundle run")
    _ok(runs["results"]["train"], "thyroid-nodule train")
    bundle, cli = load_checkpoint(work / "bundle" / "model.pt"), load_checkpoint(work / "train" / "model.pt")
    assert bundle["network_def"] == cli["network_def"]
    assert bundle["image_size"] == cli["image_size"] == 64
    assert {k: (v.shape, v.dtype) for k, v in bundle["state_dict"].items()} == {k: (v.shape, v.dtype) for k, v in cli["state_dict"].items()}
    # same data, same split, same loss and training settings
    for key in ("dataset", "val_fraction", "seed", "train_size", "val_size", "loss_form", "settings", "recipe", "boxes"):
        assert bundle["train"][key] == cli["train"][key], key
    assert set(json.loads((work / "bundle" / "metrics.json").read_text())) == set(OPERATING_POINT_METRICS)


def test_inference_and_train_configs_build_the_same_network():
    train = json.loads((CONFIGS / "train.json").read_text())
    inference = json.loads((CONFIGS / "inference.json").read_text())
    # training seeds the run before it builds the network; the network itself is the same
    assert inference["network_def"] == {k: v for k, v in train["network_def"].items() if k != "_requires_"}
    assert inference["image_size"] == train["image_size"]


def test_the_servers_retraining_keeps_the_shipped_models_input_size_and_recipe():
    """The server retrains the served model with configs/train.json: at the shipped model's input
    size and with the recipe it was trained with (crops around the box, whole frames, ultrasound
    augmentation), not on inputs it never saw."""
    train = json.loads((CONFIGS / "train.json").read_text())
    shipped = load_checkpoint(CONFIGS.parent / "apps" / "thyroid_nodule" / "model" / "pretrained_classify_nodule.pt")
    assert train["image_size"] == shipped["image_size"]
    assert train["recipe"]["crops"] == shipped["recipe"]["settings"]["crops"]
    assert train["recipe"]["us_augmentation"] == shipped["recipe"]["settings"]["us_augmentation"]
    assert train["recipe"]["val_margin"] == shipped["recipe"]["settings"]["val_margin"]


@pytest.mark.slow
def test_evaluate_command(runs):
    work = runs["work"]
    r = _ok(runs["results"]["evaluate"], "thyroid-nodule evaluate")
    out = work / "evaluate"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(METRIC_NAMES) <= set(metrics)
    assert metrics["n"] == 6 and metrics["model"] == model_identity(runs["model"])
    assert _strict_json(r.stdout.strip().splitlines()[-1])["n"] == 6
    predictions = json.loads((out / "predictions.json").read_text())
    assert len(predictions) == 6
    assert all(p["roi"] is None and p["roi_source"] is None for p in predictions)  # no roi, no localiser: whole frames
    labels = [p["label"] for p in predictions]
    probs = [p["prob_malignant"] for p in predictions]
    assert metrics["auc"] == pytest.approx(roc_auc_score(labels, probs), abs=1e-4)
    assert metrics["threshold"] == load_checkpoint(runs["model"])["threshold"]  # the model's operating point
    called = [p >= metrics["threshold"] for p in probs]
    assert metrics["accuracy"] == pytest.approx(np.mean([c == bool(y) for c, y in zip(called, labels)]))
    for name in ("roc.png", "confusion.png"):
        with Image.open(out / name) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200
    n_correct = sum(c == bool(y) for c, y in zip(called, labels))
    overlays = sorted(p.name for p in (out / "overlays").glob("*.png"))
    assert len([o for o in overlays if o.startswith("correct_")]) == min(1, n_correct)
    assert len([o for o in overlays if o.startswith("wrong_")]) == min(1, 6 - n_correct)
    for o in overlays:
        with Image.open(out / "overlays" / o) as im:
            assert im.format == "PNG"


@pytest.mark.slow
def test_predict_command_boxes_the_frame_with_a_localiser(runs):
    r = _ok(runs["results"]["predict_localised"], "thyroid-nodule predict --localiser")
    line = _strict_json(r.stdout.strip().splitlines()[-1])
    assert line["roi_source"] == "localiser" and len(line["roi"]) == 4
    kept = json.loads((runs["work"] / "localised" / f"{Path(runs['frame']).stem}.json").read_text())
    assert kept["roi"] == line["roi"] and kept["warnings"][0].startswith("no nodule box was given, so the nodule localiser")


@pytest.mark.slow
def test_predict_command(runs):
    work = runs["work"]
    r = _ok(runs["results"]["predict"], "thyroid-nodule predict")
    lines = [_strict_json(line) for line in r.stdout.strip().splitlines()]
    assert len(lines) == 2
    out = work / "predict"
    stem = Path(runs["frame"]).stem
    png = json.loads((out / f"{stem}.json").read_text())
    assert png["label"] in ("benign", "malignant")
    assert sum(png["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    with Image.open(png["mask"]) as m, Image.open(runs["frame"]) as src:
        assert m.format == "PNG" and m.size == src.size

    vol = json.loads((out / "frame.json").read_text())
    assert vol["mask"].endswith("frame_saliency.nrrd")
    data, header = nrrd.read(vol["mask"])
    source = nrrd.read_header(str(work / "frame.nrrd"))
    assert list(header["sizes"]) == list(source["sizes"]) == [250, 300, 1]
    np.testing.assert_allclose(header["space directions"], source["space directions"])
    np.testing.assert_allclose(header["space origin"], source["space origin"])
    assert header["space"] == source["space"]
    assert data.dtype == np.uint8 and data.max() > 0
    mask_image, frame_image = load_image(vol["mask"]), load_image(work / "frame.nrrd")
    np.testing.assert_allclose(mask_image.affine, frame_image.affine)


def test_predict_files_writes_json_and_mask_in_the_input_format(small_model, tmp_path):
    """One JSON and one mask per input, named by the input's image id (``.nii.gz`` whole)."""
    frames = [r["file"] for r in ddti_subset(2, 0, offset=10)]
    gray = np.asarray(Image.open(frames[1]).convert("L"))
    nifti = tmp_path / "in" / "case.2.nii.gz"
    nifti.parent.mkdir()
    nib.save(nib.Nifti1Image(gray.T, np.diag([-0.1, -0.1, 1.0, 1.0])), nifti)
    predictor = NodulePredictor(small_model, device="cpu")
    files, rois = [frames[0], str(nifti)], [None, [10, 10, 200, 200]]
    results = predict_files(predictor, files, tmp_path / "out", rois=rois)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [f"{Path(frames[0]).stem}.json", f"{Path(frames[0]).stem}_saliency.png", "case.2.json", "case.2_saliency.nii.gz"])
    for src, roi, r in zip(files, rois, results):
        record = json.loads((tmp_path / "out" / f"{image_id(src)}.json").read_text())
        assert record == r
        assert record["image"] == src and record["label"] in ("benign", "malignant")
        assert sum(record["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        want = predictor.predict(src, roi).probabilities["malignant"]
        assert record["probabilities"]["malignant"] == pytest.approx(want, abs=1e-6)
    with Image.open(results[0]["mask"]) as m, Image.open(frames[0]) as f:
        assert m.format == "PNG" and m.size == f.size and m.mode == "L"
    mask = load_image(results[1]["mask"])
    assert mask.format == "nifti" and mask.shape == gray.shape
    np.testing.assert_allclose(mask.affine, load_image(nifti).affine)
    assert mask.array[200:, :].max() == 0 and mask.array[:, 200:].max() == 0  # zero outside the box
    assert results[1]["roi"] == [10, 10, 200, 200] and results[0]["roi"] is None


def test_bundle_inference_config_runs_predict_files(small_model, tmp_path):
    """``configs/inference.json``'s ``run`` (what ``python -m monai.bundle run`` evaluates) writes
    the same files as ``thyroid-nodule predict``."""
    from thyroid_plugin.config import load_config

    frame = ddti_subset(1, 0, offset=3)[0]["file"]
    parser = load_config("inference", {"model_path": str(small_model), "device": "$torch.device('cpu')",
                                       "inference#compile": "off", "input_files": [frame], "output_dir": str(tmp_path)})
    parser["predictor"]["network_def"] = None  # the small test model is not the served network
    [record] = parser.get_parsed_content("run")
    assert record == json.loads((tmp_path / f"{image_id(frame)}.json").read_text())
    assert record["mask"] == str(tmp_path / f"{image_id(frame)}_saliency.png") and Path(record["mask"]).is_file()


# ------------------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def failures(work, small_model) -> dict:
    """The three kinds of bad input a user meets, run concurrently."""
    (work / "notes.png").write_text("file,label\nnot an image\n")
    frame = ddti_subset(1, 0)[0]["file"]
    commands = {
        "missing-csv": [CLI, "train", "--csv", str(work / "missing.csv"), "--out", str(work / "x1"), "--epochs", "1"],
        "non-image": [CLI, "predict", str(work / "notes.png"), "--model", str(small_model), "--out", str(work / "x2")],
        "missing-model": [CLI, "predict", frame, "--model", str(work / "missing.pt"), "--out", str(work / "x3")],
    }
    procs = {name: Proc(cmd, work, name) for name, cmd in commands.items()}
    return {name: p.result() for name, p in procs.items()}


@pytest.mark.parametrize(
    "case, message",
    [("missing-csv", "CSV not found"), ("non-image", "not a supported image"), ("missing-model", "model file not found")],
)
def test_bad_input_exits_1_with_one_line_on_stderr(failures, case, message):
    r = failures[case]
    lines = r.stderr.strip().splitlines()
    assert r.rc == 1, r.stderr[-2000:]
    assert len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith("thyroid-nodule ") and message in lines[0]
    assert r.stdout == ""


@pytest.mark.parametrize(
    "argv, message",
    [
        (["evaluate", "--csv", "{work}/missing.csv", "--model", "{model}", "--out", "{work}/x4"], "CSV not found"),
        (["predict", "{frame}", "--model", "{work}/bad_model.pt", "--out", "{work}/x5"], "not a readable model file"),
        (["predict", "{frame}", "--model", "{model}", "--out", "{work}/x6", "--roi", "400", "400", "500", "500"], "roi"),
        (["split", "--csv", "{work}/bad.csv", "--out", "{work}/x7"], "label column"),
        (["protocol", "--protocol", "gpu", "--datasets", "ddti,thyroid", "--out", "{work}/x8"], "unknown datasets ['thyroid']"),
        (["protocol", "--protocol", "compact", "--datasets", "busbra_cross", "--splits", "logiq9_to_others", "--out",
          "{work}/x9"], "unknown splits ['logiq9_to_others']"),
    ],
    ids=["evaluate-missing-csv", "damaged-model", "roi-outside", "csv-without-labels", "protocol-unknown-dataset",
         "protocol-unknown-split"],
)
def test_more_bad_input_in_process(work, small_model, capsys, argv, message):
    from thyroid_plugin import cli

    (work / "bad_model.pt").write_text("not a model\n")
    (work / "bad.csv").write_text("file\na.png\n")
    values = {"work": str(work), "model": str(small_model), "frame": ddti_subset(1, 0)[0]["file"]}
    assert cli.main([a.format(**values) for a in argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_usage_errors_exit_2():
    r = subprocess.run([CLI, "predict"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2


# ------------------------------------------------------------------------------------ split
@pytest.mark.parametrize("seed", [0, 4])
def test_split_command_never_puts_a_case_on_both_sides(tmp_path, seed):
    r = subprocess.run([CLI, "split", "--csv", str(DDTI / "labels.csv"), "--out", str(tmp_path), "--test-fraction", "0.25",
                        "--seed", str(seed)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    summary = _strict_json(r.stdout.strip().splitlines()[-1])

    def read(name):
        with open(tmp_path / name, newline="") as fp:
            return list(csv.DictReader(fp))

    train, test = read("train.csv"), read("test.csv")
    assert {r["case"] for r in train}.isdisjoint({r["case"] for r in test})
    assert (summary["train"], summary["test"]) == (len(train), len(test))
    with open(DDTI / "labels.csv", newline="") as fp:
        everything = list(csv.DictReader(fp))
    resolved = sorted(os.path.normpath(tmp_path / r["file"]) for r in train + test)
    assert resolved == sorted(str(DDTI / r["file"]) for r in everything)
    assert {r["label"] for r in test} == {"benign", "malignant"}
    assert 0.2 < len({r["case"] for r in test}) / len({r["case"] for r in everything}) < 0.3


# ------------------------------------------------------------------------- CLI output details
def test_train_summary_is_valid_json_when_a_metric_is_undefined(monkeypatch, capsys, tmp_path):
    """A one-class validation split leaves AUC undefined; stdout must still be JSON (null, not NaN)."""
    import thyroid_plugin.config as config
    from thyroid_plugin import cli

    class FakeParser:
        def get_parsed_content(self, key):
            assert key == "run"
            return {"best_metric_epoch": 1, "metrics": {"auc": float("nan"), "accuracy": 1.0}}

    monkeypatch.setattr(config, "load_config", lambda *a, **k: FakeParser())
    assert cli.main(["train", "--csv", str(tmp_path / "x.csv"), "--out", str(tmp_path / "out")]) == 0
    summary = _strict_json(capsys.readouterr().out.strip())
    assert summary["metrics"] == {"auc": None, "accuracy": 1.0}
