"""Site retraining: how far a clinic's own confirmed cases lift a model trained on another scanner.

    .venv/bin/python scripts/site_adaptation.py runs/compact_cross60 --out runs/site_adaptation.json \
        [--cases 25 50] [--draws 3] [--png site_adaptation.png]

A MONAI Label server retrains the served model on the cases its users confirmed
(``POST /train/classify_nodule``: from the served weights, a validation split of the confirmed
cases, Platt calibration on it). Across scanners this is what a clinic can do about the shift
the cross-scanner protocol measures. This script measures it on the finished cross-scanner runs
of a protocol folder (their kept model files): each test scanner of each split is a site; ``n``
of its patients (all their frames) are drawn as the confirmed cases, the split's model is
fine-tuned on them from its weights with the run's recipe (lesion crops with a random margin,
ultrasound augmentation; a case-grouped validation split of ``--val-fraction`` of them, the
best validation epoch kept, ``--epochs`` at most, ``--patience``), calibrated (Platt) on its
validation predictions, and tested at the run's headline box margin on the site's other
patients, beside the model before retraining on exactly those frames (from the run's records).
Draws whose training or validation part lacks a class are drawn again (the server refuses such
training sets too). Patients are never on both sides.

Resumable: each finished draw is written (atomically) to ``--out`` at once and skipped on a
re-run with the same settings. Prints the summary as JSON; ``--png`` draws AUC before and after
against ``n``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from thyroid_plugin.data import datalist_from_csv, grouped_split  # noqa: E402
from thyroid_plugin.io.atomic import atomic_write_json  # noqa: E402
from thyroid_plugin.metrics import binary_metrics  # noqa: E402
from thyroid_plugin.recipe import CropInputs, calibrated_figures  # noqa: E402


def draw_confirmed(site: list[dict], n: int, val_fraction: float, rng: np.random.Generator,
                   tries: int = 50) -> tuple[list[dict], list[dict], list[dict], int]:
    """``(train, val, evaluate, redraws)``: ``n`` patients of ``site`` drawn at random, all their
    frames split case-grouped into training and validation (each with both classes; drawn again
    otherwise, ``redraws`` times), and every other patient's frames to evaluate on."""
    patients = sorted({d["group"] for d in site})
    if not 0 < n < len(patients):
        raise ValueError(f"{n} confirmed patients asked for, the site has {len(patients)}")
    for attempt in range(tries):
        chosen = set(rng.choice(patients, size=n, replace=False).tolist())
        confirmed = [d for d in site if d["group"] in chosen]
        train, val = grouped_split(confirmed, val_fraction, int(rng.integers(1 << 31)))
        if all(len({d["label"] for d in part}) == 2 for part in (train, val)):
            return train, val, [d for d in site if d["group"] not in chosen], attempt
    raise ValueError(f"no draw of {n} patients gave both classes in training and validation in {tries} tries")


def retrain_and_test(run: dict, kept: Path, train: list, val: list, evaluate: list, settings: dict,
                     work: Path) -> dict:
    """Fine-tune the run's kept model on ``train`` (validation ``val``), calibrate it and test it
    on ``evaluate`` at the run's headline margin."""
    import torch

    from thyroid_plugin.evaluation import evaluate_split, train_variant

    state = torch.load(kept, map_location="cpu", weights_only=True)["state_dict"]
    start = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    inputs = CropInputs(settings)
    t0 = time.time()
    with contextlib.redirect_stdout(sys.stderr):  # training's epoch lines: stdout is the report's
        network, best = train_variant(run["variant"], settings, train, val, work, inputs.train_transforms(),
                                      inputs.val_transforms(), "cpu", start, lr=settings["lr"])
    margin = settings.get("headline_margin", 0.25)
    result = evaluate_split(network, run["variant"], inputs.boxed(evaluate, margin), inputs.prepare)
    raw = [r["prob_malignant"] for r in result["records"]]
    labels = [r["label"] for r in result["records"]]
    validation = best.get("validation")
    validation = (validation["prob_malignant"], validation["label"]) if validation else None
    summary, _, _ = calibrated_figures(raw, labels, validation, "platt")
    return {"auc_after": summary["auc"], "ece_after": summary["ece"], "best_epoch": best.get("epoch"),
            "epochs_run": best.get("epochs_run"), "seconds": round(time.time() - t0, 1)}


def _summary(values) -> dict:
    v = np.asarray(values, float)
    return {"mean": round(float(v.mean()), 4), "sd": round(float(v.std(ddof=1)) if v.size > 1 else 0.0, 4), "n": int(v.size)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("protocol_dir", help="a protocol's --out folder with finished busbra_cross runs and their kept models")
    ap.add_argument("--out", required=True, help="JSON of every draw (resumable)")
    ap.add_argument("--variant", default="full_wellposed")
    ap.add_argument("--cases", type=int, nargs="+", default=[25, 50], help="confirmed patients per site")
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-4, help="the retraining's learning rate (configs/train.json's)")
    ap.add_argument("--val-fraction", type=float, default=0.2, help="of the confirmed patients (configs/train.json's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--png", help="write AUC before and after retraining against the number of confirmed patients here")
    args = ap.parse_args()
    runs = sorted((Path(args.protocol_dir) / "runs" / "busbra_cross").glob(f"*/{args.variant}.json"))
    runs = [p for p in runs if p.with_suffix(".pt").is_file()]
    if not runs:
        print(f"no finished busbra_cross runs of {args.variant} with a kept model under {args.protocol_dir}", file=sys.stderr)
        return 2
    if not (args.epochs > 0 and args.patience >= 0 and args.lr > 0 and 0 < args.val_fraction < 1 and args.draws > 0):
        print("--epochs, --draws and --lr must be positive, --patience not negative, --val-fraction in (0, 1)", file=sys.stderr)
        return 2
    try:
        known = {str(Path(d["image"]).resolve()): d for d in datalist_from_csv(Path(args.data_root) / "busbra" / "labels.csv")}
    except Exception as exc:  # one line, not a traceback
        print(f"cannot read BUS-BRA's frames: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    recipe = {k: getattr(args, k) for k in ("variant", "epochs", "patience", "lr", "val_fraction", "seed")}
    done = json.loads(out.read_text()) if out.is_file() else {}
    if done.get("recipe", recipe) != recipe:
        print(f"{out} holds draws of other settings {done['recipe']}: give another --out", file=sys.stderr)
        return 2
    draws = done.get("draws", {})
    for path in runs:
        run = json.loads(path.read_text())
        settings = {**run["settings"], "epochs": args.epochs, "early_stop_patience": args.patience, "lr": args.lr,
                    "batch_size": 16, "num_workers": 0}
        records = {str(Path(r["image"]).resolve()): r for r in run["records"]}
        frames = [known[k] for k in records if k in known]
        if len(frames) != len(records):
            print(f"{path}: {len(records) - len(frames)} test frames not in BUS-BRA's labels.csv", file=sys.stderr)
            return 2
        for centre in sorted({d["centre"] for d in frames}):
            site = [d for d in frames if d["centre"] == centre]
            patients = len({d["group"] for d in site})
            for n in args.cases:
                if n >= patients:
                    continue
                for k in range(args.draws):
                    key = f"{run['split']}|{centre}|{n}|{k}"
                    if key in draws:
                        continue
                    rng = np.random.default_rng([args.seed, n, k, sum(map(ord, key.split('|')[0] + centre))])
                    train, val, evaluate, redraws = draw_confirmed(site, n, args.val_fraction, rng)
                    before = binary_metrics([records[str(Path(d["image"]).resolve())]["prob_uncalibrated"] for d in evaluate],
                                            [int(d["label"]) for d in evaluate])["auc"]
                    with tempfile.TemporaryDirectory() as work:
                        after = retrain_and_test(run, path.with_suffix(".pt"), train, val, evaluate,
                                                 {**settings, "seed": args.seed + k}, Path(work) / "run")
                    draws[key] = {"split": run["split"], "site": centre, "patients": n, "draw": k, "site_patients": patients,
                                  "train_frames": len(train), "val_frames": len(val), "evaluate_frames": len(evaluate),
                                  "redraws": redraws, "auc_before": before, **after,
                                  "confirmed_patients": sorted({d["group"] for d in train + val})}
                    atomic_write_json(out, {"recipe": recipe, "draws": draws})
                    print(f"[site] {key}: AUC {before:.3f} -> {after['auc_after']:.3f} "
                          f"(ECE {after['ece_after']:.3f}; {after['seconds']:.0f}s)", file=sys.stderr, flush=True)
    summary: dict = {"sites": {}, "pooled": {}}
    for n in args.cases:
        rows = [d for d in draws.values() if d["patients"] == n]
        if not rows:
            continue
        for site in sorted({(d["split"], d["site"]) for d in rows}):
            mine = [d for d in rows if (d["split"], d["site"]) == site]
            summary["sites"].setdefault(f"{site[0]}: {site[1]}", {})[f"n{n}"] = {
                "auc_before": _summary([d["auc_before"] for d in mine]), "auc_after": _summary([d["auc_after"] for d in mine]),
                "gain": _summary([d["auc_after"] - d["auc_before"] for d in mine]),
                "ece_after": _summary([d["ece_after"] for d in mine])}
        summary["pooled"][f"n{n}"] = {"auc_before": _summary([d["auc_before"] for d in rows]),
                                      "auc_after": _summary([d["auc_after"] for d in rows]),
                                      "gain": _summary([d["auc_after"] - d["auc_before"] for d in rows]),
                                      "ece_after": _summary([d["ece_after"] for d in rows])}
    print(json.dumps({"recipe": recipe, **summary}, indent=1))
    if args.png and summary["sites"]:
        from thyroid_plugin.reports import _pyplot

        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(5.6, 3.8), dpi=120)
        for name, per_n in summary["sites"].items():
            ns = sorted(int(k[1:]) for k in per_n)
            after = [per_n[f"n{n}"]["auc_after"]["mean"] for n in ns]
            before = [per_n[f"n{n}"]["auc_before"]["mean"] for n in ns]
            line, = ax.plot(ns, after, marker="o", label=f"{name} (retrained)")
            ax.plot(ns, before, ls=":", marker=".", color=line.get_color())
        ax.axhline(0.80, color="grey", lw=0.8, ls="--", label="target 0.80")
        ax.set_xlabel("confirmed patients of the site used to retrain")
        ax.set_ylabel("ROC-AUC on the site's other patients")
        ax.set_title(f"retrained (solid) against before (dotted); mean of {args.draws} draws", fontsize=8)
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(args.png)
        plt.close(fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
