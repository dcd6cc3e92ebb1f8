"""Train the shipped nodule localiser and measure it on the shipped model's held-out DDTI frames.

The localiser (:mod:`thyroid_plugin.localiser`) is trained on the DDTI frames the shipped
classifier was trained on (``--split-dir``'s ``train.csv``, as ``thyroid-nodule split`` writes it in
``scripts/train_default_model.sh``) plus all of BUS-BRA, and keeps the epoch with the best box
IoU on a case-grouped 15 % of those DDTI frames. Its test is the shipped classifier's held-out
20 %, served exactly as the product serves them (:class:`thyroid_plugin.inference.NodulePredictor`):

- the whole frame (no box),
- the expert box with a 25 % margin (a user's loose box),
- the localiser's box with the same margin (what the server does without a user's box).

    .venv/bin/python scripts/shipped_localiser.py --out apps/thyroid_nodule/model/pretrained_nodule_localiser.pt \\
        --report runs/shipped_localiser.json --figure docs/figures/localiser_boxes_shipped_ddti_test.png

Resumable (run the same command again). Prints and writes one JSON object: ROC-AUC of each input
with paired bootstrap 95 % intervals of its difference from the 25 % box (and of the localiser's
box from the whole frame), box IoU and the time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from thyroid_plugin.data import datalist_from_csv, grouped_split  # noqa: E402
from thyroid_plugin.inference import NodulePredictor  # noqa: E402
from thyroid_plugin.io import load_image  # noqa: E402
from thyroid_plugin.io.atomic import atomic_write_json  # noqa: E402
from thyroid_plugin.lesion import margin_box  # noqa: E402
from thyroid_plugin.localiser import LocaliserFrames, NoduleLocaliser, evaluate_boxes, train_localiser  # noqa: E402
from thyroid_plugin.metrics import binary_metrics, paired_auc_difference_ci  # noqa: E402
from thyroid_plugin.reports import plot_boxes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MARGIN = 0.25


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "apps" / "thyroid_nodule" / "model" / "pretrained_nodule_localiser.pt"))
    ap.add_argument("--classifier", default=str(ROOT / "apps" / "thyroid_nodule" / "model" / "pretrained_classify_nodule.pt"))
    ap.add_argument("--split-dir", default=str(ROOT / "runs" / "ddti_split"),
                    help="the shipped classifier's DDTI split (train.csv, test.csv)")
    ap.add_argument("--report", help="also write the JSON here")
    ap.add_argument("--figure", help="also draw twelve test frames with the expert's and the localiser's boxes (PNG)")
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--patience", type=int, default=5)
    args = ap.parse_args()
    root = Path(args.data_root)
    split_dir = Path(args.split_dir)
    if not (split_dir / "train.csv").is_file() or not (split_dir / "test.csv").is_file():
        print(f"error: {split_dir} has no train.csv and test.csv (thyroid-nodule split writes them)", file=sys.stderr)
        return 2
    train, test = datalist_from_csv(split_dir / "train.csv"), datalist_from_csv(split_dir / "test.csv")
    fit, val = grouped_split(train, 0.15, 0)
    t0 = time.perf_counter()
    if not Path(args.out).is_file():
        train_localiser(fit + datalist_from_csv(root / "busbra" / "labels.csv"), val, args.out, image_size=args.image_size,
                        epochs=args.epochs, patience=args.patience, progress=lambda line: print(line, flush=True))
    train_s = time.perf_counter() - t0
    localiser = NoduleLocaliser.load(args.out)
    frames = LocaliserFrames(test, localiser.image_size)
    scored = evaluate_boxes(localiser, frames)
    predictor = NodulePredictor(args.classifier, device="cpu", compile=False)
    try:
        images = [load_image(d["image"]) for d in frames.items]
        labels = np.array([int(d["label"]) for d in frames.items])
        rois = {"whole frame": [None] * len(images),
                "25 % box": [list(margin_box(b, MARGIN, s)) for b, s in zip(frames.boxes, frames.shapes)],
                "localiser box": [None if b is None else list(margin_box(b, MARGIN, s)) for b, s in zip(scored["boxes"], frames.shapes)]}
        probs = {k: np.array([p.probabilities["malignant"] for p in predictor.predict_batch(images, r)]) for k, r in rois.items()}
    finally:
        predictor.close()
    out = {"test_frames": len(frames), "malignant": int(labels.sum()), "train_frames": localiser.record.get("train_frames"),
           "val_frames": localiser.record.get("val_frames"), "best_epoch": localiser.record.get("best_epoch"),
           "epochs_run": localiser.record.get("epochs_run"), "val_box_iou": localiser.record.get("val_box_iou"),
           "train_s": round(train_s), "test_box_iou": round(scored["box_iou"], 3),
           "test_found_iou50": round(scored["found_iou50"], 3), "test_no_box": round(scored["no_box"], 3)}
    for key, p in probs.items():
        out[f"auc {key}"] = round(binary_metrics(p, labels)["auc"], 3)
        if key != "25 % box":
            out[f"auc {key} - 25 % box, 95 % CI"] = paired_auc_difference_ci(p, probs["25 % box"], labels)
    out["auc localiser box - whole frame, 95 % CI"] = paired_auc_difference_ci(probs["localiser box"], probs["whole frame"], labels)
    print(json.dumps(out, indent=1))
    if args.report:
        atomic_write_json(args.report, out)
    if args.figure:
        picked = np.linspace(0, len(frames) - 1, min(12, len(frames))).astype(int)
        plot_boxes([images[i].array for i in picked], [frames.boxes[i] for i in picked], [scored["boxes"][i] for i in picked],
                   [f"{Path(frames.items[i]['image']).stem} ({'malignant' if labels[i] else 'benign'})" for i in picked],
                   args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
