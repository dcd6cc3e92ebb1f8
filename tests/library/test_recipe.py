"""The training recipe (issue 14): lesion-centred crops with a margin, ultrasound augmentation,
temperature calibration and the medium protocol at tiny scale, on real DDTI and BUS-BRA frames."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import Compose

from thyroid_plugin.calibration import (
    calibrate_probabilities,
    expected_calibration_error,
    fit_calibration,
    fit_platt,
    fit_temperature,
    fold_calibration,
    fold_temperature,
    plot_reliability,
    reliability_bins,
    scale_probabilities,
)
from thyroid_plugin.data import datalist_from_csv
from thyroid_plugin.io import load_image
from thyroid_plugin.lesion import FrameCache, LesionCropd, RandLesionCropd, box_from_saliency, lesion_box, margin_box
from thyroid_plugin.networks import SaliencyGuidedClassifier
from thyroid_plugin.recipe import box_sources, training_inputs
from thyroid_plugin.transforms import MIN_ROI_SIDE, preprocess_transforms
from thyroid_plugin.us_augment import RandScreenMarksd, RandUltrasoundShiftd

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.fixture(scope="module")
def busbra_items() -> list[dict]:
    items = datalist_from_csv(DATA / "busbra" / "labels.csv")
    return items[:6]


@pytest.fixture(scope="module")
def ddti_items() -> list[dict]:
    items = [d for d in datalist_from_csv(DATA / "ddti" / "labels.csv") if d.get("mask")]
    return items[:6]


# ---- boxes


def test_lesion_box_is_the_bounding_box_of_the_mask(busbra_items):
    d = busbra_items[0]
    mask = np.asarray(load_image(d["mask"]).array)
    x0, y0, x1, y1 = lesion_box(mask)
    m = mask > 0
    assert m[y0:y1, x0:x1].sum() == m.sum()  # every lesion pixel inside
    assert m[y0, x0:x1].any() and m[y1 - 1, x0:x1].any() and m[y0:y1, x0].any() and m[y0:y1, x1 - 1].any()  # tight
    assert lesion_box(np.zeros((10, 10), np.uint8)) is None


def test_margin_box_grows_by_the_lesion_size_and_stays_in_the_frame():
    box = (40, 30, 60, 70)  # 20 wide, 40 tall
    assert margin_box(box, 0.0, (100, 100)) == box
    assert margin_box(box, 0.25, (100, 100)) == (35, 20, 65, 80)
    assert margin_box(box, 0.5, (100, 100), shift=(0.5, 0.0)) == (40, 10, 80, 90)
    assert margin_box(box, 5.0, (100, 100)) == (0, 0, 100, 100)
    tiny = margin_box((0, 0, 2, 2), 0.0, (100, 100))
    assert tiny[2] - tiny[0] >= MIN_ROI_SIDE and tiny[3] - tiny[1] >= MIN_ROI_SIDE and min(tiny) >= 0


def test_a_crop_gives_the_numbers_the_served_path_gives_for_that_box(busbra_items):
    """Training and evaluation crops are converted and resized exactly as a served request with
    the same box (bit for bit)."""
    cache = FrameCache(48)
    served = Compose(preprocess_transforms(48))
    for d in busbra_items[:3]:
        box = margin_box(cache.box(d), 0.25, cache.frame(d).shape[:2])
        ours = cache.crop(d, box)
        theirs = torch.as_tensor(served({"image": d["image"], "roi": list(box)})["image"])
        assert ours.shape == (3, 48, 48)
        assert torch.equal(ours, theirs.float())
        assert torch.equal(cache.crop(d, None), torch.as_tensor(served({"image": d["image"], "roi": None})["image"]).float())


def test_random_crops_contain_the_lesion_and_vary_and_whole_frames_come_at_their_rate(busbra_items):
    cache = FrameCache(32)
    crop = RandLesionCropd(cache, max_margin=0.6, jitter=0.0, whole_frame_prob=0.0)
    crop.set_random_state(0)
    d = busbra_items[1]
    lesion = cache.box(d)
    boxes = {crop.sample_box(d) for _ in range(20)}
    assert len(boxes) > 10
    for x0, y0, x1, y1 in boxes:
        assert x0 <= lesion[0] and y0 <= lesion[1] and x1 >= lesion[2] and y1 >= lesion[3]
    whole = RandLesionCropd(cache, whole_frame_prob=0.3)
    whole.set_random_state(1)
    n_whole = sum(whole.sample_box(d) is None for _ in range(400))
    assert 80 <= n_whole <= 160  # 120 expected
    out = RandLesionCropd(cache, whole_frame_prob=1.0)(d)
    assert torch.equal(out["image"], cache.crop(d, None))


def test_fixed_margin_crops_are_deterministic_and_frames_without_a_mask_are_whole(ddti_items):
    cache = FrameCache(32)
    d = ddti_items[0]
    a = LesionCropd(cache, 0.25)(d)["image"]
    assert torch.equal(a, LesionCropd(cache, 0.25)(d)["image"])
    no_mask = {k: v for k, v in d.items() if k != "mask"}
    fresh = FrameCache(32)
    assert torch.equal(LesionCropd(fresh, 0.25)(no_mask)["image"], fresh.crop(no_mask, None))


def test_a_case_confirmed_with_a_box_is_trained_around_that_box(busbra_items, caplog):
    """The server's retraining (``user_boxes``): a case is cut around the ``roi`` its user
    confirmed (before a mask sent with it, which may be the model's own saliency), else around its
    mask; a case with neither, or with a box that no longer fits its frame, is a whole frame;
    without ``user_boxes`` the roi is not a lesion."""
    d = busbra_items[2]
    h, w = FrameCache(32).frame(d).shape[:2]
    roi = [10, 20, 70, 90]
    confirmed = {"image": d["image"], "label": d["label"], "roi": roi}
    cache = FrameCache(32, user_boxes=True)  # one item per frame, as in a datastore
    assert cache.box(confirmed) == tuple(roi) and cache.box_source(confirmed) == "roi"
    masked = FrameCache(32, user_boxes=True)
    assert masked.box(d) == lesion_box(np.asarray(load_image(d["mask"]).array)) and masked.box_source(d) == "mask"
    assert FrameCache(32, user_boxes=True).box({**d, "roi": roi}) == tuple(roi)
    assert FrameCache(32).box({**d, "roi": roi}) == masked.box(d)
    assert FrameCache(32).box(confirmed) is None
    outside = {"image": d["image"], "label": d["label"], "roi": [w + 10, 0, w + 50, 40]}
    fresh = FrameCache(32, user_boxes=True)
    assert fresh.box(outside) is None and fresh.box_source(outside) == "none" and "not used" in caplog.text
    assert FrameCache(32, user_boxes=True).box_source({**outside, "mask": d["mask"]}) == "mask"
    # validation at a 0 margin around the confirmed box is exactly the input the server classified
    inputs = training_inputs({"val_margin": 0.0}, 32)
    served = Compose(preprocess_transforms(32))
    assert torch.equal(Compose(inputs.val_transforms())(confirmed)["image"],
                       torch.as_tensor(served({"image": d["image"], "roi": roi})["image"]).float())
    cases = [busbra_items[3], {"image": busbra_items[4]["image"], "label": 0, "roi": roi},
             {"image": busbra_items[5]["image"], "label": 1}]
    assert box_sources(training_inputs({"val_margin": 0.25}, 32), cases) == {"mask": 1, "roi": 1, "none": 1}


@pytest.mark.parametrize("recipe, message", [
    ({"crop": {}}, "unknown recipe settings ['crop']"),
    ({"crops": {"max_margin": -1}}, "crops.max_margin must be a number in [0, 5]"),
    ({"crops": {"whole_frame_prob": "0.2"}}, "crops.whole_frame_prob must be a number"),
    ({"val_margin": True}, "val_margin must be a number"),
])
def test_a_bad_recipe_in_the_training_config_is_refused_in_one_line(recipe, message):
    assert training_inputs(None, 32) is None and training_inputs({}, 32) is None  # no recipe: whole frames
    with pytest.raises(ValueError, match=re.escape(message)):
        training_inputs(recipe, 32)


def test_the_saliency_box_surrounds_the_region_holding_most_saliency():
    s = np.zeros((32, 32))
    s[4:8, 4:8] = 0.6  # a small bright spot
    s[16:24, 10:20] = 0.9  # the nodule: more mass
    box = box_from_saliency(s, (320, 640), margin=0.0)  # frame 10x taller, 20x wider
    assert box == (200, 160, 400, 240)
    assert box_from_saliency(s, (320, 640), margin=0.25) == (150, 140, 450, 260)
    assert box_from_saliency(np.full((32, 32), 0.5), (320, 640)) is None


# ---- ultrasound augmentation


def _frame(items) -> torch.Tensor:
    return FrameCache(64).crop(items[0], None)


def test_ultrasound_shift_keeps_range_and_shape_and_is_reproducible(busbra_items):
    x = _frame(busbra_items)
    t = RandUltrasoundShiftd(prob=1.0)
    t.set_random_state(3)
    a = t({"image": x})["image"]
    t.set_random_state(3)
    b = t({"image": x})["image"]
    assert a.shape == x.shape and float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a, b)
    assert float((a - x).abs().mean()) > 0.01
    assert RandUltrasoundShiftd(prob=0.0)({"image": x})["image"].equal(x)


def test_depth_scale_keeps_the_skin_line_at_the_top(busbra_items):
    x = _frame(busbra_items)
    t = RandUltrasoundShiftd(prob=1.0)
    t.set_random_state(0)
    t.randomize()
    t._stretch = 0.8
    y = t._apply_depth_scale(x)
    assert y.shape == x.shape
    assert float(y[:, -10:].abs().max()) == 0.0  # shorter image: nothing below the last echo
    assert torch.allclose(y[:, 0], x[:, 0], atol=0.05)


def test_screen_marks_draw_bright_or_coloured_marks_and_leave_most_pixels(busbra_items):
    x = _frame(busbra_items)
    marks = RandScreenMarksd(prob=1.0)
    changed = []
    for seed in range(10):
        marks.set_random_state(seed)
        y = marks({"image": x})["image"]
        assert y.shape == x.shape and float(y.min()) >= 0.0 and float(y.max()) <= 1.0
        diff = (y - x).abs().amax(dim=0) > 0.05
        changed.append(float(diff.float().mean()))
    assert min(changed) > 0.0  # every call drew something
    assert np.median(changed) < 0.25  # marks, not a new image


# ---- calibration


def test_temperature_scaling_recovers_an_over_confident_model():
    rng = np.random.default_rng(0)
    d = rng.normal(0, 3, 4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-d / 3))).astype(int)  # true probabilities sigmoid(d / 3)
    p = 1 / (1 + np.exp(-d))  # an over-confident model: T = 3 calibrates it
    t = fit_temperature(p, y)
    assert 2.6 < t < 3.4
    before, after = expected_calibration_error(p, y), expected_calibration_error(scale_probabilities(p, t), y)
    assert before > 0.1 and after < 0.04
    order = np.argsort(p)
    assert np.all(np.diff(scale_probabilities(p, t)[order]) >= 0)  # ranking (AUC) unchanged
    assert fit_temperature([0.2, 0.9], [1, 1]) == 1.0


def test_platt_scaling_corrects_a_prior_shift_that_a_temperature_cannot():
    """A network trained class-balanced answers near 0.5 where most nodules are malignant (the
    DDTI case): the probabilities need a shift. Platt scaling finds the scale and the shift that
    generated the labels, brings the ECE down where the temperature leaves it high, and keeps
    the ranking."""
    rng = np.random.default_rng(1)
    d = rng.normal(0, 1.5, 4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-(0.8 * d + 1.6)))).astype(int)  # about 4 in 5 malignant
    p = 1 / (1 + np.exp(-d))
    scale, shift = fit_platt(p, y)
    assert scale == pytest.approx(0.8, abs=0.1) and shift == pytest.approx(1.6, abs=0.15)
    temperature = fit_temperature(p, y)
    ece_t = expected_calibration_error(scale_probabilities(p, temperature), y)
    ece_p = expected_calibration_error(calibrate_probabilities(p, scale, shift), y)
    assert ece_t > 0.1 and ece_p < 0.03
    order = np.argsort(p)
    assert np.all(np.diff(calibrate_probabilities(p, scale, shift)[order]) >= 0)
    # a separable validation set (a few cases) still gives a finite, bounded answer
    scale, shift = fit_platt([0.1, 0.2, 0.6, 0.7, 0.9], [0, 0, 1, 1, 1])
    assert 0.05 <= scale <= 20.0 and np.isfinite(shift)
    assert fit_platt([0.2, 0.9], [1, 1]) == (1.0, 0.0)
    assert fit_calibration(p, y, "temperature").shift == 0.0
    with pytest.raises(ValueError):
        fit_calibration(p, y, "isotonic")


def test_ece_matches_its_definition_on_a_small_example():
    p = [0.05, 0.15, 0.12, 0.85, 0.95, 0.55]
    y = [0, 0, 1, 1, 1, 0]
    bins = reliability_bins(p, y, 10)
    assert [b["count"] for b in bins] == [1, 2, 1, 1, 1]
    expected = (abs(0 - 0.05) + 2 * abs(0.5 - 0.135) + abs(0 - 0.55) + abs(1 - 0.85) + abs(1 - 0.95)) / 6
    assert expected_calibration_error(p, y, 10) == pytest.approx(expected)


def test_folding_the_temperature_divides_the_logits(tmp_path):
    torch.manual_seed(0)
    net = SaliencyGuidedClassifier(base_channels=8, num_scales=3, saliency_channels=[4, 4, 8, 8, 8, 8], head_hidden=16).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        before = net(x).logits
        after = fold_temperature(net, 2.5)(x).logits
    assert torch.allclose(after, before / 2.5, atol=1e-5)
    # Platt: the malignant-minus-benign logit becomes scale * d + shift (here after the 1/2.5)
    with torch.no_grad():
        platt = fold_calibration(net, 1.3, -0.7)(x).logits
    d_before, d_after = after[:, 1] - after[:, 0], platt[:, 1] - platt[:, 0]
    assert torch.allclose(d_after, 1.3 * d_before - 0.7, atol=1e-5)
    path = plot_reliability({"a": ([0.1, 0.8, 0.7, 0.3], [0, 1, 0, 1])}, str(tmp_path / "rel.png"))
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- the medium protocol at tiny scale


def _subset(src: Path, dst: Path, n: int, extra=()) -> None:
    with open(src / "labels.csv", newline="") as fp:
        rows = list(csv.DictReader(fp))
    benign = [r for r in rows if r["label"] == "benign"][: n // 2]
    malignant = [r for r in rows if r["label"] == "malignant"][: n - n // 2]
    dst.mkdir(parents=True)
    with open(dst / "labels.csv", "w", newline="") as fp:
        w = csv.DictWriter(fp, fieldnames=list(rows[0]))
        w.writeheader()
        for r in benign + malignant:
            w.writerow({**r, "file": str(src / r["file"]), "mask": str(src / r["mask"])})


@pytest.mark.slow
def test_medium_protocol_pretrains_fine_tunes_and_reports_margins_and_calibration(tmp_path):
    from thyroid_plugin.evaluation import PROTOCOLS, run_protocol

    root = tmp_path / "data"
    _subset(DATA / "ddti", root / "ddti", 40)
    _subset(DATA / "busbra", root / "busbra", 16)
    out = tmp_path / "out"
    overrides = {"image_size": 32, "epochs": 1, "pretrain_epochs": 1, "batch_size": 8}
    messages: list[str] = []
    results = run_protocol(out, "medium", ["ddti"], ["single_branch"], root, overrides, progress=messages.append)
    assert any("pre-training single_branch" in m for m in messages)
    assert (out / "pretrain" / "single_branch.pt").is_file()
    # the pre-training's validation frames are kept with its weights, and none was trained on
    import torch

    from thyroid_plugin.recipe import pretraining_split

    kept = torch.load(out / "pretrain" / "single_branch.pt", weights_only=True)["val_images"]
    train, val = pretraining_split({"val_fraction": 0.15, "seed": 0}, root)
    assert kept == [d["image"] for d in val] and not set(kept) & {d["image"] for d in train}
    runs = sorted((out / "runs" / "ddti").glob("fold*/single_branch.json"))
    assert len(runs) == 5
    test = json.loads(runs[0].read_text())["test"]
    for key in ("auc_tight", "auc_25", "auc_50", "auc_whole", "auc_saliency_box", "ece", "ece_uncalibrated", "temperature",
                "ece_temperature", "calibration_shift"):
        assert key in test
    assert test["calibration_method"] == "platt"
    first = json.loads(runs[0].read_text())
    assert first["from_pretraining"] and first["lr"] == PROTOCOLS["medium"]["lr"]  # no finetune_lr: the protocol's rate
    # the best epoch's validation predictions are kept, so calibrations can be compared later
    kept_val = json.loads(runs[0].read_text())["validation"]
    assert len(kept_val["prob_malignant"]) == len(kept_val["label"]) > 0
    # the headline's operating point is the one the product would serve: Youden's J on the
    # calibrated validation predictions, and the test's sensitivity is taken at it
    from thyroid_plugin.metrics import youden_threshold

    calibrated_val = fit_calibration(kept_val["prob_malignant"], kept_val["label"], "platt").apply(kept_val["prob_malignant"])
    assert test["threshold"] == pytest.approx(youden_threshold(calibrated_val.tolist(), kept_val["label"]))
    malignant = [r["prob_malignant"] for r in json.loads(runs[0].read_text())["records"] if r["label"] == 1]
    assert test["sensitivity"] == pytest.approx(np.mean([p >= test["threshold"] for p in malignant]))
    assert test["headline_margin"] == "25%"
    entry = results["datasets"]["ddti"]["single_branch"]
    assert "auc_whole" in entry and "ece" in entry
    assert (out / "reliability_ddti.png").is_file() and (out / "roc_ddti.png").is_file()
    assert "auc_25" in (out / "tables.md").read_text()
    # a finished run scored by an earlier rule (a temperature, a 0.5 cut, as before 2026-12-03)
    old = json.loads(runs[1].read_text())
    fresh_test = dict(old["test"])
    old["test"] = {k: v for k, v in old["test"].items() if k != "threshold"}
    old["test"].update(calibration_method="temperature", sensitivity=0.123)
    runs[1].write_text(json.dumps(old))
    # resumable: a second run trains nothing, and brings the older result to today's rule
    stamp = runs[0].stat().st_mtime_ns
    messages.clear()
    run_protocol(out, "medium", ["ddti"], ["single_branch"], root, overrides, progress=messages.append)
    assert not messages and runs[0].stat().st_mtime_ns == stamp
    rescored = json.loads(runs[1].read_text())
    assert rescored["test"] == pytest.approx(fresh_test) and "rescored" in rescored


def _device_subset(src: Path, dst: Path, per_cell: int) -> None:
    """``per_cell`` frames, of as many patients, of each label from each of the scanners of the
    cross-device splits."""
    with open(src / "labels.csv", newline="") as fp:
        rows = list(csv.DictReader(fp))
    picked = []
    for device in ("GE Logiq 7 @10-14MHz", "GE Logiq 5 @10-12MHz", "Toshiba Aplio 300 @12-14 MHz"):
        for label in ("benign", "malignant"):
            one_per_case = {r["case"]: r for r in reversed(rows) if r["device"] == device and r["label"] == label}
            picked += list(one_per_case.values())[:per_cell]
    dst.mkdir(parents=True)
    with open(dst / "labels.csv", "w", newline="") as fp:
        w = csv.DictWriter(fp, fieldnames=list(rows[0]))
        w.writeheader()
        for r in picked:
            w.writerow({**r, "file": str(src / r["file"]), "mask": str(src / r["mask"])})


@pytest.mark.slow
def test_gpu_protocol_at_tiny_scale_shares_its_time_budget_and_scores_every_split_and_variant(tmp_path):
    """The ``gpu`` protocol (sized in time for one GPU) on the CPU at 32 px: DDTI's folds from
    BUS-BRA pre-training and BUS-BRA cross-device, the paper's losses and a baseline, a training
    budget shared by training-set size that stops every run after its first epoch here, loader
    processes, and the recipe's figures for every run."""
    from thyroid_plugin.evaluation import PROTOCOLS, build_splits, run_budgets, run_protocol

    root = tmp_path / "data"
    _subset(DATA / "ddti", root / "ddti", 40)
    _device_subset(DATA / "busbra", root / "busbra", 4)  # 8 patients a scanner
    out = tmp_path / "out"
    settings = PROTOCOLS["gpu"]
    assert settings["image_size"] == 224 and settings["lr"] == 1e-4 and settings["time_budget_s"] <= 5 * 60
    datasets, variants = settings["datasets"], ["full_reference", "resnet18"]
    overrides = {"image_size": 32, "epochs": 3, "pretrain_epochs": 3, "batch_size": 8, "time_budget_s": 0.02, "num_workers": 1}
    messages: list[str] = []
    results = run_protocol(out, "gpu", datasets, variants, root, overrides, progress=messages.append)

    # the budget: every run's share in proportion to its training set, adding up to the whole
    budgets = run_budgets(build_splits(root, datasets), variants, {**settings, **overrides}, root)
    assert sum(budgets.values()) == pytest.approx(0.02)
    runs = sorted((out / "runs").glob("*/*/*.json"))
    assert len(runs) == (5 + 2) * len(variants)
    per_frame = set()
    for path in runs:
        result = json.loads(path.read_text())
        assert result["time_budget_s"] == pytest.approx(budgets[(result["dataset"], result["split"], result["variant"])])
        per_frame.add(round(result["time_budget_s"] / result["sizes"]["train"], 12))
        # a share far below one epoch: each run stops after its first epoch (of at most 3)
        assert result["epochs_run"] == 1 and result["stopped_by"] == "time budget" and result["best_epoch"] == 1
        for key in ("auc_tight", "auc_25", "auc_whole", "auc_saliency_box", "ece", "threshold"):
            assert key in result["test"]
        assert len(result["records"]) == result["sizes"]["test"] > 0
    assert len(per_frame) == 1
    for variant in variants:
        pretrained = torch.load(out / "pretrain" / f"{variant}.pt", weights_only=True)
        assert pretrained["epochs_run"] == 1 and pretrained["stopped_by"] == "time budget"
        assert pretrained["time_budget_s"] == pytest.approx(budgets[("pretrain", variant)])
    assert {"ddti", "busbra_cross"} <= set(results["datasets"])
    assert (out / "roc_busbra_cross.png").is_file() and (out / "reliability_ddti.png").is_file()


@pytest.mark.parametrize("given, expected", [({}, 6), ({"pretrain_patience": 24}, 24)])
def test_the_pretraining_has_its_own_patience_when_given(tmp_path, monkeypatch, given, expected):
    from thyroid_plugin import evaluation

    _device_subset(DATA / "busbra", tmp_path / "busbra", 4)
    seen = {}

    def train_variant(variant, settings, train, val, run_dir, *args, **kwargs):
        seen.update(patience=settings["early_stop_patience"], epochs=kwargs["epochs"])
        run_dir.mkdir(parents=True)  # as training does
        return torch.nn.Linear(1, 1), {"epoch": 1, "metrics": {}, "epochs_run": 1, "stopped_by": None}

    monkeypatch.setattr(evaluation, "train_variant", train_variant)
    settings = {**evaluation.PROTOCOLS["compact"], **given}
    evaluation.pretrained_weights(tmp_path / "out", "single_branch", settings, tmp_path, [], [], "cpu", None)
    assert seen == {"patience": expected, "epochs": 8} and settings["early_stop_patience"] == 6  # the folds keep theirs


def test_evaluation_inputs_are_kept_across_variants_when_asked(busbra_items):
    from thyroid_plugin.recipe import CropInputs

    kept, fresh = CropInputs({"image_size": 32, "cache_eval_inputs": True}), CropInputs({"image_size": 32})
    item = kept.boxed(busbra_items[:1], 0.25)[0]
    first = kept.prepare(item)
    assert kept.prepare(dict(item)) is first  # the same crop, not computed again
    assert torch.equal(first, fresh.prepare(item)) and fresh.prepare(item) is not fresh.prepare(item)
    assert not torch.equal(kept.prepare({**item, "roi": None}), first)  # another box, another input


def test_a_validation_split_of_a_few_cases_works():
    """Too few cases of each class to stratify (a small confirmed set, a tiny subset) still
    splits by case instead of failing."""
    from thyroid_plugin.data import grouped_split

    items = [{"image": f"{g}_{k}.png", "label": int(g % 2 == 0), "group": str(g)} for g in range(8) for k in range(2)]
    train, val = grouped_split(items, 0.15, seed=0)
    assert val and train and len(train) + len(val) == 16
    assert not {d["group"] for d in train} & {d["group"] for d in val}


def test_a_protocol_repeats_one_split_with_another_seed(tmp_path, monkeypatch):
    """``protocol --splits logiq5_to_others --seed 1``: only that split is trained, its validation
    frames drawn with the new seed (a repeat with other randomness), and training gets the seed."""
    from thyroid_plugin import cli, evaluation

    seen = []

    def train_variant(variant, settings, train, val, run_dir, *args, **kwargs):
        seen.append((run_dir.parent.name, settings["seed"], sorted(d["image"] for d in val)))
        raise KeyboardInterrupt  # what was asked of training is all this test needs (the CLI answers "interrupted")

    monkeypatch.setattr(evaluation, "train_variant", train_variant)
    argv = ["protocol", "--protocol", "compact", "--datasets", "busbra_cross", "--variants", "single_branch",
            "--out", str(tmp_path / "out"), "--splits", "logiq5_to_others"]
    for seed in ("0", "1"):
        assert cli.main(argv + ["--seed", seed]) != 0
    (split0, seed0, val0), (split1, seed1, val1) = seen
    assert split0 == split1 == "logiq5_to_others" and (seed0, seed1) == (0, 1)
    assert val0 != val1 and len(val0) == pytest.approx(len(val1), rel=0.1)


def test_the_fine_tuning_from_the_pretraining_takes_its_own_learning_rate(tmp_path, monkeypatch, capsys):
    """``protocol --finetune-lr 1e-4``: DDTI's folds are fine-tuned from the BUS-BRA pre-training at
    that rate while the pre-training keeps the protocol's; a rate that is not positive is refused
    in one line."""
    from thyroid_plugin import cli, evaluation

    root = tmp_path / "data"
    _subset(DATA / "ddti", root / "ddti", 40)
    _subset(DATA / "busbra", root / "busbra", 16)
    calls = []

    def train_variant(variant, settings, train, val, run_dir, train_tf, val_tf, device, start=None, **kwargs):
        calls.append({"start": start is not None, "lr": kwargs.get("lr"), "protocol_lr": settings["lr"]})
        if start is None:  # the pre-training: weights to start from
            run_dir.mkdir(parents=True)
            return evaluation.build_variant(variant), {"epoch": 1, "metrics": {}, "epochs_run": 1, "stopped_by": None}
        raise KeyboardInterrupt  # what the fine-tuning was asked is all this test needs

    monkeypatch.setattr(evaluation, "train_variant", train_variant)
    argv = ["protocol", "--protocol", "compact", "--datasets", "ddti", "--variants", "single_branch",
            "--data-root", str(root), "--out", str(tmp_path / "out")]
    assert cli.main(argv + ["--finetune-lr", "1e-4"]) != 0
    pretraining, fine_tuning = calls
    assert not pretraining["start"] and pretraining["lr"] in (None, pretraining["protocol_lr"])
    assert fine_tuning["start"] and fine_tuning["lr"] == pytest.approx(1e-4) != fine_tuning["protocol_lr"]
    # without the option the fine-tuning takes the protocol's rate (the kept pre-training is reused)
    calls.clear()
    assert cli.main(argv) != 0
    assert calls == [{"start": True, "lr": evaluation.PROTOCOLS["compact"]["lr"], "protocol_lr": evaluation.PROTOCOLS["compact"]["lr"]}]
    for bad in ("0", "-1e-4", "inf", "nan"):
        capsys.readouterr()
        assert cli.main(argv + [f"--finetune-lr={bad}"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--finetune-lr" in err[0]


def test_the_fine_tuning_can_keep_the_mean_of_its_epochs_instead_of_choosing_one(tmp_path, monkeypatch, capsys):
    """``protocol --finetune-average 4 12``: DDTI's folds are fine-tuned from the pre-training for
    12 epochs and keep the mean of the weights after epochs 4..12 (the pre-training chooses its
    epoch as before); the result records it; ranges that are not ``1 <= FROM <= EPOCHS`` are
    refused in one line."""
    from thyroid_plugin import cli, evaluation

    root = tmp_path / "data"
    _subset(DATA / "ddti", root / "ddti", 40)
    _subset(DATA / "busbra", root / "busbra", 16)
    calls = []

    def train_variant(variant, settings, train, val, run_dir, train_tf, val_tf, device, start=None, **kwargs):
        calls.append({"start": start is not None, "epochs": kwargs.get("epochs"), "average": kwargs.get("average_from_epoch", 0)})
        if start is None:
            run_dir.mkdir(parents=True)
            return evaluation.build_variant(variant), {"epoch": 1, "metrics": {}, "epochs_run": 1, "stopped_by": None}
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "train_variant", train_variant)
    argv = ["protocol", "--protocol", "compact", "--datasets", "ddti", "--variants", "single_branch",
            "--data-root", str(root), "--out", str(tmp_path / "out")]
    assert cli.main(argv + ["--finetune-average", "4", "12"]) != 0
    pretraining, fine_tuning = calls
    assert pretraining["average"] == 0 and pretraining["epochs"] == evaluation.PROTOCOLS["compact"]["pretrain_epochs"]
    assert fine_tuning == {"start": True, "epochs": 12, "average": 4}
    for bad in (["0", "12"], ["5", "4"]):
        capsys.readouterr()
        assert cli.main(argv + ["--finetune-average", *bad]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--finetune-average" in err[0]
