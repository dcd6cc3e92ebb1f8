"""scripts/device/pack_data.py: the shared data in parts small enough for the GPU machine, read
back by the library as the same frames (within JPEG's error), labels and lesion boxes."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.support.paths import BUSBRA, DDTI, REPO, require_data
from thyroid_plugin.data import datalist_from_csv
from thyroid_plugin.io import load_image
from thyroid_plugin.lesion import lesion_box


def _pack_module():
    spec = importlib.util.spec_from_file_location("pack_data", REPO / "scripts" / "device" / "pack_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _copy(src, dst, n):
    """The first ``n`` rows of ``src/labels.csv`` (and their files, relative paths kept) into ``dst``."""
    with open(src / "labels.csv", newline="") as fp:
        rows = list(csv.DictReader(fp))[:n]
    for r in rows:
        for key in ("file", "mask"):
            (dst / r[key]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / r[key], dst / r[key])
    with open(dst / "labels.csv", "w", newline="") as fp:
        w = csv.DictWriter(fp, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    if src == BUSBRA:  # the official folds travel beside the labels
        shutil.copy(src / "5-fold-cv.csv", dst / "5-fold-cv.csv")


def test_packed_parts_hold_the_same_frames_labels_and_lesion_boxes(tmp_path, capsys):
    require_data()
    data = tmp_path / "data"
    _copy(DDTI, data / "ddti", 6)
    _copy(BUSBRA, data / "busbra", 6)
    cap_mib = 0.2
    assert _pack_module().main(["--data", str(data), "--out", str(tmp_path / "part"), "--cap-mib", str(cap_mib)]) == 0
    stats = json.loads(capsys.readouterr().out)
    parts = sorted(tmp_path.glob("part*"))
    assert len(parts) > 1  # the cap splits it
    for part in parts:
        assert sum(f.stat().st_size for f in (part / "data").rglob("*") if f.is_file()) <= cap_mib * 2**20
    assert (parts[0] / "data" / "ddti" / "labels.csv").is_file()  # DDTI comes first
    merged = tmp_path / "merged"
    for part in parts:
        shutil.copytree(part / "data", merged, dirs_exist_ok=True)
    assert (merged / "busbra" / "5-fold-cv.csv").is_file()
    for ds in ("ddti", "busbra"):
        packed, original = datalist_from_csv(merged / ds / "labels.csv"), datalist_from_csv(data / ds / "labels.csv")
        assert [d["label"] for d in packed] == [d["label"] for d in original]
        assert [d["group"] for d in packed] == [d["group"] for d in original]
        for p, o in zip(packed, original):
            a, b = load_image(p["image"]).array.astype(int), load_image(o["image"]).array.astype(int)
            assert a.shape == b.shape and np.abs(a - b).max() <= stats[ds]["max_abs_error"] <= 20
            assert lesion_box(load_image(p["mask"]).array) == lesion_box(load_image(o["mask"]).array)
        assert stats[ds]["frames"] == 6 and stats[ds]["psnr_db"] > 40


def test_a_colour_frame_is_refused_with_its_name(tmp_path):
    require_data()
    data = tmp_path / "data"
    _copy(DDTI, data / "ddti", 2)
    _copy(BUSBRA, data / "busbra", 2)
    from PIL import Image

    with open(data / "ddti" / "labels.csv", newline="") as fp:
        first = next(csv.DictReader(fp))["file"]
    Image.open(data / "ddti" / first).convert("RGB").save(data / "ddti" / first)
    with pytest.raises(SystemExit, match=re.escape(f"{Path(first).name}: expected an 8-bit gray frame")):
        _pack_module().main(["--data", str(data), "--out", str(tmp_path / "part")])
