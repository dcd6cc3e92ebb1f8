#!/usr/bin/env bash
# The gpu protocol on a GPU machine of this workplace's `device` tool (docs/evaluation.md, "The
# gpu protocol"): run from the repository root there, after earlier calls copied the other parts
# of scripts/device/pack_data.py's output into DATA. Adds PART (the last part, carried with this
# call), checks the frames are all there, runs the protocol for at most LIMIT seconds (finished
# runs are kept: a later call resumes) and packs results, log and GPU load into $OUT.
#   bash scripts/device/run_gpu_protocol.sh [LIMIT=540] [PART=.dev2] [DATA=/root/data]
set -u
LIMIT=${1:-540}; PART=${2:-.dev2}; DATA=${3:-/root/data}; DEVICE=${DEVICE:-cuda}
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT" "$DATA"
export PYTHONUNBUFFERED=1 PYTHONPATH=/root/site:$PWD
# the image has torch and most of the rest; MONAI and ignite travel as wheels in .whl/
[ -d /root/site/monai ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /root/site .whl/*.whl
[ -d "$PART/data" ] && cp -r "$PART/data/." "$DATA/"
count() { find "$DATA/$1" -type f 2>/dev/null | wc -l; }
echo "frames: ddti $(count ddti/images) busbra $(count busbra/images) busbra masks $(count busbra/masks)"
if [ "$(count ddti/images)" != 456 ] || [ "$(count busbra/images)" != 1875 ] || [ "$(count busbra/masks)" != 1875 ]; then
  echo "data incomplete (an earlier part missing: the machine was not the same?): stopped"; exit 3
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
lscpu | grep -E "^Model name|^CPU\(s\)"
python3 -c "import torch, monai, numpy; print('torch', torch.__version__, 'monai', monai.__version__, 'numpy', numpy.__version__)"
dmon=
command -v nvidia-smi >/dev/null && { nvidia-smi dmon -s u -d 5 > "$OUT/dmon.txt" 2>&1 & dmon=$!; }
t0=$(date +%s)
timeout "$LIMIT" python3 -m thyroid_plugin.cli protocol --protocol gpu --device "$DEVICE" --data-root "$DATA" --out "${RESULTS:-/tmp/gpu}" > "$OUT/protocol.log" 2>&1
rc=$?
echo "protocol rc $rc (124: stopped at the limit) wall $(( $(date +%s) - t0 )) s"
[ -n "$dmon" ] && kill "$dmon" 2>/dev/null
grep -E "^\[protocol\]|mean_test_auc|Error|Traceback" "$OUT/protocol.log" | tail -60
# results without model weights (each result JSON keeps its test and validation predictions)
(cd "${RESULTS:-/tmp/gpu}" && tar czf "$OUT/gpu_results.tgz" --exclude='*.pt' --exclude='*_train' .)
ls -la "$OUT"
