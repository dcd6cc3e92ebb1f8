#!/usr/bin/env bash
# Create (or reuse) .venv at the repository root and install the project from its own files:
# setup.cfg (pinned direct dependencies), constraints.txt (every transitive version, as verified
# on these machines) and the project itself in editable mode with the test extras.
# A second run does nothing unless one of those files changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.setup-stamp"
python_bin="${PYTHON:-python3.11}"
command -v "$python_bin" >/dev/null 2>&1 || python_bin=python3
want="$(cat "$root/setup.cfg" "$root/constraints.txt" "$root/pyproject.toml" | sha256sum | cut -c1-16)"
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setting up $venv (first run takes a few minutes)..." >&2
if [ ! -x "$venv/bin/python" ]; then
  "$python_bin" -m venv "$venv"
fi
# (pip warns about every local index folder that lacks a package; those lines are noise)
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  -c "$root/constraints.txt" -e "$root[test]" \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
echo "$want" > "$stamp"
