"""The shipped inference settings (``configs/inference.json``: bf16 where the CPU has it,
channels-last, ``compile: background``) in a real server: it answers at once with the eager
network, switches to the compiled one when it is ready, and the answers stay within the
tolerances of fp32 (class probability 0.01, saliency mean absolute difference 0.02)."""

from __future__ import annotations

import io
import shutil
import time

import numpy as np
import pytest
import requests
from PIL import Image

from thyroid_plugin.config import load_config
from thyroid_plugin.inference import NodulePredictor
from tests.support.paths import ddti_subset
from tests.support.server import MonaiLabelServer, parse_multipart

pytestmark = pytest.mark.slow


def infer(server: MonaiLabelServer, path: str) -> tuple[dict, np.ndarray]:
    with open(path, "rb") as fp:
        r = requests.post(f"{server.url}/infer/classify_nodule", params={"output": "all"},
                          files={"file": ("frame.png", fp, "image/png")}, timeout=300)
    assert r.status_code == 200, r.text
    result, image = parse_multipart(r)
    return result, np.asarray(Image.open(io.BytesIO(image)), dtype=np.float32) / 255.0


def test_shipped_settings_answer_at_once_then_serve_the_compiled_network(tmp_path, small_model):
    shipped = load_config("inference")["inference"]
    assert shipped["compile"] == "background" and shipped["precision"] == "auto"
    frames = [r["file"] for r in ddti_subset(1, 1, offset=20)]
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copyfile(small_model, model_dir / "pretrained_classify_nodule.pt")
    exact = NodulePredictor(small_model, device="cpu", precision="fp32", channels_last=False)
    with MonaiLabelServer(tmp_path / "studies", model_dir,
                          conf={"compile": shipped["compile"], "precision": shipped["precision"]}) as server:
        first, _ = infer(server, frames[0])  # answered while the network compiles
        assert first["label"] in ("benign", "malignant")
        deadline = time.time() + 900
        while True:
            model = requests.get(f"{server.url}/info/", timeout=60).json()["models"]["classify_nodule"]["model"]
            if model["compiled"] != "compiling" or time.time() > deadline:
                break
            time.sleep(2)
        assert model["compiled"] == "ready", model["compiled"]
        for path in frames:
            result, mask = infer(server, path)
            reference = exact.predict(path)
            assert abs(result["probabilities"]["malignant"] - reference.probabilities["malignant"]) <= 0.01
            assert mask.shape == reference.saliency.shape
            assert float(np.abs(mask - reference.saliency).mean()) <= 0.02
        assert abs(first["probabilities"]["malignant"]
                   - infer(server, frames[0])[0]["probabilities"]["malignant"]) <= 0.01
