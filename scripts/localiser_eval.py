"""Whole frames boxed by a localiser trained with the expert masks: does it close the gap to a box?

Trains a nodule localiser (:mod:`thyroid_plugin.localiser`) on one protocol split's training
frames (validation: the split's validation frames, by box IoU), then on that split's test frames
compares one classifier (a protocol's kept ``runs/<dataset>/<split>/<variant>.pt``) on

- the user's loose box (25 % margin around the expert mask),
- the whole frame,
- the localiser's box with the same 25 % margin (whole frame where it finds nothing).

    .venv/bin/python scripts/localiser_eval.py --split logiq7_to_others \\
        --classifier runs/compact_cross/runs/busbra_cross/logiq7_to_others/full_wellposed.pt --out-dir runs/localiser

Writes ``<split>.json`` (figures, per-frame boxes), ``localiser_<split>.pt`` (resumable while it
trains: run the same command again) and ``boxes_<split>.png`` (test frames with the expert box
in green and the localiser's in orange). Prints the JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from thyroid_plugin.data import datalist_from_csv  # noqa: E402
from thyroid_plugin.evaluation import PROTOCOLS, build_splits, build_variant, evaluate_split  # noqa: E402
from thyroid_plugin.io import load_image  # noqa: E402
from thyroid_plugin.io.atomic import atomic_write_json  # noqa: E402
from thyroid_plugin.lesion import margin_box  # noqa: E402
from thyroid_plugin.localiser import LocaliserFrames, NoduleLocaliser, evaluate_boxes, train_localiser  # noqa: E402
from thyroid_plugin.recipe import CropInputs  # noqa: E402
from thyroid_plugin.reports import plot_boxes  # noqa: E402

MARGIN = 0.25


def box_figure(frames: LocaliserFrames, boxes, path: Path, n: int = 12) -> None:
    picked = np.linspace(0, len(frames) - 1, min(n, len(frames))).astype(int)
    plot_boxes([load_image(frames.items[i]["image"]).array for i in picked], [frames.boxes[i] for i in picked],
               [boxes[i] for i in picked], [Path(frames.items[i]["image"]).stem for i in picked], str(path))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", required=True, help="a protocol split: logiq7_to_others, logiq5_to_others, fold1..fold5")
    ap.add_argument("--classifier", help="that split's kept classifier weights (without: box figures only)")
    ap.add_argument("--variant", default="full_wellposed")
    ap.add_argument("--protocol", default="compact", help="the classifier's protocol (its image size and crops)")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--with-busbra", action="store_true", help="DDTI splits: train the localiser on all of BUS-BRA too")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--patience", type=int, default=6)
    ap.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    args = ap.parse_args()
    root = Path(args.data_root)
    dataset = "ddti" if args.split.startswith("fold") else "busbra_cross"
    split = next((s for s in build_splits(root, [dataset]) if s.name == args.split), None)
    if split is None:
        print(f"error: no split {args.split!r}", file=sys.stderr)
        return 2
    if args.classifier and not Path(args.classifier).is_file():
        print(f"error: no such file: {args.classifier}", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / f"localiser_{args.split}.pt"
    train = list(split.train)
    if args.with_busbra and dataset == "ddti":
        train += datalist_from_csv(root / "busbra" / "labels.csv")
    t0 = time.perf_counter()
    if not weights.is_file():
        train_localiser(train, split.val, weights, image_size=args.image_size, epochs=args.epochs, patience=args.patience,
                        progress=lambda line: print(line, flush=True))
    train_s = time.perf_counter() - t0
    localiser = NoduleLocaliser.load(weights)
    test = LocaliserFrames(split.test, localiser.image_size)
    scored = evaluate_boxes(localiser, test)
    out = {"split": args.split, "test_frames": len(test), "train_frames": localiser.record.get("train_frames"),
           "localiser_best_epoch": localiser.record.get("best_epoch"), "localiser_val_box_iou": localiser.record.get("val_box_iou"),
           "localiser_train_s": round(train_s), "test_box_iou": scored["box_iou"], "test_found_iou50": scored["found_iou50"],
           "test_no_box": scored["no_box"]}
    box_figure(test, scored["boxes"], out_dir / f"boxes_{args.split}.png")
    if args.classifier:
        network = build_variant(args.variant)
        payload = torch.load(args.classifier, map_location="cpu", weights_only=True)
        network.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()})
        network.eval()
        inputs = CropInputs(PROTOCOLS[args.protocol])
        items = test.items
        localised = [{**d, "roi": None if b is None else list(margin_box(b, MARGIN, s))}
                     for d, b, s in zip(items, scored["boxes"], test.shapes)]
        for key, listed in (("auc_25", inputs.boxed(items, MARGIN)), ("auc_whole", inputs.boxed(items, None)),
                            ("auc_localiser_box", localised)):
            out[key] = evaluate_split(network, args.variant, listed, inputs.prepare)["summary"]["auc"]
        out["gap_whole"] = out["auc_25"] - out["auc_whole"]
        out["gap_localiser_box"] = out["auc_25"] - out["auc_localiser_box"]
    print(json.dumps(out, indent=1))
    atomic_write_json(out_dir / f"{args.split}.json",
                      {**out, "localiser": localiser.record, "boxes": {d["image"]: b for d, b in zip(test.items, scored["boxes"])}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
