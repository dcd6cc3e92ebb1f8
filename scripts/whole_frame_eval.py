"""Whole frames against boxes: ROC-AUC of a medium-protocol network on BUS-BRA frames with the box
a user would draw (tight, 25 %, 50 % margin around the expert mask), on the whole frame, and on
the whole frame boxed where the network's own saliency points.

    .venv/bin/python scripts/whole_frame_eval.py runs/medium/pretrain/full_wellposed.pt [--out whole.json]

The frames are the validation patients of the protocol's BUS-BRA pre-training (the list kept in
the weights file, ``val_images``; else ``--images``; else today's
:func:`thyroid_plugin.recipe.pretraining_split`): never trained on, but they chose the kept epoch
(at a 25 % box), so that column is optimistic by selection. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from thyroid_plugin.data import datalist_from_csv  # noqa: E402
from thyroid_plugin.evaluation import PROTOCOLS, build_variant, evaluate_split  # noqa: E402
from thyroid_plugin.recipe import CropInputs, evaluate_recipe, pretraining_split  # noqa: E402

KEYS = ("auc_tight", "auc_25", "auc_50", "auc_whole", "auc_saliency_box", "ece_uncalibrated", "energy_in_mask",
        "pointing_game", "iou")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights", help="a protocol's pretrain/<variant>.pt (state_dict, best_epoch)")
    ap.add_argument("--variant", default="full_wellposed")
    ap.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--images", help="a JSON list of the image paths to use instead (e.g. the validation frames of a "
                                     "pre-training that ran with an earlier split)")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    if not Path(args.weights).is_file():
        print(f"error: no such file: {args.weights}", file=sys.stderr)
        return 2
    settings = dict(PROTOCOLS["medium"])
    payload = torch.load(args.weights, map_location="cpu", weights_only=True)
    network = build_variant(args.variant)
    network.load_state_dict(payload["state_dict"])
    network.eval()
    _, frames = pretraining_split(settings, Path(args.data_root))
    listed = json.loads(Path(args.images).read_text()) if args.images else payload.get("val_images")
    if listed:
        wanted = set(listed)
        frames = [d for d in datalist_from_csv(Path(args.data_root) / "busbra" / "labels.csv") if d["image"] in wanted]
    t0 = time.perf_counter()
    summary = evaluate_recipe(network, args.variant, frames, CropInputs(settings), None, evaluate_split)["test"]
    out = {k: summary.get(k) for k in KEYS}
    out.update(frames=len(frames), best_epoch=payload.get("best_epoch"), seconds=round(time.perf_counter() - t0))
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
