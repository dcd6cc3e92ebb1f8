"""Model files: round trip, fp16 storage, safe loading, refused network targets."""

from __future__ import annotations

import os
import pickle
import zipfile

import pytest
import torch

from thyroid_plugin.checkpoint import (
    build_network,
    file_checksum,
    load_checkpoint,
    model_identity,
    network_from_checkpoint,
    save_checkpoint,
)
from thyroid_plugin.constants import CHECKPOINT_FORMAT
from thyroid_plugin.errors import InvalidModelError, ModelNotFoundError
from thyroid_plugin.networks import SaliencyGuidedClassifier

SMALL = {"base_channels": 8, "num_scales": 3, "saliency_channels": [4, 8, 8, 8, 8, 8], "head_hidden": 16}


@pytest.fixture(scope="module")
def small_net() -> SaliencyGuidedClassifier:
    torch.manual_seed(0)
    net = SaliencyGuidedClassifier(**SMALL)
    # non-trivial BatchNorm statistics: run a few training-mode batches
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(2, 3, 32, 32) * 3)
    return net.eval()


def test_round_trip(tmp_path, small_net):
    path = tmp_path / "model.pt"
    identity = save_checkpoint(path, small_net, small_net.network_def(), 96, {"auc": 0.75, "f1": float("nan")},
                               {"epochs": 3, "dataset": tmp_path}, half=False)
    assert identity == model_identity(path) == f"sha256:{file_checksum(path)[:16]}"
    payload = load_checkpoint(path)
    assert payload["format"] == CHECKPOINT_FORMAT
    assert payload["image_size"] == 96
    assert payload["class_names"] == ["benign", "malignant"]
    assert payload["metrics"]["auc"] == 0.75
    assert payload["train"]["dataset"] == str(tmp_path)  # non-plain values stored as text
    assert payload["network_def"] == small_net.network_def()
    rebuilt = network_from_checkpoint(payload)
    assert not rebuilt.training
    for k, v in small_net.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v), k
    x = torch.rand(1, 3, 40, 36)
    with torch.no_grad():
        assert torch.equal(rebuilt(x).logits, small_net(x).logits)


def test_fp16_storage(tmp_path, small_net):
    full, half = tmp_path / "full.pt", tmp_path / "half.pt"
    save_checkpoint(full, small_net, small_net.network_def(), 64, half=False)
    save_checkpoint(half, small_net, small_net.network_def(), 64)  # default: fp16
    state = load_checkpoint(half)["state_dict"]
    for name, t in state.items():
        if name.endswith(("running_mean", "running_var")):
            assert t.dtype == torch.float32, name  # BatchNorm statistics keep full precision
        elif t.is_floating_point():
            assert t.dtype == torch.float16, name
        else:
            assert t.dtype == small_net.state_dict()[name].dtype
    assert os.path.getsize(half) < 0.7 * os.path.getsize(full)
    rebuilt = network_from_checkpoint(load_checkpoint(half))
    assert all(p.dtype == torch.float32 for p in rebuilt.parameters())  # back to the compute precision
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x).logits, small_net(x).logits, atol=2e-2, rtol=2e-2)


def test_saving_is_atomic_and_leaves_no_temporary_files(tmp_path, small_net):
    path = tmp_path / "model.pt"
    save_checkpoint(path, small_net, small_net.network_def(), 64)
    first = file_checksum(path)
    save_checkpoint(path, small_net, small_net.network_def(), 80)
    assert file_checksum(path) != first
    assert os.listdir(tmp_path) == ["model.pt"]


def test_missing_file(tmp_path):
    with pytest.raises(ModelNotFoundError):
        load_checkpoint(tmp_path / "absent.pt")


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", ["text", "empty", "zip", "tensor", "other-dict", "code-pickle", "code-torch", "classes"])
def test_non_checkpoints_are_refused(tmp_path, kind, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "model.pt"
    if kind == "text":
        path.write_text("this is not a model\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("readme.txt", "hello")
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "other-dict":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    elif kind == "code-pickle":
        path.write_bytes(pickle.dumps(_Payload()))
    elif kind == "code-torch":
        torch.save({"format": CHECKPOINT_FORMAT, "evil": _Payload()}, path)
    elif kind == "classes":
        torch.save({"format": CHECKPOINT_FORMAT, "class_names": ["cat", "dog"]}, path)
    with pytest.raises(InvalidModelError) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "pwned.txt").exists()  # nothing was executed


def test_incomplete_checkpoint_is_refused(tmp_path, small_net):
    # the right format tag, but no weights or no network: not a usable model file
    good = tmp_path / "model.pt"
    save_checkpoint(good, small_net, small_net.network_def(), 64)
    payload = load_checkpoint(good)
    for missing in ("network_def", "state_dict", "image_size"):
        broken = {k: v for k, v in payload.items() if k != missing}
        torch.save(broken, tmp_path / "broken.pt")
        with pytest.raises(InvalidModelError):
            load_checkpoint(tmp_path / "broken.pt")


def test_unknown_network_target_is_refused():
    with pytest.raises(InvalidModelError, match="unsupported network"):
        build_network({"_target_": "os.system", "command": "echo hi"})
    with pytest.raises(InvalidModelError, match="unsupported network"):
        build_network({"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 2})
    with pytest.raises(InvalidModelError, match="unsupported network"):
        build_network({"in_channels": 3})
    with pytest.raises(InvalidModelError, match="bad network arguments"):
        build_network({"_target_": "thyroid_plugin.networks.SaliencyGuidedClassifier", "no_such_argument": 1})
    assert isinstance(build_network({"_target_": "thyroid_plugin.networks.classifier.SaliencyGuidedClassifier", **SMALL}),
                      SaliencyGuidedClassifier)


def test_weights_that_do_not_fit_are_refused(tmp_path, small_net):
    path = tmp_path / "model.pt"
    save_checkpoint(path, small_net, small_net.network_def(), 64)
    payload = load_checkpoint(path)
    payload["network_def"] = {**payload["network_def"], "head_hidden": 32}
    with pytest.raises(InvalidModelError, match="do not fit"):
        network_from_checkpoint(payload)
