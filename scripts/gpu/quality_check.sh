#!/usr/bin/env bash
# The GPU quality check in one command (scripts/gpu/README.md): the quality study configs/quality/gpu_study.yaml
# on one GPU within a wall-clock budget (default 6 minutes from this script's start, compiles included).
#
#   bash scripts/gpu/quality_check.sh OUT_DIR          # default out/gpu_quality
#
# OUT_DIR gets (flat, six files): results.csv, summary.md (written even when the budget cut runs; it lists them),
# eval_loss_vs_step.png, eval_loss_vs_experts.png, quality_check.log (everything printed) and runs.tar.gz (each
# run's command, training log and curves). The study itself (checkpoints, W&B offline runs), the JAX compilation
# cache and the tiny corpus live under QUALITY_CHECK_WORK (default /tmp/null_moe_quality); the stdlib corpus of the
# GPU study is built under data_cache/ in the repository on first use. Rerunning resumes: finished runs are kept.
#
# Environment: PYTHON (default python3), QUALITY_CHECK_BUDGET_S (default 360: the whole script, wheels and corpus
# included), QUALITY_CHECK_WORK, QUALITY_CHECK_ARGS (extra study arguments, e.g. "--num_train_steps 625"),
# QUALITY_CHECK_TINY=1 (CPU smoke run: the same arms, seeds and order at tiny shapes, 2 steps each, on a small
# corpus; about 2 minutes on 2 idle cores), NULL_MOE_SITE (where carried wheels go; scripts/gpu/env.sh).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
source scripts/gpu/env.sh
START=$(date +%s)
OUT_DIR="${1:-out/gpu_quality}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$OUT_DIR/quality_check.log"
BUDGET="${QUALITY_CHECK_BUDGET_S:-360}"
WORK="${QUALITY_CHECK_WORK:-/tmp/null_moe_quality}"
RESERVE_S=20  # kept back from the study's budget for collecting the outputs
STATUS=0
step() { echo; echo "=== $* (t=$(( $(date +%s) - START )) s) ==="; }

main() {
step "environment"
null_moe_gpu_env || STATUS=1  # carried wheels, stand-ins, PYTHONPATH, W&B offline, no hub; sets PY

step "versions"
"$PY" -c 'import sys, jax; print("python", sys.version.split()[0], "jax", jax.__version__, jax.devices())' || STATUS=1

export JAX_COMPILATION_CACHE_DIR="$WORK/jax_cache"  # a run's second seed loads its compiled step from here
ARGS=(--config_path configs/quality/gpu_study.yaml)
if [ "${QUALITY_CHECK_TINY:-0}" = "1" ]; then
  step "tiny mode: CPU, tiny shapes, small corpus"
  export JAX_PLATFORMS=cpu
  CORPUS="$WORK/tiny_corpus"
  if [ ! -d "$CORPUS/tokenizer" ]; then
    "$PY" -m experiments.speedrun.local_data --out_dir "$CORPUS" --max_chars 150000 >/dev/null || STATUS=1
  fi
  STUDY_DIR="$WORK/study_tiny"
  OVERRIDES="{data.tokenizer: $CORPUS/tokenizer, data.train_urls: [$CORPUS/train.jsonl],"
  OVERRIDES+=" data.validation_urls: [$CORPUS/validation.jsonl], data.cache_dir: $CORPUS/cache,"
  OVERRIDES+=" model.seq_len: 64, trainer.train_batch_size: 8, trainer.per_device_eval_parallelism: 8,"
  OVERRIDES+=" trainer.watch.interval: 0}"
  ARGS+=(--base_config configs/quality/cpu_base.yaml --num_train_steps 2 --steps_per_eval 2
         --max_eval_batches 1 --parallel_runs 2 --overrides "$OVERRIDES")
else
  STUDY_DIR="$WORK/study"
fi
LEFT=$(( START + BUDGET - RESERVE_S - $(date +%s) ))
if [ "$LEFT" -lt 30 ]; then
  echo "!! only ${LEFT} s of the ${BUDGET} s budget left for the study"; LEFT=30
fi
# shellcheck disable=SC2206
ARGS+=(--out_dir "$STUDY_DIR" --time_budget_s "$LEFT" ${QUALITY_CHECK_ARGS:-})
step "study (budget ${LEFT} s): ${ARGS[*]}"
# The study stops its own runs at the budget; the outer timeout is a last resort.
timeout --kill-after=10 "$(( LEFT + 15 ))" "$PY" -m experiments.speedrun.null_quality "${ARGS[@]}"
rc=$?
echo "study exit code: $rc"
[ "$rc" -eq 0 ] || STATUS=1

step "outputs"
for f in results.csv summary.md eval_loss_vs_step.png eval_loss_vs_experts.png; do
  [ -f "$STUDY_DIR/$f" ] && cp "$STUDY_DIR/$f" "$OUT_DIR/"
done
if [ ! -f "$OUT_DIR/summary.md" ]; then
  printf '# Quality check\n\nThe study wrote no summary (exit code %s); see quality_check.log.\n' "$rc" > "$OUT_DIR/summary.md"
fi
if [ -d "$STUDY_DIR/runs" ]; then
  (cd "$STUDY_DIR" && find runs -maxdepth 2 \( -name command.txt -o -name train.log -o -name metrics.json \) -print0 \
    | tar --null -czf "$OUT_DIR/runs.tar.gz" -T -) || true
fi
cat "$OUT_DIR/summary.md"
step "done: status $STATUS; files in $OUT_DIR"
ls -l "$OUT_DIR"
return "$STATUS"
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
