"""Nodule boxes and the MONAI pipelines that feed the network."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from thyroid_plugin.errors import InvalidROIError
from thyroid_plugin.transforms import (
    CropROId,
    LoadUltrasoundd,
    eval_transforms,
    normalize_roi,
    preprocess_transforms,
    train_transforms,
)
from monai.transforms import Compose
from tests.support.paths import ddti_subset


# ---------------------------------------------------------------------------------- normalize_roi
def test_roi_none_and_empty():
    assert normalize_roi(None, (100, 200)) is None
    assert normalize_roi([], (100, 200)) is None


def test_roi_corners_in_any_order():
    assert normalize_roi([10, 20, 50, 60], (100, 200)) == (10, 20, 50, 60)
    assert normalize_roi([50, 60, 10, 20], (100, 200)) == (10, 20, 50, 60)
    assert normalize_roi([50, 20, 10, 60], (100, 200)) == (10, 20, 50, 60)


def test_roi_rounds_outward():
    assert normalize_roi([10.2, 20.7, 49.1, 59.9], (100, 200)) == (10, 20, 50, 60)


def test_roi_is_clipped_to_the_frame():
    # frame (H=100, W=200): x is clipped to [0, 200], y to [0, 100]
    assert normalize_roi([-15, -3, 250, 130], (100, 200)) == (0, 0, 200, 100)
    assert normalize_roi([190, 90, 230, 120], (100, 200)) is not None  # 10x10 left inside
    assert normalize_roi([190, 90, 230, 120], (100, 200)) == (190, 90, 200, 100)


@pytest.mark.parametrize(
    "roi",
    [
        [10, 10, 15, 40],  # 5 px wide
        [10, 10, 40, 17],  # 7 px high
        [300, 10, 400, 50],  # right of the frame
        [-50, -50, -1, -1],  # above-left of the frame
        [195, 10, 260, 50],  # only 5 px inside
    ],
)
def test_roi_too_small_or_outside(roi):
    with pytest.raises(InvalidROIError, match="at least 8x8"):
        normalize_roi(roi, (100, 200))


@pytest.mark.parametrize("roi", [[1, 2, 3], "0,0,10,10", [0, 0, "a", 10], [0, 0, float("nan"), 10], 5])
def test_roi_malformed(roi):
    with pytest.raises(InvalidROIError):
        normalize_roi(roi, (100, 200))


# ------------------------------------------------------------------------------------- CropROId
def test_crop_roi_crops_and_records_the_box():
    img = torch.arange(3 * 40 * 50, dtype=torch.float32).reshape(3, 40, 50)
    d = CropROId()({"image": img, "roi": [5, 10, 25, 30]})
    assert torch.equal(d["image"], img[:, 10:30, 5:25])
    assert d["image_meta_dict"]["roi"].tolist() == [5, 10, 25, 30]


def test_crop_roi_without_box_passes_the_image_and_records_the_full_frame():
    img = torch.rand(3, 40, 50)
    d = CropROId()({"image": img})
    assert d["image"] is img
    assert d["image_meta_dict"]["roi"].tolist() == [0, 0, 50, 40]


def test_crop_roi_refuses_a_bad_box():
    with pytest.raises(InvalidROIError):
        CropROId()({"image": torch.rand(3, 40, 50), "roi": [60, 0, 90, 30]})


# ------------------------------------------------------------------------------------ pipelines
def test_load_transform_gives_three_channels_in_unit_range(tmp_path):
    gray = np.random.default_rng(0).integers(0, 256, (33, 47), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    d = LoadUltrasoundd(keep_image=True)({"image": str(tmp_path / "g.png")})
    x = d["image"]
    assert x.shape == (3, 33, 47) and x.dtype == torch.float32
    assert torch.equal(x[0], torch.from_numpy(gray.astype(np.float32) / 255.0))
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    assert d["image_meta_dict"]["spatial_shape"].tolist() == [33, 47]
    assert d["image_meta_dict"]["format"] == "png"
    assert d["image_source"].shape == (33, 47)


@pytest.mark.parametrize("size", [32, 64, 100])
def test_eval_pipeline_on_real_ddti_frames(size):
    items = ddti_subset(1, 1)
    pipeline = eval_transforms(size)
    for item in items:
        x = pipeline({"image": item["file"]})["image"]
        assert tuple(x.shape) == (3, size, size)
        assert x.dtype == torch.float32
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert float(x.std()) > 0.01  # an image, not a blank


def test_eval_pipeline_is_deterministic_and_crops():
    path = ddti_subset(1, 0)[0]["file"]
    pipeline = eval_transforms(48)
    a = pipeline({"image": path})["image"]
    b = pipeline({"image": path})["image"]
    assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    c = pipeline({"image": path, "roi": [50, 60, 200, 210]})
    assert tuple(c["image"].shape) == (3, 48, 48)
    assert c["image_meta_dict"]["roi"].tolist() == [50, 60, 200, 210]
    assert not torch.allclose(torch.as_tensor(a), torch.as_tensor(c["image"]))


def test_train_pipeline_gives_augmented_unit_range_tensors():
    path = ddti_subset(1, 0)[0]["file"]
    pipeline = train_transforms(64, {"prob": 1.0, "gain": 0.8, "noise_std": 0.3})
    pipeline.set_random_state(0)
    outs = [torch.as_tensor(pipeline({"image": path})["image"]) for _ in range(4)]
    for x in outs:
        assert tuple(x.shape) == (3, 64, 64) and x.dtype == torch.float32
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0  # clamped after gain and noise
    assert not torch.allclose(outs[0], outs[1])  # random


def test_preprocess_list_composes():
    path = ddti_subset(0, 1)[0]["file"]
    x = Compose(preprocess_transforms(40))({"image": path, "roi": None})["image"]
    assert tuple(x.shape) == (3, 40, 40)
