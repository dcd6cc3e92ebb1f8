#!/usr/bin/env bash
# Train a default model from scratch with configs/train.json and install it (see the README,
# "The shipped model": the model shipped now came from scripts/recipe_model.py, which adds the
# BUS-BRA pre-training and averages the fine-tuning's weights; the one before it came from this
# script when configs/train.json trained whole frames at 224 px):
#   1. a stratified, case-grouped held-out split of DDTI (80 % train+validation / 20 % test),
#   2. training with configs/train.json (the recipe's crops at 96 px; its own case-grouped
#      validation split picks the epoch),
#   3. evaluation on the held-out test split (metrics, ROC, confusion matrix, overlays),
#   4. installation as the app's pretrained model (fp16 weights).
# Takes a few hours on a 2-core CPU, minutes on a GPU.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cli="$root/.venv/bin/thyroid-nodule"
data="${DDTI:-$root/../shared/data/ddti}/labels.csv"
out="${OUT:-$root/runs/default}"
"$cli" split --csv "$data" --out "$root/runs/ddti_split" --test-fraction 0.2 --seed 0
"$cli" train --csv "$root/runs/ddti_split/train.csv" --out "$out" "$@"
"$cli" evaluate --csv "$root/runs/ddti_split/test.csv" --model "$out/model.pt" --out "$out/test"
cp "$out/model.pt" "$root/apps/thyroid_nodule/model/pretrained_classify_nodule.pt"
echo "installed $out/model.pt as apps/thyroid_nodule/model/pretrained_classify_nodule.pt" >&2
