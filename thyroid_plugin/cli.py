"""``thyroid-nodule``: train, evaluate and predict from the command line; import a labelled
collection into a MONAI Label studies folder.

Exit codes: 0 success, 1 bad input (unreadable image, CSV or model; one line on stderr),
2 bad command-line usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main"]


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model on a labelled CSV, class folders or studies folder")
    p.add_argument("--csv", required=True, help="labelled data: CSV (file,label[,case,centre]), benign/ malignant/ folders, or a studies folder")
    p.add_argument("--out", required=True, help="output folder: model.pt, metrics.json, train_stats.json, tensorboard/")
    p.add_argument("--epochs", type=int, help="override training#epochs")
    p.add_argument("--image-size", type=int, help="override image_size (square network input)")
    p.add_argument("--batch-size", type=int, help="override training#batch_size")
    p.add_argument("--val-fraction", type=float, help="fraction of cases held out to choose the best epoch")
    p.add_argument("--seed", type=int)
    p.add_argument("--loss", choices=["reference", "wellposed", "none"], help="override loss#form")
    p.add_argument("--config", default="train", help="config file (default configs/train.json)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: GPU if present)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints")
    p.add_argument("--calibration", choices=["platt", "temperature", "none"],
                   help="calibrate the best model on its validation predictions (default: configs/train.json calibration)")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="metrics, ROC curve, confusion matrix and saliency overlays on a labelled set")
    p.add_argument("--csv", required=True, help="labelled test data (as for train)")
    p.add_argument("--model", required=True, help="model file")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overlays", type=int, default=3, help="overlays of this many correct and this many wrong cases")
    p.add_argument("--batch-size", type=int, help="images per forward pass (default: configs/inference.json batch_size)")
    p.add_argument("--device")
    p.add_argument("--precision", help="fp32, bf16, fp16 or auto (default: configs/inference.json, as served)")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="compile the network for the batch size first (auto: when there are at least "
                        f"{COMPILE_FROM_IMAGES} images, where the minute it takes pays off)")
    p.add_argument("--localiser", help="a nodule localiser file that boxes the rows without a roi, as the server does "
                                       "(the shipped one: apps/thyroid_nodule/model/pretrained_nodule_localiser.pt)")


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="classify images; write a JSON and a saliency mask per image")
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG, BMP, TIFF, DICOM, NIfTI, NRRD)")
    p.add_argument("--model", required=True, help="model file")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--roi", type=float, nargs=4, metavar=("X0", "Y0", "X1", "Y1"), help="nodule box in pixels (applied to every image)")
    p.add_argument("--localiser", help="a nodule localiser file that boxes the images when no --roi is given "
                                       "(the shipped one: apps/thyroid_nodule/model/pretrained_nodule_localiser.pt)")
    p.add_argument("--device")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16", "auto"])


def _add_import(sub) -> None:
    p = sub.add_parser("import-studies", help="copy a labelled collection into a MONAI Label studies folder as confirmed cases")
    p.add_argument("source", help="labelled data: CSV (file,label[,case,centre,mask]; an expert mask becomes the case's final label) or benign/ malignant/ folders")
    p.add_argument("--studies", required=True, help="MONAI Label studies folder (created if missing)")
    p.add_argument("--limit", type=int, help="import at most this many images")
    p.add_argument("--unlabelled", action="store_true", help="import the images without their diagnosis (to classify or confirm later)")


def _add_split(sub) -> None:
    p = sub.add_parser("split", help="write a stratified, case-grouped held-out split of a labelled CSV as train.csv and test.csv")
    p.add_argument("--csv", required=True, help="labelled data (as for train)")
    p.add_argument("--out", required=True, help="folder for train.csv and test.csv")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)


def _add_protocol(sub) -> None:
    from .evaluation import PROTOCOLS, VARIANTS

    p = sub.add_parser("protocol", help="evaluation protocol: every variant on DDTI 5-fold, BUS-BRA official folds and cross-device; tables, ROC curves, overlays")
    p.add_argument("--out", required=True, help="output folder (re-running resumes: finished runs are kept)")
    p.add_argument("--protocol", default="quick", choices=sorted(PROTOCOLS), help="quick (CPU smoke, 64 px, 4 epochs), medium (CPU, the product's recipe, 128 px until validation stops improving), compact (the medium recipe at 96 px, at most 8 + 20 epochs), gpu (the medium recipe at 224 px, all variants on DDTI and BUS-BRA cross-device, training capped at 5 minutes in all; for one GPU) or full (the paper's schedule, GPU)")
    p.add_argument("--datasets", help="comma-separated: ddti, busbra, busbra_cross (default: the protocol's, else all three)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    p.add_argument("--data-root", help="folder with ddti/ and busbra/ (default ../shared/data)")
    p.add_argument("--epochs", type=int, help="override the protocol's epochs")
    p.add_argument("--image-size", type=int, help="override the protocol's input size")
    p.add_argument("--pretrain-epochs", type=int, help="override the protocol's BUS-BRA pre-training epochs (recipe protocols)")
    p.add_argument("--pretrain-patience", type=int, help="pre-training epochs without a better validation AUC before it stops (default: the protocol's patience)")
    p.add_argument("--finetune-lr", type=float, help="learning rate of the fine-tuning from the BUS-BRA pre-training (DDTI folds; default: the protocol's lr)")
    p.add_argument("--finetune-average", type=int, nargs=2, metavar=("FROM", "EPOCHS"),
                   help="fine-tune EPOCHS epochs (no early stopping) and keep the mean of the weights after epochs FROM..EPOCHS instead of the best validation epoch (DDTI folds from the pre-training)")
    p.add_argument("--seed", type=int, help="seed of the splits' validation (and DDTI's folds) and of training (default 0): a repeat with other randomness")
    p.add_argument("--splits", help="comma-separated split names to run (e.g. logiq5_to_others, fold3; default all)")
    p.add_argument("--time-budget", type=float, help="seconds of training for the whole protocol, shared among its runs by training-set size (the gpu protocol's is 300)")
    p.add_argument("--ddti-recipe", choices=["alone", "mixed", "pretrain"],
                   help="medium protocol: DDTI folds alone, with BUS-BRA mixed in, or fine-tuned from BUS-BRA pre-training (default)")
    p.add_argument("--device", default="cpu")


def _add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="calibrate a model's probabilities (Platt or temperature scaling) and set its operating point (Youden's J) and validation metrics from a labelled validation set")
    p.add_argument("--csv", required=True, help="labelled validation data, not the test data")
    p.add_argument("--model", required=True, help="model file (updated in place, atomically)")
    p.add_argument("--method", choices=("platt", "temperature", "none"), default="platt",
                   help="platt (default): fit a scale and a shift of the logits on these predictions (the probabilities then "
                        "match this set's share of malignant cases); temperature: a scale only; none: keep the probabilities "
                        "as they are. The calibration is folded into the weights")
    p.add_argument("--no-temperature", dest="method", action="store_const", const="none",
                   help="the same as --method none (kept for scripts written before --method)")
    p.add_argument("--device")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thyroid-nodule", description="Train, evaluate and run the thyroid nodule classifier; import labelled data into a MONAI Label studies folder.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_evaluate(sub)
    _add_predict(sub)
    _add_import(sub)
    _add_split(sub)
    _add_protocol(sub)
    _add_calibrate(sub)
    return parser


def cmd_train(args) -> int:
    from .config import load_config

    overrides = {
        "dataset": os.path.abspath(args.csv),
        "output_dir": os.path.abspath(args.out),
        "training#epochs": args.epochs,
        "image_size": args.image_size,
        "training#batch_size": args.batch_size,
        "val_fraction": args.val_fraction,
        "seed": args.seed,
        "loss#form": args.loss,
        "resume": True if args.resume else None,
    }
    if args.device:
        overrides["device"] = f"$torch.device('{args.device}')"
    if args.loss in ("reference", "none"):
        overrides["loss#weights"] = {}  # the form's own default weights
    parser = load_config(args.config, overrides)
    stats = parser.get_parsed_content("run")
    metrics = stats.get("metrics") or {}
    from .io import atomic_write_json, json_safe

    model = Path(args.out) / "model.pt"
    calibration = None
    method = (args.calibration or parser.get("calibration", "platt")) if model.is_file() else "none"
    if method != "none":
        from .calibration import calibrate_on_kept_validation
        from .checkpoint import load_checkpoint, validation_metrics
        from .metrics import OPERATING_POINT_METRICS

        calibration = calibrate_on_kept_validation(str(model), method)
        if calibration is not None:  # the same cut between the same cases, at the calibrated threshold
            at = validation_metrics(load_checkpoint(model))
            metrics = {k: at.get(k) for k in OPERATING_POINT_METRICS}
            atomic_write_json(Path(args.out) / "metrics.json", metrics)
            stats_file = Path(args.out) / "train_stats.json"
            if stats_file.is_file():  # the run's record says what the file now holds
                recorded = json.loads(stats_file.read_text())
                recorded.update(metrics=metrics, model=calibration["model"], calibration=calibration)
                atomic_write_json(stats_file, recorded)
    # undefined metrics (NaN, e.g. AUC on a one-class validation split) are printed as null: valid JSON
    print(json.dumps(json_safe({"model": str(model), "best_epoch": stats.get("best_metric_epoch"),
                                "metrics": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()},
                                "calibration": calibration and {k: v for k, v in calibration.items() if k != "model"}})))
    return 0


COMPILE_FROM_IMAGES = 256


def served_predictor(model: str, device: Optional[str], precision: Optional[str], compile: str, batch_size: int,
                     localiser: Optional[str] = None):
    """A predictor with the served settings of ``configs/inference.json`` (precision,
    channels-last, the localiser's margin), compiled synchronously for ``batch_size`` and 1 when
    ``compile`` is ``on``; ``localiser`` boxes the frames that have no roi."""
    from .config import load_config
    from .inference import NodulePredictor

    served = load_config("inference")["inference"]
    return NodulePredictor(model, device=device, precision=precision or served["precision"],
                           channels_last=bool(served["channels_last"]), compile=compile,
                           compile_batch_sizes=(batch_size, 1) if batch_size > 1 else (1,), localiser_path=localiser,
                           localiser_margin=float(served.get("localiser_margin", 0.25)))


def cmd_evaluate(args) -> int:
    import numpy as np

    from .config import load_config
    from .data import load_datalist
    from .io import atomic_write_bytes, load_image
    from .metrics import binary_metrics
    from .reports import plot_confusion, plot_roc, save_overlay

    datalist = load_datalist(args.csv)
    args.batch_size = args.batch_size or int(load_config("inference")["inference"]["batch_size"])
    compile = args.compile if args.compile != "auto" else ("on" if len(datalist) >= COMPILE_FROM_IMAGES else "off")
    predictor = served_predictor(args.model, args.device, args.precision, compile, args.batch_size, args.localiser)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    probs, labels = [], []
    rows = []
    overlays: dict[str, list] = {"correct": [], "wrong": []}  # (item, prediction) of the first frames of each kind
    from tqdm import tqdm

    for start in tqdm(range(0, len(datalist), args.batch_size), desc="evaluate", unit="batch", disable=None):
        chunk = datalist[start : start + args.batch_size]
        preds = predictor.predict_batch([d["image"] for d in chunk], [d.get("roi") for d in chunk])
        for d, p in zip(chunk, preds):
            probs.append(p.probabilities["malignant"])
            labels.append(int(d["label"]))
            rows.append((d, p.probabilities["malignant"], p.roi, p.roi_source))
            kind = "correct" if (p.probabilities["malignant"] >= predictor.threshold) == bool(d["label"]) else "wrong"
            if len(overlays[kind]) < args.overlays:
                overlays[kind].append((d, p))
    metrics = binary_metrics(probs, labels, predictor.threshold)
    result = {**{k: (None if v != v else v) for k, v in metrics.items()}, "n": len(labels),
              "threshold": predictor.threshold, "model": predictor.model_id, "data": os.path.abspath(args.csv)}
    atomic_write_bytes(out / "metrics.json", json.dumps(result, indent=2).encode())
    atomic_write_bytes(out / "predictions.json", json.dumps(
        [{"image": d["image"], "label": int(d["label"]), "prob_malignant": round(float(pm), 6), "roi": roi, "roi_source": source}
         for d, pm, roi, source in rows], indent=1).encode())
    plot_roc({"model": (probs, labels)}, str(out / "roc.png"), title=f"ROC ({len(labels)} images)")
    plot_confusion(probs, labels, str(out / "confusion.png"), predictor.threshold)
    for kind, chosen in overlays.items():
        for d, pred in chosen:
            mask = np.asarray(load_image(d["mask"]).array) if d.get("mask") else None
            if mask is not None and mask.ndim == 3:
                mask = mask[..., 0]
            truth = "malignant" if d["label"] else "benign"
            save_overlay(np.asarray(load_image(d["image"]).array), pred.saliency, str(out / "overlays" / f"{kind}_{Path(d['image']).stem}.png"),
                         f"{Path(d['image']).name}: truth {truth}, P(malignant) {pred.probabilities['malignant']:.2f}", mask)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}))
    return 0


def cmd_predict(args) -> int:
    from .batch_files import predict_files
    from .inference import NodulePredictor

    predictor = NodulePredictor(args.model, device=args.device, precision=args.precision, localiser_path=args.localiser)
    results = predict_files(predictor, args.images, args.out, rois=[args.roi] * len(args.images) if args.roi else None)
    for r in results:
        print(json.dumps({"image": r["image"], "label": r["label"], "probabilities": r["probabilities"], "mask": r["mask"],
                          "roi": r.get("roi"), "roi_source": r.get("roi_source")}))
    return 0


def cmd_import(args) -> int:
    from .data import load_datalist
    from .monailabel_adapter import import_collection

    datalist = load_datalist(args.source)
    if args.limit:
        datalist = datalist[: args.limit]
    imported = import_collection(datalist, args.studies, with_diagnosis=not args.unlabelled)
    n = len(imported.ids)
    print(json.dumps({"studies": os.path.abspath(args.studies), "imported": n, "confirmed": 0 if args.unlabelled else n,
                      "masks": len(imported.masks)}))
    return 0


def cmd_split(args) -> int:
    from .data import grouped_split, load_datalist, write_datalist_csv

    datalist = load_datalist(args.csv)
    train, test = grouped_split(datalist, args.test_fraction, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_datalist_csv(train, out / "train.csv")
    write_datalist_csv(test, out / "test.csv")
    print(json.dumps({"train": len(train), "test": len(test), "train_cases": len({d["group"] for d in train}),
                      "test_cases": len({d["group"] for d in test})}))
    return 0


def cmd_protocol(args) -> int:
    from .evaluation import DATASETS, PROTOCOLS, VARIANTS, average_range_problem, run_protocol

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; use {list(VARIANTS)}")
    overrides = {k: v for k, v in {"epochs": args.epochs, "image_size": args.image_size, "ddti_recipe": args.ddti_recipe,
                                   "pretrain_epochs": args.pretrain_epochs, "pretrain_patience": args.pretrain_patience,
                                   "time_budget_s": args.time_budget, "seed": args.seed,
                                   "finetune_lr": args.finetune_lr, "finetune_average": args.finetune_average}.items() if v is not None}
    problem = average_range_problem(args.finetune_average)
    if problem:
        raise ValueError(f"--finetune-average FROM EPOCHS {problem}")
    if args.finetune_lr is not None and not (math.isfinite(args.finetune_lr) and args.finetune_lr > 0):
        raise ValueError(f"--finetune-lr must be a positive learning rate, got {args.finetune_lr}")
    if args.datasets is not None:
        datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    else:
        datasets = list(PROTOCOLS[args.protocol].get("datasets") or DATASETS)
    only = [s.strip() for s in args.splits.split(",") if s.strip()] if args.splits else None
    results = run_protocol(Path(args.out), args.protocol, datasets, variants, Path(args.data_root) if args.data_root else None,
                           overrides, args.device, only_splits=only)
    summary = {ds: {v: round(e["auc"][0], 4) for v, e in per.items()} for ds, per in results["datasets"].items()}
    print(json.dumps({"out": os.path.abspath(args.out), "mean_test_auc": summary}))
    return 0


def cmd_calibrate(args) -> int:
    from .calibration import calibrate_model_file
    from .checkpoint import load_checkpoint, set_threshold, validation_metrics
    from .data import load_datalist
    from .inference import NodulePredictor
    from .metrics import youden_threshold

    datalist = load_datalist(args.csv)
    predictor = NodulePredictor(args.model, device=args.device)
    probs = [p.probabilities["malignant"] for start in range(0, len(datalist), 16)
             for p in predictor.predict_batch([d["image"] for d in datalist[start : start + 16]],
                                              [d.get("roi") for d in datalist[start : start + 16]])]
    labels = [int(d["label"]) for d in datalist]
    extra = {}
    if args.method != "none":
        # calibrated probabilities: the calibration is folded into the weights, the threshold re-chosen
        record = calibrate_model_file(args.model, probs, labels, args.method)
        identity = record.pop("model")
        extra = {"calibration": {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}}
    else:
        # the model's metrics become these predictions' at the new threshold (the weights stay as they are)
        identity = set_threshold(args.model, youden_threshold(probs, labels), validation=(probs, labels))
    payload = load_checkpoint(args.model)
    metrics = validation_metrics(payload)
    print(json.dumps({"model": identity, "threshold": round(payload["threshold"], 6), "n": len(labels), **extra,
                      "at_threshold": {k: (None if v != v else round(v, 4)) for k, v in metrics.items()}}))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    commands = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "import-studies": cmd_import, "split": cmd_split,
                "protocol": cmd_protocol, "calibrate": cmd_calibrate}
    from .errors import ThyroidPluginError

    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        print("thyroid-nodule: interrupted", file=sys.stderr)
        return 130
    except (ThyroidPluginError, FileNotFoundError, ValueError, OSError) as e:
        if args.verbose:
            raise
        print(f"thyroid-nodule {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        # MONAI's config parser wraps errors raised while running the config
        cause = e.__cause__ or e.__context__
        while isinstance(cause, RuntimeError) and (cause.__cause__ or cause.__context__):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, (ThyroidPluginError, FileNotFoundError, ValueError, OSError)) and not args.verbose:
            print(f"thyroid-nodule {args.command}: error: {_one_line(cause)}", file=sys.stderr)
            return 1
        raise


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
