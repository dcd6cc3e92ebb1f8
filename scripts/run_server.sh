#!/usr/bin/env bash
# Run the product: set up .venv if needed, prepare the demo studies folder from sample_data/ on
# first run, and start MONAI Label with the Thyroid Nodule app on http://127.0.0.1:8000.
#
# Settings (environment): HOST (127.0.0.1), PORT (8000), STUDIES (.studies/ in the repository, or
# the DICOMweb root of an archive such as http://127.0.0.1:8042/dicom-web; its credentials in
# THYROID_ARCHIVE_USER / THYROID_ARCHIVE_PASSWORD or THYROID_ARCHIVE_TOKEN).
# Extra arguments go to `monailabel start_server`, e.g. `--conf device cpu` or
# `--conf model_dir /data/models` (see the README's "Server settings").
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
studies="${STUDIES:-$root/.studies}"
if [[ "$studies" =~ ^https?:// ]]; then
  :  # a DICOMweb archive (PACS): nothing to prepare (README, "Running against a PACS")
elif [ ! -f "$studies/datastore_v2.json" ]; then
  echo "preparing the demo studies folder $studies from sample_data/thyroid (unconfirmed cases)" >&2
  "$root/.venv/bin/thyroid-nodule" import-studies "$root/sample_data/thyroid/labels.csv" --studies "$studies" --unlabelled >&2
fi
cd "$root"
export PATH="$root/.venv/bin:$PATH"  # MONAI Label starts its train/batch workers with this python
exec "$root/.venv/bin/python" -m monailabel.main start_server \
  --app "$root/apps/thyroid_nodule" --studies "$studies" \
  --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}" "$@"
