"""Temperature against Platt scaling on the finished runs of a protocol folder, test predictions.

    .venv/bin/python scripts/compare_calibration.py runs/medium [--dataset ddti] [--variant full_wellposed] [--png rel.png]

For every finished split (``runs/<dataset>/<split>/<variant>.json``) both calibrations are
fitted on that run's validation predictions (kept in the result; runs written before that was
kept: the split's kept model file, ``<variant>.pt``, which holds them) and applied to its
uncalibrated test predictions at the headline box. Prints one JSON object: per split and pooled,
the ECE (10 bins) and the negative log-likelihood raw, after a temperature and after Platt
scaling, with the fitted parameters; ``--png`` also draws the pooled reliability diagram.
Neither method changes the ranking, so the ROC-AUC is the same in all three columns.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from thyroid_plugin.calibration import expected_calibration_error, fit_calibration, plot_reliability  # noqa: E402
from thyroid_plugin.evaluation import kept_validation  # noqa: E402


def nll(prob, labels) -> float:
    p = np.clip(np.asarray(prob, float), 1e-7, 1 - 1e-7)
    y = np.asarray(labels, float)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", help="a protocol's --out folder")
    ap.add_argument("--dataset", default="ddti")
    ap.add_argument("--variant", default="full_wellposed")
    ap.add_argument("--png", help="write the pooled reliability diagram here")
    args = ap.parse_args()
    paths = sorted((Path(args.out_dir) / "runs" / args.dataset).glob(f"*/{args.variant}.json"))
    if not paths:
        print(f"no finished runs of {args.variant} on {args.dataset} under {args.out_dir}", file=sys.stderr)
        return 2
    splits, pooled = {}, {"raw": [], "temperature": [], "platt": [], "label": []}
    for path in paths:
        run = json.loads(path.read_text())
        validation = kept_validation(path, run)
        if validation is None:
            print(f"{path}: no validation predictions kept; skipped", file=sys.stderr)
            continue
        raw = [r["prob_uncalibrated"] for r in run["records"]]
        labels = [int(r["label"]) for r in run["records"]]
        entry = {"n_test": len(labels), "malignant_share_test": float(np.mean(labels)),
                 "n_val": len(validation[1]), "malignant_share_val": float(np.mean(validation[1]))}
        probs = {"raw": np.asarray(raw, float)}
        for method in ("temperature", "platt"):
            fitted = fit_calibration(*validation, method=method)
            probs[method] = fitted.apply(raw)
            entry[method] = {"scale": round(fitted.scale, 4), "shift": round(fitted.shift, 4)}
        for name, p in probs.items():
            entry[f"ece_{name}"] = round(expected_calibration_error(p, labels), 4)
            entry[f"nll_{name}"] = round(nll(p, labels), 4)
            pooled[name].extend(p.tolist())
        pooled["label"].extend(labels)
        splits[run["split"]] = entry
    if not splits:
        return 2
    y = pooled["label"]
    summary = {name: {"ece": round(expected_calibration_error(pooled[name], y), 4), "nll": round(nll(pooled[name], y), 4)}
               for name in ("raw", "temperature", "platt")}
    print(json.dumps({"dataset": args.dataset, "variant": args.variant, "splits": splits, "pooled": {"n": len(y), **summary}},
                     indent=1))
    if args.png:
        plot_reliability({name: (pooled[name], y) for name in ("raw", "temperature", "platt")}, args.png,
                         title=f"{args.dataset}, {args.variant}: test predictions of {len(splits)} split(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
