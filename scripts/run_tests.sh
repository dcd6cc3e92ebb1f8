#!/usr/bin/env bash
# Set up .venv if needed, then run the whole test suite (slow tests included).
# Extra arguments go to pytest, e.g. scripts/run_tests.sh -m "not slow" tests/library
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
exec "$root/.venv/bin/python" -m pytest "$@"
