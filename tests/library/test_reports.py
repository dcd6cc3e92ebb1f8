"""Figures (real PNG files) and the saliency-versus-lesion measures."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_curve as sk_roc_curve

from thyroid_plugin.reports import plot_confusion, plot_roc, roc_curve, saliency_vs_mask, save_overlay


@pytest.mark.parametrize("seed", range(3))
def test_roc_curve_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 40)
    labels[:2] = [0, 1]
    probs = np.round(rng.random(40), 1)  # ties
    fpr, tpr = roc_curve(probs, labels)
    sk_fpr, sk_tpr, _ = sk_roc_curve(labels, probs, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)


def test_saliency_vs_mask_hand_values():
    mask = np.zeros((4, 4), np.uint8)
    mask[:2, :2] = 1  # 4 lesion pixels
    sal = np.zeros((4, 4))
    sal[0, 0] = 0.9  # peak inside the lesion
    sal[0, 1] = 0.3
    sal[3, 3] = 0.6
    m = saliency_vs_mask(sal, mask, threshold=0.5)
    assert m["energy_in_mask"] == pytest.approx((0.9 + 0.3) / 1.8)
    assert m["pointing_game"] == 1.0
    # thresholded at 0.5: {(0,0), (3,3)}; intersection 1, union 4 + 1 = 5
    assert m["iou"] == pytest.approx(1 / 5)
    sal[3, 3] = 1.0  # the peak moves outside
    assert saliency_vs_mask(sal, mask)["pointing_game"] == 0.0
    empty = saliency_vs_mask(sal, np.zeros((4, 4)))
    assert all(math.isnan(v) for v in empty.values())
    with pytest.raises(ValueError):
        saliency_vs_mask(sal, np.zeros((3, 4)))


def _is_png(path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()
        assert im.format == "PNG"
        return im.size


def test_figures_are_png_files(tmp_path):
    probs, labels = [0.1, 0.4, 0.35, 0.8, 0.7], [0, 0, 1, 1, 1]
    assert min(_is_png(plot_roc({"a": (probs, labels), "b": (probs[::-1], labels)}, str(tmp_path / "roc.png")))) > 200
    assert min(_is_png(plot_confusion(probs, labels, str(tmp_path / "cm.png")))) > 200
    gray = np.random.default_rng(0).integers(0, 255, (60, 80)).astype(np.uint8)
    out = save_overlay(gray, np.random.default_rng(1).random((60, 80)), str(tmp_path / "sub" / "ov.png"), "t", gray > 200)
    assert min(_is_png(out)) > 200
