"""Where the repository, the app and the shared real data are."""

from __future__ import annotations

import csv
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
APP_DIR = REPO / "apps" / "thyroid_nodule"
SHARED_DATA = REPO.parent / "shared" / "data"
DDTI = SHARED_DATA / "ddti"
BUSBRA = SHARED_DATA / "busbra"
PYTHON = REPO / ".venv" / "bin" / "python"


def require_data() -> None:
    """Fail (not skip) when the shared data is missing: CI always has it beside the repo."""
    if not (DDTI / "labels.csv").is_file():
        raise RuntimeError(f"the shared ultrasound data is missing: expected {DDTI}/labels.csv beside the repository")


def ddti_rows() -> list[dict]:
    require_data()
    with open(DDTI / "labels.csv", newline="") as fp:
        return list(csv.DictReader(fp))


def ddti_subset(n_benign: int, n_malignant: int, offset: int = 0) -> list[dict]:
    """The first ``n`` benign and malignant DDTI rows (after ``offset`` of each), one per case,
    with absolute paths: a deterministic small set of real thyroid images."""
    seen_cases: set = set()
    picked = {"benign": [], "malignant": []}
    skipped = {"benign": 0, "malignant": 0}
    want = {"benign": n_benign, "malignant": n_malignant}
    for row in ddti_rows():
        label = row["label"]
        if row["case"] in seen_cases or len(picked[label]) >= want[label]:
            continue
        if skipped[label] < offset:
            skipped[label] += 1
            seen_cases.add(row["case"])
            continue
        seen_cases.add(row["case"])
        picked[label].append({**row, "file": str(DDTI / row["file"]), "mask": str(DDTI / row["mask"])})
    return picked["benign"] + picked["malignant"]


def write_csv(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fp:
        w = csv.DictWriter(fp, fieldnames=["file", "label", "case", "mask"])
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in ("file", "label", "case", "mask")})
    return path
