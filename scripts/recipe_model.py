"""Train a servable classifier with the recipe on the shipped model's DDTI split and compare it
with the shipped model on the same held-out frames, each served as the product serves them.

The shipped classifier (``apps/thyroid_nodule/model/pretrained_classify_nodule.pt``) was trained by
``scripts/train_default_model.sh``: DDTI's ``runs/ddti_split/train.csv`` (365 frames; 20 % of its
cases held out to choose the epoch), 224 px, the plain augmentation, 40 epochs. This script trains
the protocol's recipe (``--protocol``, default ``compact``; :mod:`thyroid_plugin.recipe`) on exactly
those training frames and those validation cases: lesion-centred crops with a random margin and
whole frames, ultrasound augmentation, starting from a BUS-BRA pre-training (``--pretrained``: a
protocol's ``pretrain/full_wellposed.pt``; without it the pre-training runs first, into
``--work``), the epoch with the best validation AUC at a 25 % box kept (with ``--average FROM
EPOCHS``: EPOCHS epochs and the mean of the weights after epochs FROM..EPOCHS, no epoch chosen with
the validation cases), then Platt scaling and the
operating point fitted on those validation predictions and stored in the file
(:func:`thyroid_plugin.calibration.calibrate_model_file`).

Both models are then served (:class:`thyroid_plugin.inference.NodulePredictor`) on the split's
held-out ``test.csv`` frames with three inputs: a 25 % box around the expert mask (a user's loose
box), the shipped localiser's box (what the server does without a box) and the whole frame.
Reported: ROC-AUC with 95 % bootstrap intervals, the paired 95 % interval of the difference
(recipe - shipped) for each input, expected calibration error and the metrics at each model's
served threshold.

Decision rule, fixed before the test figures are seen: the recipe's model replaces the shipped one
(``--install``) only if its test ROC-AUC is higher than the shipped model's both at the 25 % box
and with the localiser's box; otherwise the shipped model stays and the figures are reported.

    .venv/bin/python scripts/recipe_model.py --pretrained runs/compact_pre24/pretrain/full_wellposed.pt \\
        --work runs/recipe_model --report runs/recipe_model/report.json

Resumable: training continues from its last epoch's checkpoint in ``--work``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from thyroid_plugin.calibration import calibrate_model_file, expected_calibration_error  # noqa: E402
from thyroid_plugin.checkpoint import load_checkpoint, model_identity, write_payload  # noqa: E402
from thyroid_plugin.data import datalist_from_csv, grouped_split  # noqa: E402
from thyroid_plugin.evaluation import PROTOCOLS, average_range_problem, pretrained_weights, train_variant  # noqa: E402
from thyroid_plugin.inference import NodulePredictor  # noqa: E402
from thyroid_plugin.io import atomic_copy_file, load_image  # noqa: E402
from thyroid_plugin.io.atomic import atomic_write_json  # noqa: E402
from thyroid_plugin.lesion import margin_box  # noqa: E402
from thyroid_plugin.localiser import LocaliserFrames, NoduleLocaliser  # noqa: E402
from thyroid_plugin.metrics import auc_bootstrap_ci, binary_metrics, paired_auc_difference_ci  # noqa: E402
from thyroid_plugin.recipe import CropInputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "apps" / "thyroid_nodule" / "model"
VARIANT = "full_wellposed"
MARGIN = 0.25
#: the shipped model's own validation share of train.csv (``configs/train.json`` ``val_fraction``)
VAL_FRACTION = 0.2


def served_scores(model: str, localiser: str, images: list, boxed: list) -> tuple[dict, float]:
    """P(malignant) of each frame as ``model`` serves it, per input: ``boxed`` (a user's box per
    frame), no box (the localiser draws one) and the whole frame (served without a localiser);
    and the threshold it serves with."""
    def probabilities(predictor: NodulePredictor, rois: list) -> np.ndarray:
        return np.array([p.probabilities["malignant"] for start in range(0, len(images), 16)
                         for p in predictor.predict_batch(images[start:start + 16], rois[start:start + 16])])

    scores = {}
    for localiser_path, inputs in ((localiser, {"25 % box": boxed, "no box (localiser)": [None] * len(images)}),
                                   (None, {"whole frame": [None] * len(images)})):
        predictor = NodulePredictor(model, device="cpu", compile=False, localiser_path=localiser_path)
        try:
            scores.update({name: probabilities(predictor, rois) for name, rois in inputs.items()})
            threshold = float(predictor.info()["threshold"])
        finally:
            predictor.close()
    return scores, threshold


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split-dir", default=str(ROOT / "runs" / "ddti_split"),
                    help="the shipped classifier's DDTI split (train.csv, test.csv from thyroid-nodule split)")
    ap.add_argument("--pretrained", help="BUS-BRA pre-trained weights (a protocol's pretrain/full_wellposed.pt)")
    ap.add_argument("--protocol", default="compact", choices=["compact", "medium"])
    ap.add_argument("--pretrain-epochs", type=int, help="pre-training epochs when it runs here (default: the protocol's)")
    ap.add_argument("--epochs", type=int, help="most fine-tuning epochs (default: the protocol's)")
    ap.add_argument("--average", type=int, nargs=2, metavar=("FROM", "EPOCHS"),
                    help="fine-tune EPOCHS epochs and keep the mean of the weights after epochs FROM..EPOCHS (protocol --finetune-average) instead of the best validation epoch")
    ap.add_argument("--work", default=str(ROOT / "runs" / "recipe_model"), help="training folder (resumable)")
    ap.add_argument("--shipped", default=str(MODEL_DIR / "pretrained_classify_nodule.pt"))
    ap.add_argument("--localiser", default=str(MODEL_DIR / "pretrained_nodule_localiser.pt"))
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--report", help="also write the JSON here")
    ap.add_argument("--install", action="store_true",
                    help="replace the shipped model with the recipe's when the decision rule says so")
    args = ap.parse_args()
    split_dir, work = Path(args.split_dir), Path(args.work)
    if not (split_dir / "train.csv").is_file() or not (split_dir / "test.csv").is_file():
        print(f"error: {split_dir} has no train.csv and test.csv (thyroid-nodule split writes them)", file=sys.stderr)
        return 2
    problem = average_range_problem(args.average)
    if problem:
        print(f"error: --average FROM EPOCHS {problem}", file=sys.stderr)
        return 2
    settings = dict(PROTOCOLS[args.protocol])
    if args.pretrain_epochs:
        settings["pretrain_epochs"] = args.pretrain_epochs
    if args.epochs:
        settings["epochs"] = args.epochs
    train, test = datalist_from_csv(split_dir / "train.csv"), datalist_from_csv(split_dir / "test.csv")
    fit, val = grouped_split(train, VAL_FRACTION, settings["seed"])
    inputs = CropInputs(settings)
    t0 = time.perf_counter()
    if args.pretrained:
        start = torch.load(args.pretrained, map_location="cpu", weights_only=True)["state_dict"]
        pretrained_from = {"file": str(args.pretrained), "identity": model_identity(args.pretrained)}
    else:
        start = pretrained_weights(work, VARIANT, settings, Path(args.data_root), inputs.train_transforms(),
                                   inputs.val_transforms(), "cpu", lambda line: print(line, flush=True))
        pretrained_from = {"file": str(work / "pretrain" / f"{VARIANT}.pt")}
    model = work / "model.pt"
    if not model.is_file():
        run_dir = work / f"{VARIANT}_train"
        _, best = train_variant(VARIANT, settings, fit, val, run_dir, inputs.train_transforms(), inputs.val_transforms(),
                                "cpu", start, epochs=args.average[1] if args.average else None,
                                average_from_epoch=args.average[0] if args.average else 0)
        payload = load_checkpoint(run_dir / "model.pt")
        payload["recipe"] = {"protocol": args.protocol, "settings": settings, "pretrained": pretrained_from,
                             "train_frames": len(fit), "val_frames": len(val), "best_epoch": best["epoch"],
                             "averaged_epochs": best.get("averaged_epochs"), "epochs_run": best["epochs_run"], "train_s": round(time.perf_counter() - t0)}
        write_payload(run_dir / "model.pt", payload)
        record = best["validation"]
        calibrate_model_file(str(run_dir / "model.pt"), record["prob_malignant"], [int(v) for v in record["label"]], "platt")
        atomic_copy_file(run_dir / "model.pt", model)
        shutil.rmtree(run_dir, ignore_errors=True)
    recipe = load_checkpoint(model)

    frames = LocaliserFrames(test, NoduleLocaliser.load(args.localiser).image_size)
    images = [load_image(d["image"]) for d in frames.items]
    labels = np.array([int(d["label"]) for d in frames.items])
    boxed = [list(margin_box(b, MARGIN, s)) for b, s in zip(frames.boxes, frames.shapes)]
    served = {"recipe": served_scores(str(model), args.localiser, images, boxed),
              "shipped": served_scores(args.shipped, args.localiser, images, boxed)}
    out = {"test_frames": len(images), "malignant": int(labels.sum()), "train_frames": len(fit), "val_frames": len(val),
           "recipe_model": model_identity(model), "shipped_model": model_identity(args.shipped),
           "recipe": {k: v for k, v in recipe["recipe"].items() if k != "settings"},
           "calibration": recipe.get("calibration"), "inputs": {}}
    for name in ("25 % box", "no box (localiser)", "whole frame"):
        per = {}
        for who in ("recipe", "shipped"):
            probs, threshold = served[who]
            p = probs[name]
            m = binary_metrics(p, labels, threshold)
            per[who] = {"auc": round(m["auc"], 3), "auc_95ci": auc_bootstrap_ci(p, labels),
                        "ece": round(expected_calibration_error(p, labels), 3), "threshold": round(threshold, 4),
                        **{k: round(m[k], 3) for k in ("sensitivity", "specificity", "balanced_accuracy")}}
        per["auc recipe - shipped, 95 % CI"] = paired_auc_difference_ci(served["recipe"][0][name], served["shipped"][0][name], labels)
        out["inputs"][name] = per
    better = all(out["inputs"][k]["recipe"]["auc"] > out["inputs"][k]["shipped"]["auc"] for k in ("25 % box", "no box (localiser)"))
    out["decision"] = "replace the shipped model" if better else "keep the shipped model"
    print(json.dumps(out, indent=1))
    if args.report:
        atomic_write_json(args.report, out)
    if args.install and better:
        atomic_copy_file(model, args.shipped)
        print(f"installed {model} as {args.shipped}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
