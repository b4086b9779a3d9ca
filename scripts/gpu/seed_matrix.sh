#!/usr/bin/env bash
# The published seed matrix (configs/bench/seed_matrix.yaml: 3 shapes x k 2/4/8 x null 0-0.9 x both null modes,
# forward + backward, bf16) through the bench CLI on one GPU, in one call of at most 9 minutes, to set beside the
# TPU table. Same environment as device_check.sh (scripts/gpu/env.sh).
#
#   bash scripts/gpu/seed_matrix.sh [OUT_DIR]      # default out/gpu_seed_matrix
#
# OUT_DIR stays flat: seed_matrix.log (everything printed: RESULT lines, the summary table, the TPU-layout table),
# results.csv and the tokens/s plot of each shape. Rows are durable as each batch of points finishes, so a run cut
# by SEED_MATRIX_TIMEOUT_S (default 530 s) keeps what finished; rerunning resumes from the CSV.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
OUT_DIR="${1:-out/gpu_seed_matrix}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="${SEED_MATRIX_WORK:-/tmp/null_moe_seed_matrix}"
mkdir -p "$WORK"
{
  # shellcheck source=scripts/gpu/env.sh
  source "$ROOT/scripts/gpu/env.sh"
  null_moe_gpu_env
  [ -f "$OUT_DIR/results.csv" ] && cp "$OUT_DIR/results.csv" "$WORK/results.csv"  # resume
  timeout "${SEED_MATRIX_TIMEOUT_S:-530}" "$PY" -m scripts.bench.bench_null_moe --config_path configs/bench/seed_matrix.yaml \
    --out_dir "$WORK" --wandb.mode offline "$@"
  rc=$?
  echo "bench exit code: $rc"
  [ -f "$WORK/results.csv" ] && cp "$WORK/results.csv" "$OUT_DIR/results.csv"
  for png in "$WORK"/tokens_per_s_*.png; do [ -f "$png" ] && cp "$png" "$OUT_DIR/"; done
  ls -l "$OUT_DIR"
  exit "$rc"
} 2>&1 | tee "$OUT_DIR/seed_matrix.log"
exit "${PIPESTATUS[0]}"
