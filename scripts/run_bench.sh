#!/usr/bin/env bash
# The README's main job: the CPU null-routing matrix (configs/bench/cpu_matrix.yaml), about 10 min on 2 cores.
# Writes RESULT lines to stdout and results.csv, plots and W&B runs under out/bench/cpu_matrix (override with
# OUT_DIR). W&B is offline unless WANDB_MODE is set (e.g. WANDB_MODE=online after `wandb login`).
# Extra arguments go to the CLI, e.g.:  bash scripts/run_bench.sh --iters 3
# Rerunning resumes: points already in the CSV are skipped.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/ensure_venv.sh
export WANDB_MODE="${WANDB_MODE:-offline}"
export WANDB_SILENT="${WANDB_SILENT:-true}"
CONFIG="${CONFIG:-configs/bench/cpu_matrix.yaml}"
OUT_DIR="${OUT_DIR:-out/bench/cpu_matrix}"
exec "$ROOT/.venv/bin/python" -m scripts.bench.bench_null_moe --config_path "$CONFIG" --out_dir "$OUT_DIR" \
  --wandb.mode "$WANDB_MODE" "$@"
