"""fit's model selection and early stopping on a network whose validation score cannot improve,
and the one evaluation loop (:func:`~thyroid_plugin.engine.predict`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from thyroid_plugin.data import datalist_from_csv
from thyroid_plugin.engine import evaluate_network, fit, predict
from thyroid_plugin.losses import SaliencyGuidedLoss
from thyroid_plugin.networks import SaliencyGuidedClassifier
from tests.support.metrics import sklearn_metrics
from tests.support.paths import ddti_subset, write_csv

SETTINGS = {"batch_size": 4, "image_size": 32, "progress": False, "tensorboard": False, "log_every": 0, "seed": 0, "amp": "off",
            "channels_last": False}


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    return datalist_from_csv(write_csv(ddti_subset(6, 6, offset=10), tmp_path_factory.mktemp("data") / "data.csv"))


def _frozen_network() -> SaliencyGuidedClassifier:
    """A network that training does not change (learning rate 0, batch-norm statistics fixed)."""
    torch.manual_seed(0)
    network = SaliencyGuidedClassifier()
    for m in network.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.0
    return network


@pytest.mark.parametrize("val_interval, stopped_at", [(1, 2), (2, 4)])
def test_early_stopping_counts_validations_without_improvement(tmp_path, items, val_interval, stopped_at):
    network = _frozen_network()
    optimizer = torch.optim.SGD(network.parameters(), lr=0.0)
    settings = {**SETTINGS, "epochs": 10, "early_stop_patience": 1, "val_interval": val_interval}
    stats = fit(network, SaliencyGuidedLoss("none"), optimizer, items[::2], items[1::2], tmp_path, settings, device="cpu")
    assert stats["status"] == "stopped early" and stats["epoch"] == stopped_at
    assert stats["best_metric_epoch"] == val_interval  # the first validation; equal scores are no improvement
    validated = [h["epoch"] for h in stats["history"] if "val_auc" in h]
    assert validated == list(range(val_interval, stopped_at + 1, val_interval))
    assert json.loads((tmp_path / "train_stats.json").read_text())["status"] == "stopped early"
    assert (tmp_path / "model.pt").is_file() and len(list((tmp_path / "checkpoints").glob("*.pt"))) == 1


def test_evaluate_network_is_predict_with_the_metrics(items):
    network = _frozen_network().eval()
    metrics, probs, labels = evaluate_network(network, items, 32, torch.device("cpu"), batch_size=5)
    assert probs.shape == labels.shape == (len(items),) and labels.tolist() == [int(d["label"]) for d in items]
    expected = sklearn_metrics(probs, labels, metrics["threshold"])
    assert {k: metrics[k] for k in expected} == pytest.approx(expected, nan_ok=True)
    logits = torch.log(torch.as_tensor(np.stack([1 - probs, probs], 1), dtype=torch.float64))
    assert metrics["loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, torch.as_tensor(labels))), abs=1e-5)


def test_predict_keeps_the_saliency_of_every_image():
    network = _frozen_network().eval()
    x = torch.rand(5, 3, 32, 32)
    batches = [{"image": x[:3], "label": torch.tensor([0, 1, 0])}, {"image": x[3:], "label": torch.tensor([1, 1])}]
    predictions = predict(network, batches, torch.device("cpu"), saliency=lambda images, out: torch.sigmoid(out.saliency_logits))
    with torch.no_grad():
        out = network(x)
    np.testing.assert_allclose(predictions.prob_malignant, torch.softmax(out.logits, 1)[:, 1].numpy(), atol=1e-5)
    torch.testing.assert_close(predictions.saliency, torch.sigmoid(out.saliency_logits), atol=1e-5, rtol=1e-4)
    assert predict(network, [], torch.device("cpu")).prob_malignant.shape == (0,)


def test_averaging_weights_keeps_each_tensors_dtype_and_takes_counters_from_the_last():
    from thyroid_plugin.engine import average_state_dicts

    states = [{"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16), "bn.num_batches_tracked": torch.tensor(n)} for n in (3, 9)]
    states[1]["w"] = torch.tensor([3.0, 6.0], dtype=torch.bfloat16)
    averaged = average_state_dicts(states)
    assert averaged["w"].dtype == torch.bfloat16 and averaged["w"].tolist() == [2.0, 4.0]
    assert averaged["bn.num_batches_tracked"].item() == 9
    with pytest.raises(ValueError):
        average_state_dicts([])
