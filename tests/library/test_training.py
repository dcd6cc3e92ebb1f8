"""A short real training run on real DDTI frames: the loss goes down, the model file works,
and a run resumes from its checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from thyroid_plugin.checkpoint import load_checkpoint
from thyroid_plugin.data import datalist_from_csv
from thyroid_plugin.engine import fit
from thyroid_plugin.inference import NodulePredictor
from thyroid_plugin.losses import SaliencyGuidedLoss
from thyroid_plugin.metrics import OPERATING_POINT_METRICS
from thyroid_plugin.networks import SaliencyGuidedClassifier
from tests.support.metrics import sklearn_metrics
from tests.support.paths import ddti_subset, write_csv

pytestmark = pytest.mark.slow

# fp32 validation, so that the stored validation predictions can be compared with fp32 inference
SETTINGS = {"batch_size": 4, "image_size": 64, "progress": False, "tensorboard": False, "log_every": 0, "seed": 0, "amp": "off"}


def _train(out, items, epochs, resume=False):
    train = [d for n, d in enumerate(items) if n % 4 != 3]  # 12 frames
    val = [d for n, d in enumerate(items) if n % 4 == 3]  # 4 frames, both classes
    torch.manual_seed(0)
    network = SaliencyGuidedClassifier()
    loss = SaliencyGuidedLoss("wellposed", class_weights="balanced")
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-4)
    return fit(network, loss, optimizer, train, val, out, {**SETTINGS, "epochs": epochs}, device="cpu", resume=resume)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    items = datalist_from_csv(write_csv(ddti_subset(8, 8, offset=30), out / "data.csv"))
    assert sorted({d["label"] for n, d in enumerate(items) if n % 4 == 3}) == [0, 1]
    stats = _train(out / "run", items, epochs=4)
    return out / "run", items, stats


def test_training_lowers_the_loss(run):
    out, _, stats = run
    history = json.loads((out / "train_stats.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    first, last = history[0]["train_loss"], history[-1]["train_loss"]
    assert last < first, f"training loss did not go down: {[h['train_loss'] for h in history]}"
    assert stats["status"] == "done"


def test_training_writes_a_loadable_model_and_metrics(run):
    out, items, stats = run
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == set(OPERATING_POINT_METRICS)
    assert all(v is None or 0.0 <= v <= 1.0 for v in metrics.values())
    payload = load_checkpoint(out / "model.pt")
    assert payload["image_size"] == 64
    assert payload["train"]["epoch"] == stats["best_metric_epoch"]
    pred = NodulePredictor(out / "model.pt", device="cpu").predict(items[0]["image"])
    assert sum(pred.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
    assert pred.saliency.shape == (300, 300)


def test_stored_and_served_metrics_are_at_the_served_threshold(run):
    out, items, stats = run
    payload = load_checkpoint(out / "model.pt")
    val = [d for n, d in enumerate(items) if n % 4 == 3]
    labels = [d["label"] for d in val]
    predictor = NodulePredictor(out / "model.pt", device="cpu")
    served = predictor.threshold
    probs = [predictor.predict(d["image"]).probabilities["malignant"] for d in val]
    # the file keeps the model's own validation predictions ...
    assert payload["validation"]["label"] == labels
    assert payload["validation"]["prob_malignant"] == pytest.approx(probs, abs=1e-4)
    # ... and every figure it stores, reports or serves is theirs at the served threshold
    expected = sklearn_metrics(payload["validation"]["prob_malignant"], labels, served)
    metrics_json = json.loads((out / "metrics.json").read_text())
    for name, shown in (("model file", payload["metrics"]), ("metrics.json", metrics_json), ("train_stats", stats["metrics"]),
                        ("served", predictor.info()["metrics"])):
        assert {k: shown[k] for k in expected} == pytest.approx(expected, abs=1e-9, nan_ok=True), name
    # a configured threshold: the served figures follow it
    other = NodulePredictor(out / "model.pt", device="cpu", threshold=0.3)
    assert {k: other.info()["metrics"][k] for k in expected} == pytest.approx(
        sklearn_metrics(payload["validation"]["prob_malignant"], labels, 0.3), abs=1e-9, nan_ok=True)


def test_resume_continues_from_the_checkpoint(run, tmp_path):
    source, items, _ = run
    out = tmp_path / "run"
    shutil.copytree(source, out)  # the shared run stays as the other tests expect it
    before = json.loads((out / "train_stats.json").read_text())
    stats = _train(out, items, epochs=5, resume=True)
    history = stats["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]  # one more epoch, not a new run of five
    assert history[:4] == before["history"]
    assert stats["epoch"] == 5 and stats["status"] == "done"
    assert json.loads((out / "train_stats.json").read_text())["history"] == history


def test_early_stopping_is_replayed_from_the_history():
    """What early stopping has counted after an epoch, from the run's history: validation
    epochs only, ignite's rule (not above the best counts), records after the checkpoint ignored."""
    from thyroid_plugin.engine import early_stopping_state

    aucs = [0.46, 0.51, 0.54, 0.41, 0.63, 0.52, 0.63, None, 0.60]
    history = [{"epoch": e, "train_loss": 1.0, **({"val_auc": a, "val_loss": 0.6} if e != 3 else {})}
               for e, a in enumerate(aucs, start=1)]
    assert early_stopping_state(history, 9, "auc") == (0.63, 4)  # 0.52, 0.63 (a tie), no AUC (-loss), 0.60
    assert early_stopping_state(history, 5, "auc") == (0.63, 0)
    assert early_stopping_state(history, 2, "auc") == (0.51, 0)
    assert early_stopping_state(history[:3], 3, "auc") == (0.51, 0)  # epoch 3 was not validated
    assert early_stopping_state([], 0, "auc") == (None, 0)
    # ignite's comparison: a NaN score is never "not above the best", so it counts as a new best
    nan_auc_and_loss = [{"epoch": 1, "val_auc": 0.6, "val_loss": 0.5}, {"epoch": 2, "val_auc": None, "val_loss": None}]
    best, counter = early_stopping_state(nan_auc_and_loss, 2, "auc")
    assert best != best and counter == 0


def _copy_of_run(run, tmp_path):
    """A copy of the module's 4-epoch run to resume, and its stats to edit."""
    out = tmp_path / "run"
    shutil.copytree(run[0], out)
    return out, json.loads((out / "train_stats.json").read_text())


def _resume_for_10_epochs(run, out, **settings):
    items = run[1]
    train = [d for n, d in enumerate(items) if n % 4 != 3]
    val = [d for n, d in enumerate(items) if n % 4 == 3]
    torch.manual_seed(0)
    network = SaliencyGuidedClassifier()
    return fit(network, SaliencyGuidedLoss("wellposed", class_weights="balanced"), torch.optim.Adam(network.parameters(), lr=1e-4),
               train, val, out, {**SETTINGS, **settings, "epochs": 10}, device="cpu", resume=True)


def test_a_resumed_run_keeps_counting_towards_early_stopping(run, tmp_path):
    """A run interrupted when its best epoch lay ``patience - 1`` validations back stops after
    its next validation without improvement, as it would have uninterrupted, instead of
    counting ``patience`` epochs afresh (the medium protocol's folds resume across sessions)."""
    out, stats = _copy_of_run(run, tmp_path)
    # the history as a run whose first epoch was unbeatable would have left it
    for record in stats["history"]:
        record["val_auc"] = 2.0 if record["epoch"] == 1 else 0.5
    stats.update(best_metric=2.0, best_metric_epoch=1)
    # and a record of an epoch 5 whose checkpoint was never written (the process died in between)
    stats["history"].append({**stats["history"][-1], "epoch": 5, "val_auc": 0.1})
    (out / "train_stats.json").write_text(json.dumps(stats))

    def resume():
        return _resume_for_10_epochs(run, out, early_stop_patience=4)

    resumed = resume()
    # epochs 2-4 counted 3 of 4; epoch 5 (trained again, its stale record dropped) is the 4th
    # validation without beating epoch 1: stop
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3, 4, 5]
    assert resumed["history"][-1]["val_auc"] != 0.1
    # a run that early stopping ended stays ended when resumed (its checkpoint is of epoch 5 of 10)
    assert [h["epoch"] for h in resume()["history"]] == [1, 2, 3, 4, 5]


def test_a_time_budget_counts_resumed_epochs_and_stops_after_the_epoch_that_spends_it(run, tmp_path):
    """A protocol sized in time (``gpu``): the budget covers the run's epochs across resumes, and
    the run ends after the epoch that uses it up, keeping its best model."""
    out, stats = _copy_of_run(run, tmp_path)
    for record in stats["history"]:
        record["time_s"] = 10.0  # epochs 1-4 took 40 s in all
    (out / "train_stats.json").write_text(json.dumps(stats))

    def resume(budget):
        return _resume_for_10_epochs(run, out, time_budget_s=budget)

    # spent already: nothing more is trained
    assert [h["epoch"] for h in resume(40.0)["history"]] == [1, 2, 3, 4]
    # 1 ms left: epoch 5 runs (a run always finishes the epoch it started), then the budget stops it
    resumed = resume(40.001)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3, 4, 5]
    assert resumed["stopped_by"] == "time budget" and resumed["status"] == "stopped early"
    assert load_checkpoint(out / "model.pt")["train"]["epoch"] == resumed["best_metric_epoch"]


def test_resuming_a_finished_run_trains_nothing_more(tmp_path):
    small = {"base_channels": 8, "num_scales": 3, "saliency_channels": [4, 8, 8, 8, 8, 8], "head_hidden": 16}
    items = datalist_from_csv(write_csv(ddti_subset(2, 2, offset=50), tmp_path / "data.csv"))

    def run(resume):
        net = SaliencyGuidedClassifier(**small)
        return fit(net, SaliencyGuidedLoss("wellposed"), torch.optim.Adam(net.parameters(), 1e-4), items[:2] + items[3:], items[2:3],
                   tmp_path / "run", {**SETTINGS, "epochs": 1, "batch_size": 2, "image_size": 32}, device="cpu", resume=resume)

    run(False)
    stats = run(True)
    assert [h["epoch"] for h in stats["history"]] == [1]


def test_training_with_loader_processes_leaves_none_behind(tmp_path):
    """Persistent loader workers end with the run that made them, not whenever the garbage
    collector reaches them: the gpu protocol's 48 runs piled up hundreds of idle workers and
    stalled minutes in their deferred shutdown (one H200 run: 5 of 42 runs in 500 s)."""
    import gc

    import psutil

    small = {"base_channels": 8, "num_scales": 3, "saliency_channels": [4, 8, 8, 8, 8, 8], "head_hidden": 16}
    items = datalist_from_csv(write_csv(ddti_subset(3, 3, offset=60), tmp_path / "data.csv"))
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    gc.disable()  # nothing but fit itself may end the workers here
    try:
        net = SaliencyGuidedClassifier(**small)
        fit(net, SaliencyGuidedLoss("wellposed"), torch.optim.Adam(net.parameters(), 1e-4), items[:4], items[4:],
            tmp_path / "run", {**SETTINGS, "epochs": 2, "batch_size": 2, "image_size": 32, "num_workers": 2}, device="cpu")
        left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        gc.enable()
    assert not left, f"{len(left)} loader processes still running after training"


def _small_run(tmp_path, items, epochs, **settings):
    small = {"base_channels": 8, "num_scales": 3, "saliency_channels": [4, 8, 8, 8, 8, 8], "head_hidden": 16}
    torch.manual_seed(0)
    net = SaliencyGuidedClassifier(**small)
    stats = fit(net, SaliencyGuidedLoss("wellposed", class_weights="balanced"), torch.optim.Adam(net.parameters(), 1e-3),
                [d for n, d in enumerate(items) if n % 4 != 3], [d for n, d in enumerate(items) if n % 4 == 3], tmp_path / "run", {**SETTINGS, "epochs": epochs, "image_size": 32, **settings},
                device="cpu", resume=True)
    return net, stats


def test_weight_averaging_serves_the_mean_of_the_epochs_and_survives_an_interruption(tmp_path, monkeypatch):
    """``average_from_epoch``: the published model is the mean of the weights after each epoch
    from that one on (not the best validation epoch's), its validation predictions are the
    averaged network's, and a process that ends between the last epoch and the average's
    publication publishes it when resumed; the per-epoch weights are removed afterwards."""
    from thyroid_plugin import engine

    items = datalist_from_csv(write_csv(ddti_subset(4, 4, offset=10), tmp_path / "data.csv"))
    kept = {}
    keep = engine._keep_epoch_weights

    def recording_keep(out, network, epoch, first):
        keep(out, network, epoch, first)
        kept[epoch] = {k: v.detach().clone() for k, v in network.state_dict().items()}

    publish = engine._publish_average
    calls = []

    def interrupted_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return publish(*args, **kwargs)

    monkeypatch.setattr(engine, "_keep_epoch_weights", recording_keep)
    monkeypatch.setattr(engine, "_publish_average", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        _small_run(tmp_path, items, epochs=3, average_from_epoch=2)
    assert (tmp_path / "run" / "epoch_weights" / "epoch_0003.pt").is_file()
    net, stats = _small_run(tmp_path, items, epochs=3, average_from_epoch=2)  # resumed: nothing to train, the average to publish
    assert sorted(kept) == [1, 2, 3] and len(calls) == 2
    assert stats["averaged_epochs"] == [2, 3] and [h["epoch"] for h in stats["history"]] == [1, 2, 3]
    assert not list((tmp_path / "run" / "epoch_weights").glob("*.pt"))
    model = load_checkpoint(tmp_path / "run" / "model.pt")
    assert model["train"]["averaged_epochs"] == [2, 3] and model["train"]["epoch"] == 3
    served = model["state_dict"]
    moved = 0
    for key, value in served.items():
        if value.is_floating_point():
            expected = (kept[2][key].double() + kept[3][key].double()) / 2
            assert torch.allclose(value.double(), expected, rtol=2e-3, atol=2e-3), key
            moved += not torch.allclose(kept[2][key], kept[3][key])
    assert moved > 0  # the two epochs' weights differ: the mean is neither of them
    # its validation record is the averaged network's (fp32 here): predicted again, the same
    from thyroid_plugin.engine import evaluate_network
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in served.items()})
    _, prob, labels = evaluate_network(net.eval(), [d for n, d in enumerate(items) if n % 4 == 3], 32, torch.device("cpu"))
    assert model["validation"]["label"] == labels.tolist()
    assert model["validation"]["prob_malignant"] == pytest.approx(prob.tolist(), abs=2e-2)


def test_weight_averaging_refuses_early_stopping_and_an_epoch_outside_the_run(tmp_path):
    items = datalist_from_csv(write_csv(ddti_subset(2, 2, offset=20), tmp_path / "data.csv"))
    with pytest.raises(ValueError, match="early_stop_patience"):
        _small_run(tmp_path, items, epochs=3, average_from_epoch=2, early_stop_patience=2)
    with pytest.raises(ValueError, match="average_from_epoch"):
        _small_run(tmp_path, items, epochs=3, average_from_epoch=4)
