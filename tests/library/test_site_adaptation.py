"""``scripts/site_adaptation.py``: retraining a model from another scanner on a site's own
confirmed patients, tested on the site's other patients (what a clinic's server retrain does
about scanner shift)."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "site_adaptation.py"
DATA = ROOT.parent / "shared" / "data"


def _script():
    spec = importlib.util.spec_from_file_location("site_adaptation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_confirmed_patients_have_both_classes_on_each_side_and_are_never_evaluated():
    draw_confirmed = _script().draw_confirmed
    site = [{"image": f"{g}_{k}.png", "group": str(g), "label": int(g % 3 == 0)} for g in range(60) for k in range(2)]
    rng = np.random.default_rng(0)
    for n in (10, 25, 59):
        train, val, evaluate, _ = draw_confirmed(site, n, 0.2, rng)
        confirmed = {d["group"] for d in train + val}
        assert len(confirmed) == n and not {d["group"] for d in train} & {d["group"] for d in val}
        assert {d["label"] for d in train} == {d["label"] for d in val} == {0, 1}
        assert not confirmed & {d["group"] for d in evaluate} and len(train + val + evaluate) == len(site)
    with pytest.raises(ValueError, match="the site has 60"):
        draw_confirmed(site, 60, 0.2, rng)
    with pytest.raises(ValueError, match="both classes"):
        draw_confirmed([{**d, "label": 0} for d in site], 10, 0.2, rng)


def _cross_run(tmp_path: Path) -> tuple[Path, Path, list]:
    """A protocol folder with one finished cross-scanner run (a small network and its records
    on real BUS-BRA frames of two other scanners) and the frames' labels.csv."""
    from thyroid_plugin.evaluation import PROTOCOLS, build_variant

    with open(DATA / "busbra" / "labels.csv", newline="") as fp:
        rows = list(csv.DictReader(fp))
    picked = []
    for device in ("GE Logiq 5 @10-12MHz", "Toshiba Aplio 300 @12-14 MHz"):
        for label in ("benign", "malignant"):
            one_per_case = {r["case"]: r for r in rows if r["device"] == device and r["label"] == label}
            picked += list(one_per_case.values())[:12]
    data = tmp_path / "data" / "busbra"
    data.mkdir(parents=True)
    with open(data / "labels.csv", "w", newline="") as fp:
        w = csv.DictWriter(fp, fieldnames=list(rows[0]))
        w.writeheader()
        for r in picked:
            w.writerow({**r, "file": str(DATA / "busbra" / r["file"]), "mask": str(DATA / "busbra" / r["mask"])})
    rng = np.random.default_rng(3)
    records = [{"image": str(DATA / "busbra" / r["file"]), "label": int(r["label"] == "malignant"),
                "prob_uncalibrated": float(rng.uniform())} for r in picked]
    run = tmp_path / "protocol" / "runs" / "busbra_cross" / "logiq7_to_others"
    run.mkdir(parents=True)
    settings = {**PROTOCOLS["compact"], "image_size": 32}
    (run / "single_branch.json").write_text(json.dumps({"split": "logiq7_to_others", "variant": "single_branch",
                                                        "settings": settings, "records": records}))
    torch.manual_seed(0)
    torch.save({"state_dict": build_variant("single_branch").state_dict()}, run / "single_branch.pt")
    return tmp_path / "protocol", tmp_path / "data", records


def test_site_retraining_is_measured_on_the_sites_other_patients_and_resumes(tmp_path):
    from thyroid_plugin.metrics import binary_metrics

    protocol, data_root, records = _cross_run(tmp_path)
    out, png = tmp_path / "adaptation.json", tmp_path / "adaptation.png"
    argv = [sys.executable, str(SCRIPT), str(protocol), "--out", str(out), "--variant", "single_branch",
            "--data-root", str(data_root), "--cases", "8", "--draws", "1", "--epochs", "1", "--png", str(png)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report["sites"]) == {"logiq7_to_others: GE Logiq 5 @10-12MHz", "logiq7_to_others: Toshiba Aplio 300 @12-14 MHz"}
    assert report["pooled"]["n8"]["auc_after"]["n"] == 2 and png.is_file()
    draws = json.loads(out.read_text())["draws"]
    by_image = {r["image"]: r for r in records}
    with open(data_root / "busbra" / "labels.csv", newline="") as fp:
        rows = list(csv.DictReader(fp))
    for draw in draws.values():
        assert len(draw["confirmed_patients"]) == 8 and 0.0 <= draw["auc_after"] <= 1.0
        # "before" is the run's own model on exactly the frames the retrained one is tested on
        evaluated = [r for r in rows if r["device"] == draw["site"] and r["case"] not in draw["confirmed_patients"]]
        assert len(evaluated) == draw["evaluate_frames"] > 0
        probs = [by_image[str(DATA / "busbra" / r["file"])]["prob_uncalibrated"] for r in evaluated]
        assert draw["auc_before"] == pytest.approx(binary_metrics(probs, [int(r["label"] == "malignant") for r in evaluated])["auc"])
    # a re-run with the same settings trains nothing; other settings are refused, not mixed in
    stamp = out.stat().st_mtime_ns
    again = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "[site]" not in again.stderr and out.stat().st_mtime_ns == stamp
    other = subprocess.run(argv[:-2] + ["--lr", "3e-4"], capture_output=True, text=True, timeout=300)
    assert other.returncode == 2 and len(other.stderr.strip().splitlines()) == 1 and "other settings" in other.stderr
