#!/usr/bin/env bash
# The README's main job: the CPU null-routing matrix (configs/bench/cpu_matrix.yaml), about 9 min on 2 idle cores.
# stdout: RESULT lines and the summary; stderr: one progress line per point. Writes results.csv, plots and W&B
# runs under out/bench/cpu_matrix (OUT_DIR=... to change; CONFIG=... for another YAML). W&B is offline unless
# WANDB_MODE says otherwise (WANDB_MODE=online after `wandb login` also uploads the points logged offline).
# Extra arguments go to the CLI, e.g.:  bash scripts/run_bench.sh --iters 3
# Rerunning resumes: points already in the CSV are skipped.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/ensure_venv.sh
mode="${WANDB_MODE:-offline}"
exec env WANDB_MODE="$mode" WANDB_SILENT="${WANDB_SILENT:-true}" .venv/bin/python -m scripts.bench.bench_null_moe \
  --config_path "${CONFIG:-configs/bench/cpu_matrix.yaml}" --out_dir "${OUT_DIR:-out/bench/cpu_matrix}" \
  --wandb.mode "$mode" "$@"
