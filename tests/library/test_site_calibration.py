"""``scripts/site_calibration.py``: calibrating on a site's own confirmed patients, measured on the
site's other patients (the product's answer to calibration across scanners)."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "site_calibration.py"


def _script():
    spec = importlib.util.spec_from_file_location("site_calibration", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_calibration_and_evaluation_patients_never_overlap():
    split_by_patient = _script().split_by_patient
    groups = np.repeat(np.arange(30), 2).astype(str)  # two frames a patient
    rng = np.random.default_rng(1)
    for n in (1, 10, 29):
        cal, ev = split_by_patient(groups, n, rng)
        assert len(set(groups[cal])) == n and (cal ^ ev).all()
        assert not set(groups[cal]) & set(groups[ev])
    with pytest.raises(ValueError, match="the site has 30"):
        split_by_patient(groups, 30, rng)


def _site(rng, prefix: str, patients: int, skew: float):
    """Frames of one scanner whose network is over-confident and shifted (``skew``) there."""
    rows, records = [], []
    for k in range(patients):
        truth = rng.uniform(0.05, 0.95)
        for side in ("l", "r"):
            label = int(rng.uniform() < truth)
            logit = 4.0 * np.log(truth / (1 - truth)) + skew
            name = f"images/{prefix}_{k:03d}-{side}.png"
            rows.append({"file": name, "label": "malignant" if label else "benign", "case": f"{prefix}{k}", "device": prefix})
            records.append({"image": name, "label": label, "prob_uncalibrated": float(1 / (1 + np.exp(-logit)))})
    return rows, records


def test_site_calibration_measures_what_a_clinic_would_get(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "data" / "busbra"
    data.mkdir(parents=True)
    rows_a, rec_a = _site(rng, "scannerA", 150, skew=1.5)
    rows_b, rec_b = _site(rng, "scannerB", 120, skew=-1.0)
    with open(data / "labels.csv", "w", newline="") as fp:
        writer = csv.DictWriter(fp, fieldnames=["file", "label", "case", "device"])
        writer.writeheader()
        writer.writerows(rows_a + rows_b)
    records = [{**r, "image": str(data / r["image"])} for r in rec_a + rec_b]
    run = tmp_path / "protocol" / "runs" / "busbra_cross" / "scannerC_to_others"
    run.mkdir(parents=True)
    validation = {"prob_malignant": [0.2, 0.3, 0.7, 0.8, 0.9, 0.1], "label": [0, 0, 1, 1, 1, 0]}
    (run / "full_wellposed.json").write_text(json.dumps({"split": "scannerC_to_others", "records": records,
                                                         "validation": validation}))
    png = tmp_path / "site.png"
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "protocol"), "--data-root", str(tmp_path / "data"),
                          "--cases", "10", "50", "--draws", "30", "--png", str(png)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert set(report["sites"]) == {"scannerC_to_others: scannerA", "scannerC_to_others: scannerB"}
    assert report["sites"]["scannerC_to_others: scannerA"]["patients"] == 150
    pooled = report["pooled_over_sites"]
    # the site's own patients calibrate; the training scanner's calibration and none do not
    assert pooled["n50"]["ece_site"]["mean"] < 0.5 * pooled["n50"]["ece_raw"]["mean"]
    assert pooled["n50"]["ece_site"]["mean"] < pooled["n50"]["ece_training"]["mean"]
    assert pooled["n50"]["ece_site"]["mean"] <= pooled["n10"]["ece_site"]["mean"]
    assert png.stat().st_size > 10_000

    # a test frame the data root does not know: one line, exit code 2
    records.append({"image": str(data / "images/elsewhere.png"), "label": 1, "prob_uncalibrated": 0.5})
    (run / "full_wellposed.json").write_text(json.dumps({"split": "scannerC_to_others", "records": records}))
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "protocol"), "--data-root", str(tmp_path / "data")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "elsewhere.png" in out.stderr and len(out.stderr.strip().splitlines()) == 1
