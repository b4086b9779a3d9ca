#!/usr/bin/env bash
# The README's test command: creates .venv on first use, then runs the whole suite on CPU.
# Extra arguments go to pytest, e.g.:  bash scripts/run_tests.sh tests/test_gmm.py -x
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/ensure_venv.sh
export WANDB_MODE="${WANDB_MODE:-offline}"
export WANDB_SILENT="${WANDB_SILENT:-true}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec "$ROOT/.venv/bin/python" -m pytest -q -p no:cacheprovider --durations=15 "$@"
