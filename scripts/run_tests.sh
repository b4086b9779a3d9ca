#!/usr/bin/env bash
# The README's test command: creates .venv on first use, then runs the whole suite on CPU (CI, .ci/run, runs this).
#
#   bash scripts/run_tests.sh                 # everything: about 17 min on 2 cores
#   bash scripts/run_tests.sh --fast          # the fast tier: tests marked `fast` (pyproject.toml's markers):
#                                             # the layer against its reference (outputs and gradients), routing,
#                                             # dispatch, the tiled and Triton-interpret grouped matmuls, config
#                                             # errors, one 4-step training run; under 4 min on 2 cores
#
# Extra arguments go to pytest, e.g.:  bash scripts/run_tests.sh tests/test_gmm.py -x
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/ensure_venv.sh
export WANDB_MODE="${WANDB_MODE:-offline}"
export WANDB_SILENT="${WANDB_SILENT:-true}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
ARGS=()
for arg in "$@"; do
  if [ "$arg" = "--fast" ]; then
    ARGS+=(-m fast)
  else
    ARGS+=("$arg")
  fi
done
exec "$ROOT/.venv/bin/python" -m pytest -q -p no:cacheprovider --durations=15 ${ARGS[@]+"${ARGS[@]}"}
