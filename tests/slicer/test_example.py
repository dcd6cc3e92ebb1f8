"""The headless example runs the module's logic in a real slicer-core scene against the server and
prints the saliency node's grid next to the input volume's."""

from __future__ import annotations

import json
import subprocess
import sys
import numpy as np
import pytest
from PIL import Image

from .conftest import CONFIRMED
from .helpers import EXAMPLE, add_volume, colour_frame, save_with_slicer

pytestmark = pytest.mark.slow


def run_example(*args: str) -> dict:
    proc = subprocess.run([sys.executable, str(EXAMPLE), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def assert_same_grid(out: dict) -> None:
    volume, saliency, seg = out["input_volume"], out["saliency_volume"], out["mask_segmentation"]
    for key in ("dimensions", "origin", "spacing", "directions"):
        assert saliency[key] == volume[key], key
        np.testing.assert_allclose(np.array(seg[key], dtype=float), np.array(volume[key], dtype=float), atol=1e-6)


def test_example_on_a_png_with_roi(server):
    out = run_example(server.url, CONFIRMED[3]["file"], "--roi", "50", "60", "250", "240")

    assert out["result"]["label"] in ("benign", "malignant")
    assert out["roi_sent"] == [50, 60, 250, 240] and out["result"]["roi"] == [50, 60, 250, 240]
    assert out["warning"] == ""
    assert out["input_volume"]["class"] == "vtkMRMLScalarVolumeNode"
    assert out["input_volume"]["dimensions"] == [300, 300, 1]
    assert_same_grid(out)


def test_example_on_a_slicer_nrrd_colour_frame(server, scene, tmp_path):
    gray = np.asarray(Image.open(CONFIRMED[4]["file"]).convert("L"))
    m = np.array([[0.0, -0.2, 0.0, 10.0], [-0.25, 0.0, 0.0, 20.0], [0.0, 0.0, 1.5, -3.0], [0, 0, 0, 1]])
    volume = add_volume(scene, colour_frame(gray)[None], m, "colour")
    path = save_with_slicer(scene, volume, tmp_path / "colour.nrrd")

    out = run_example(server.url, str(path))

    assert out["input_volume"]["class"] == "vtkMRMLVectorVolumeNode"
    assert out["input_volume"]["spacing"] == pytest.approx([0.25, 0.2, 1.5])  # columns run along A/P, rows along R/L
    assert_same_grid(out)


def test_example_reports_a_server_that_is_down(tmp_path):
    from .helpers import closed_port_url

    url = closed_port_url()
    proc = subprocess.run([sys.executable, str(EXAMPLE), url, CONFIRMED[0]["file"]], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert "connection refused" in proc.stderr and "Traceback" not in proc.stderr
