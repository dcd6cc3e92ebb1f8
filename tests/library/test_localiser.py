"""The nodule localiser trained with the expert masks (issue 14, whole frames): boxes from its
probability map, geometry kept between frames and masks under augmentation, and a resumable
training on real DDTI frames."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from thyroid_plugin.data import datalist_from_csv
from thyroid_plugin.io import load_image
from thyroid_plugin.lesion import lesion_box
from thyroid_plugin.localiser import (
    FORMAT,
    LocaliserFrames,
    NoduleLocaliser,
    augment,
    box_from_probability,
    box_iou,
    mask_grid,
    train_localiser,
)

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="module")
def ddti_items() -> list[dict]:
    return [d for d in datalist_from_csv(DATA / "ddti" / "labels.csv") if d.get("mask")][:20]


def test_the_box_is_the_region_holding_most_probability_mapped_to_the_frame():
    p = np.zeros((32, 32))
    p[2:4, 2:4] = 0.9  # small, confident: 3.6
    p[10:20, 16:24] = 0.6  # large, less confident: 48
    assert box_from_probability(p, (320, 640)) == (320, 100, 480, 200)  # 10x taller, 20x wider frame
    assert box_from_probability(p, (32, 32), cut=0.7) == (2, 2, 4, 4)  # only the confident one passes
    assert box_from_probability(np.full((32, 32), 0.4), (32, 32)) is None  # nothing found: no box


def test_box_iou():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert box_iou(None, (0, 0, 10, 10)) == 0.0


def test_augmentation_moves_frames_and_masks_together():
    y = torch.zeros(8, 1, 48, 48)
    for i in range(8):
        y[i, 0, 4 + 2 * i : 20 + 2 * i, 10 + i : 30 + i] = 1.0
    x = 0.8 * y  # the lesion is the only bright thing in the frame
    ax, ay = augment(x.clone(), y.clone(), torch.Generator().manual_seed(3))
    assert ax.shape == x.shape and ay.shape == y.shape
    assert not torch.equal(ay, y)  # the geometry did change
    for i in range(8):
        inside, outside = ax[i][ay[i] > 0.9], ax[i][ay[i] < 0.05]
        assert inside.mean() > 0.3 and outside.mean() < 0.05 * inside.mean()


def test_masks_on_the_grid_keep_the_lesion_fraction(ddti_items):
    mask = np.asarray(load_image(ddti_items[0]["mask"]).array)
    grid = mask_grid(mask, 64)
    m = (mask.max(axis=-1) if mask.ndim == 3 else mask) > 0
    assert grid.shape == (1, 64, 64)
    assert float(grid.mean()) == pytest.approx(m.mean(), rel=0.05)


def test_training_writes_a_loadable_localiser_and_resumes_after_an_interruption(tmp_path, ddti_items):
    train, val = ddti_items[:14], ddti_items[14:]
    out = tmp_path / "localiser.pt"
    lines = []

    def stop_after_first(line):
        lines.append(line)
        raise KeyboardInterrupt  # as a user's Ctrl-C after the first epoch

    with pytest.raises(KeyboardInterrupt):
        train_localiser(train, val, out, image_size=32, epochs=3, patience=3, batch_size=8, progress=stop_after_first)
    assert not out.exists() and (tmp_path / "localiser.pt.ckpt").is_file()
    record = train_localiser(train, val, out, image_size=32, epochs=3, patience=3, batch_size=8, progress=lines.append)
    assert [h["epoch"] for h in record["history"]] == [1, 2, 3]  # resumed at epoch 2, not restarted
    assert len(lines) == 3 and lines[0].startswith("[localiser] epoch 1/3")
    assert not (tmp_path / "localiser.pt.ckpt").exists()
    assert record["format"] == FORMAT and record["train_frames"] == 14 and record["val_frames"] == 6
    assert record["val_box_iou"] == max(h["val_box_iou"] for h in record["history"])

    localiser = NoduleLocaliser.load(out)
    frames = [np.asarray(load_image(d["image"]).array) for d in val]
    boxes = localiser.boxes(frames)
    assert len(boxes) == len(frames)
    for box, frame in zip(boxes, frames):
        if box is not None:
            x0, y0, x1, y1 = box
            assert 0 <= x0 < x1 <= frame.shape[1] and 0 <= y0 < y1 <= frame.shape[0]
    grid = LocaliserFrames(val, 32)
    assert grid.x.shape == (6, 1, 32, 32) and grid.boxes[0] == lesion_box(load_image(val[0]["mask"]).array)


def test_a_file_that_is_not_a_localiser_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="not a nodule localiser"):
        NoduleLocaliser.load(path)


def test_the_evaluation_script_names_an_unknown_split_in_one_line(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "localiser_eval.py"), "--split", "fold9",
                          "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert run.stderr.strip() == "error: no split 'fold9'"


# ---- the served path: a frame sent without a box


SHIPPED = ROOT / "apps" / "thyroid_nodule" / "model" / "pretrained_nodule_localiser.pt"


def _blind_localiser(path: Path, bias: float) -> Path:
    """A localiser file whose map is ``sigmoid(bias)`` everywhere (the last layer zeroed)."""
    from thyroid_plugin.localiser import FEATURES, build_localiser

    network = build_localiser()
    with torch.no_grad():
        network.final_conv.weight.zero_()
        network.final_conv.bias.fill_(bias)
    torch.save({"format": FORMAT, "image_size": 32, "features": list(FEATURES), "cut": 0.5,
                "state_dict": network.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def served_frames() -> list[dict]:
    from tests.support.paths import ddti_subset

    return ddti_subset(3, 3, offset=20)


def test_without_a_box_the_server_classifies_the_box_its_localiser_draws(small_model, served_frames):
    from thyroid_plugin.checkpoint import model_identity
    from thyroid_plugin.inference import LOCALISER_NOTE, NodulePredictor
    from thyroid_plugin.lesion import margin_box

    localiser = NoduleLocaliser.load(SHIPPED)
    with_localiser = NodulePredictor(small_model, device="cpu", localiser_path=SHIPPED)
    plain = NodulePredictor(small_model, device="cpu")
    try:
        ious = []
        for row in served_frames:
            image = load_image(row["file"])
            tight = localiser.boxes([image.array])[0]
            assert tight is not None, row["file"]
            expected = list(margin_box(tight, 0.25, image.shape))
            pred = with_localiser.predict(row["file"])
            assert pred.roi == expected and pred.roi_source == "localiser"
            answer = pred.to_json()
            assert answer["roi"] == expected and answer["roi_source"] == "localiser" and answer["warnings"] == [LOCALISER_NOTE]
            # the same answer as a user's box drawn there
            same = plain.predict(row["file"], roi=expected)
            assert pred.probabilities == pytest.approx(same.probabilities, abs=1e-5)
            assert np.array_equal(pred.saliency_uint8(), same.saliency_uint8())
            ious.append(box_iou(tight, lesion_box(load_image(row["mask"]).array)))
        assert np.mean(ious) > 0.5, ious  # on the nodule, as the expert outlined it
        # a user's box wins; a batch mixes both
        user = [60, 40, 240, 230]
        mixed = with_localiser.predict_batch([served_frames[0]["file"], served_frames[1]["file"]], [user, None])
        assert (mixed[0].roi, mixed[0].roi_source) == (user, "request") and mixed[0].to_json()["warnings"] == []
        assert mixed[1].roi_source == "localiser" and "localise" in mixed[1].timings
        boxed_only = with_localiser.predict(served_frames[0]["file"], roi=user)
        assert "localise" not in boxed_only.timings and boxed_only.roi_source == "request"  # it did not run
        info = with_localiser.info()["localiser"]
        assert info["model"] == model_identity(SHIPPED) and info["margin"] == 0.25
        assert info["val_box_iou"] == localiser.record["val_box_iou"]
        assert plain.info()["localiser"] is None
    finally:
        with_localiser.close()
        plain.close()


def test_when_the_localiser_finds_nothing_the_whole_frame_is_classified_and_the_answer_says_so(tmp_path, small_model,
                                                                                              served_frames):
    from thyroid_plugin.inference import NO_BOX_WARNING, NO_NODULE_FOUND, NodulePredictor

    blind = NodulePredictor(small_model, device="cpu", localiser_path=_blind_localiser(tmp_path / "blind.pt", -10.0))
    plain = NodulePredictor(small_model, device="cpu")
    try:
        path = served_frames[0]["file"]
        pred = blind.predict(path)
        assert pred.roi is None and pred.roi_source is None
        assert pred.to_json()["warnings"] == [NO_BOX_WARNING, NO_NODULE_FOUND]
        assert pred.probabilities == pytest.approx(plain.predict(path).probabilities, abs=1e-5)
        assert plain.predict(path).to_json()["warnings"] == [NO_BOX_WARNING]  # no localiser: nothing about one
    finally:
        blind.close()
        plain.close()


@pytest.mark.parametrize("content", [b"not a model at all", None])
def test_a_damaged_or_foreign_localiser_file_is_refused_at_start(tmp_path, small_model, content):
    from thyroid_plugin.errors import InvalidModelError
    from thyroid_plugin.inference import NodulePredictor

    path = tmp_path / "localiser.pt"
    if content is None:
        path.write_bytes(small_model.read_bytes())  # a classifier, not a localiser
    else:
        path.write_bytes(content)
    with pytest.raises(InvalidModelError, match="nodule localiser"):
        NodulePredictor(small_model, device="cpu", localiser_path=path)


@pytest.mark.parametrize("margin", [-0.1, float("nan"), 5.0, "wide"])
def test_a_nonsense_localiser_margin_is_refused(small_model, margin):
    from thyroid_plugin.inference import NodulePredictor

    with pytest.raises(ValueError, match="localiser_margin"):
        NodulePredictor(small_model, device="cpu", localiser_path=SHIPPED, localiser_margin=margin)
