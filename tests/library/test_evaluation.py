"""Grad-CAM of the compared variants without a saliency network, and the evaluation of a split."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from thyroid_plugin.evaluation import build_variant, evaluate_split, grad_cam
from thyroid_plugin.metrics import binary_metrics
from thyroid_plugin.networks import ClassifierOutput


class TwoLayerClassifier(nn.Module):
    """A convolution, global pooling and a linear head: small enough to compute Grad-CAM by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> ClassifierOutput:
        logits = self.head(F.relu(self.features(x)).mean(dim=(2, 3)))
        return ClassifierOutput(logits, None, logits, None)


def _hand_grad_cam(network: TwoLayerClassifier, x: torch.Tensor) -> torch.Tensor:
    """Grad-CAM by its definition, one image at a time, for the image's predicted class."""
    maps = []
    for image in x:
        activation = network.features(image[None])
        activation.retain_grad()
        logits = network.head(F.relu(activation).mean(dim=(2, 3)))
        logits[0, logits.argmax()].backward()
        cam = F.relu((activation.grad.mean(dim=(2, 3), keepdim=True) * activation).sum(1, keepdim=True)).detach()
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
        maps.append(cam / cam.max().clamp_min(1e-12))
    return torch.cat(maps)


def test_grad_cam_explains_each_images_own_class_in_a_mixed_batch():
    torch.manual_seed(0)
    network = TwoLayerClassifier().eval()
    with torch.no_grad():  # channel 0 sees bright images, channel 1 dark ones; class 1 = channel 0 wins
        network.features.weight[0].fill_(1.0 / 27)
        network.features.weight[1].fill_(-1.0 / 27)
        network.features.bias.zero_()
        network.head.weight.copy_(torch.tensor([[0.0, 1.0, 0.5, 0.5], [1.0, 0.0, 0.5, 0.5]]))
        network.head.bias.zero_()
    x = torch.randn(16, 3, 8, 8) + torch.linspace(-1.0, 1.0, 16).view(16, 1, 1, 1)
    with torch.no_grad():
        classes = network(x).logits.argmax(1)
    assert 0 < int(classes.sum()) < len(x), "the batch must mix both predicted classes"
    maps = grad_cam(network, network.features)(x)
    assert maps.shape == (16, 1, 8, 8) and not maps.requires_grad
    torch.testing.assert_close(maps, _hand_grad_cam(network, x), atol=1e-5, rtol=1e-4)
    assert float(maps.amin()) >= 0.0 and all(float(m.amax()) in (0.0, pytest.approx(1.0)) for m in maps)


@pytest.mark.parametrize("variant", ["single_branch", "full_ce_only"])
def test_evaluate_split_scores_the_saliency_of_each_image(tmp_path, variant):
    from PIL import Image
    import numpy as np

    torch.manual_seed(0)
    network = build_variant(variant)
    items, tensors = [], {}
    for k in range(5):
        frame = (np.random.default_rng(k).random((40, 48)) * 255).astype(np.uint8)
        mask = np.zeros((40, 48), np.uint8)
        mask[10:30, 12:36] = 255
        Image.fromarray(frame).save(tmp_path / f"f{k}.png")
        Image.fromarray(mask).save(tmp_path / f"m{k}.png")
        items.append({"image": str(tmp_path / f"f{k}.png"), "mask": str(tmp_path / f"m{k}.png"), "label": k % 2})
        tensors[items[-1]["image"]] = torch.rand(3, 32, 32)
    result = evaluate_split(network, variant, items, lambda d: tensors[d["image"]], batch_size=2, keep_maps=[items[0]["image"]])
    network.eval()
    with torch.no_grad():
        expected = torch.softmax(network(torch.stack(list(tensors.values()))).logits, 1)[:, 1]
    probs = [r["prob_malignant"] for r in result["records"]]
    assert probs == pytest.approx(expected.tolist(), abs=1e-5)
    summary = result["summary"]
    assert summary["auc"] == pytest.approx(binary_metrics(probs, [d["label"] for d in items])["auc"])
    assert summary["saliency_source"] == ("Grad-CAM" if variant == "single_branch" else "saliency network")
    assert all(0.0 <= r["energy_in_mask"] <= 1.0 and r["pointing_game"] in (0.0, 1.0) for r in result["records"])
    assert not math.isnan(summary["iou"])
    assert list(result["maps"]) == [items[0]["image"]] and result["maps"][items[0]["image"]].shape == (40, 48)
