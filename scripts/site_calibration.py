"""Site calibration: how far a clinic's own confirmed cases bring a model trained on another scanner to honest probabilities.

    .venv/bin/python scripts/site_calibration.py runs/compact_cross60 [--cases 10 25 50 100] [--draws 200] [--png site.png]

Across scanners, a calibration fitted on the training scanner's validation frames does not
carry (docs/evaluation.md). What the product tells a clinic instead is to calibrate on its own
confirmed cases (``thyroid-nodule calibrate --csv``: Platt scaling folded into the model file).
This script measures that on the finished cross-scanner runs of a protocol folder: each test
scanner of each split is a site; for ``n`` confirmed patients (all their frames) drawn at random
from the site, Platt scaling is fitted on their uncalibrated predictions and the expected
calibration error (10 bins) is measured on the site's other patients' frames. Repeated
``--draws`` times per ``n``; beside it, on the same evaluation frames, the ECE uncalibrated and
after the training scanner's own Platt scaling (fitted on the run's kept validation predictions),
and the ECE's sampling floor: that of a perfectly calibrated model on as many frames (labels drawn
from the site-calibrated probabilities), which a 10-bin ECE on a few dozen frames does not reach
below.
Patients are never on both sides. Prints one JSON object (per site and pooled over the sites of
each draw); ``--png`` draws pooled ECE against ``n``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from thyroid_plugin.calibration import expected_calibration_error, fit_calibration  # noqa: E402
from thyroid_plugin.data import datalist_from_csv  # noqa: E402
from thyroid_plugin.evaluation import kept_validation  # noqa: E402


def split_by_patient(groups: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks ``(calibrate, evaluate)`` over the frames: ``n`` patients drawn at random
    (all their frames) to calibrate on, every other patient's frames to evaluate on."""
    patients = np.unique(groups)
    if not 0 < n < len(patients):
        raise ValueError(f"{n} confirmed patients asked for, the site has {len(patients)}")
    chosen = rng.choice(patients, size=n, replace=False)
    calibrate = np.isin(groups, chosen)
    return calibrate, ~calibrate


def site_draws(raw: np.ndarray, labels: np.ndarray, groups: np.ndarray, n: int, draws: int,
               rng: np.random.Generator, training_calibration=None) -> list[dict]:
    """``draws`` site calibrations with ``n`` confirmed patients: per draw the evaluation frames'
    calibrated probabilities and labels, and the ECE uncalibrated, after the site's Platt scaling
    and (if given) after ``training_calibration`` (a fitted :class:`Calibration`)."""
    out = []
    for _ in range(draws):
        cal, ev = split_by_patient(groups, n, rng)
        site = fit_calibration(raw[cal], labels[cal], "platt")
        p_site = site.apply(raw[ev])
        entry = {"prob_site": p_site, "prob_raw": raw[ev], "label": labels[ev],
                 "one_class": bool(labels[cal].min() == labels[cal].max()),
                 "ece_raw": expected_calibration_error(raw[ev], labels[ev]),
                 "ece_site": expected_calibration_error(p_site, labels[ev]),
                 # the same frames with labels drawn from these very probabilities: what a perfectly
                 # calibrated model would measure on so few frames (the sampling floor of a 10-bin ECE)
                 "ece_floor": expected_calibration_error(p_site, (rng.uniform(size=p_site.size) < p_site).astype(int))}
        if training_calibration is not None:
            entry["prob_training"] = training_calibration.apply(raw[ev])
            entry["ece_training"] = expected_calibration_error(entry["prob_training"], labels[ev])
        out.append(entry)
    return out


def _summary(values) -> dict:
    v = np.asarray(values, float)
    return {"mean": round(float(v.mean()), 4), "sd": round(float(v.std(ddof=1)) if v.size > 1 else 0.0, 4),
            "p90": round(float(np.quantile(v, 0.9)), 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", help="a protocol's --out folder with finished busbra_cross runs")
    ap.add_argument("--dataset", default="busbra_cross")
    ap.add_argument("--variant", default="full_wellposed")
    ap.add_argument("--cases", type=int, nargs="+", default=[10, 25, 50, 100], help="confirmed patients per site")
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--png", help="write pooled ECE against the number of confirmed patients here")
    args = ap.parse_args()
    paths = sorted((Path(args.out_dir) / "runs" / args.dataset).glob(f"*/{args.variant}.json"))
    if not paths:
        print(f"no finished runs of {args.variant} on {args.dataset} under {args.out_dir}", file=sys.stderr)
        return 2
    labels_csv = Path(args.data_root) / "busbra" / "labels.csv"
    try:
        known = {str(Path(d["image"]).resolve()): d for d in datalist_from_csv(labels_csv, require_exists=False)}
    except Exception as exc:  # one line, not a traceback
        print(f"cannot read the frames' patients and scanners: {exc}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    sites: dict[str, dict] = {}
    pooled = {n: [] for n in args.cases}  # per n: one list of site draws per site
    for path in paths:
        run = json.loads(path.read_text())
        validation = kept_validation(path, run)
        training = fit_calibration(*validation, method="platt") if validation else None
        records = run["records"]
        missing = [r["image"] for r in records if str(Path(r["image"]).resolve()) not in known]
        if missing:
            print(f"{path}: {len(missing)} test frames not in {labels_csv} (e.g. {missing[0]})", file=sys.stderr)
            return 2
        meta = [known[str(Path(r["image"]).resolve())] for r in records]
        centres = np.array([m["centre"] for m in meta])
        for centre in sorted(set(centres)):
            at = centres == centre
            raw = np.array([r["prob_uncalibrated"] for r in records], float)[at]
            labels = np.array([int(r["label"]) for r in records])[at]
            groups = np.array([m["group"] for m in meta])[at]
            name = f"{run['split']}: {centre}"
            entry = {"frames": int(at.sum()), "patients": int(len(np.unique(groups))),
                     "malignant_share": round(float(labels.mean()), 3),
                     "ece_raw_all": round(expected_calibration_error(raw, labels), 4)}
            if training is not None:
                entry["ece_training_all"] = round(expected_calibration_error(training.apply(raw), labels), 4)
            for n in args.cases:
                if n >= entry["patients"]:
                    continue
                draws = site_draws(raw, labels, groups, n, args.draws, rng, training)
                entry[f"n{n}"] = {"ece_site": _summary([d["ece_site"] for d in draws]),
                                  "ece_raw": _summary([d["ece_raw"] for d in draws]),
                                  "ece_floor": _summary([d["ece_floor"] for d in draws]),
                                  "one_class_draws": int(sum(d["one_class"] for d in draws))}
                if training is not None:
                    entry[f"n{n}"]["ece_training"] = _summary([d["ece_training"] for d in draws])
                pooled[n].append(draws)
            sites[name] = entry
    summary = {}
    for n, per_site in pooled.items():
        if not per_site or len(per_site) != len(sites):
            continue  # a site too small for n: no pooled figure
        row = {}
        for key in ("site", "raw", "training"):
            if any(f"prob_{key}" not in draws[0] for draws in per_site):
                continue
            row[f"ece_{key}"] = _summary([
                expected_calibration_error(np.concatenate([site[i][f"prob_{key}"] for site in per_site]),
                                           np.concatenate([site[i]["label"] for site in per_site]))
                for i in range(args.draws)])
        summary[n] = row
    print(json.dumps({"dataset": args.dataset, "variant": args.variant, "draws": args.draws, "sites": sites,
                      "pooled_over_sites": {f"n{n}": row for n, row in summary.items()}}, indent=1))
    if args.png and summary:
        from thyroid_plugin.reports import _pyplot

        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(5.2, 3.6), dpi=120)
        ns = sorted(summary)
        for key, label in (("site", "Platt on the site's confirmed patients"), ("training", "Platt from the training scanner"),
                           ("raw", "uncalibrated")):
            if all(f"ece_{key}" in summary[n] for n in ns):
                mean = [summary[n][f"ece_{key}"]["mean"] for n in ns]
                p90 = [summary[n][f"ece_{key}"]["p90"] for n in ns]
                line, = ax.plot(ns, mean, marker="o", label=label)
                ax.plot(ns, p90, ls=":", color=line.get_color())
        ax.axhline(0.08, color="grey", lw=0.8, ls="--", label="target 0.08")
        ax.set_xscale("log")
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
        ax.set_xlabel("confirmed patients per site")
        ax.set_ylabel("ECE on the sites' other patients")
        ax.set_title(f"{args.dataset}: mean (solid) and 90th percentile (dotted) of {args.draws} draws", fontsize=8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.png)
        plt.close(fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
