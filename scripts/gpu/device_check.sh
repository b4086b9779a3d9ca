#!/usr/bin/env bash
# The GPU check in one command (scripts/gpu/README.md): versions, the accelerator tests, the layer and grouped
# matmul timings with their PyTorch peers, a training run through the training CLI, the bench CLI, one summary.
#
#   bash scripts/gpu/device_check.sh [OUT_DIR]        # default out/gpu; ends within 7 minutes on one H100/H200
#
# OUT_DIR stays flat (at most 8 files): device_check.log (everything printed), gpu_results.csv (every timing),
# train.log, bench_results.csv, bench_tokens_per_s.png and summary.md. Each section runs under its own time limit
# and the whole check under DEVICE_CHECK_BUDGET_S (default 400 s); a failing or cut section is reported and the
# next one still runs; the summary is written last whatever happened. The exit status is 0 only when every section
# passed (on a GPU the accelerator tests must have run there: all skipped is a failure).
#
# Environment: PYTHON (default python3), DEVICE_CHECK_TINY=1 (tiny shapes on CPU: every section runs, the Triton
# kernels in Pallas interpret mode, the PyTorch peers skip without CUDA), DEVICE_CHECK_BUDGET_S, MEASURE_ARGS
# (extra arguments for measure.py), SECTIONS (comma list, default all:
# versions,tests,measure,torch,train,bench).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
OUT_DIR="${1:-out/gpu}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$OUT_DIR/device_check.log"
TINY="${DEVICE_CHECK_TINY:-0}"
BUDGET_S="${DEVICE_CHECK_BUDGET_S:-400}"
SECTIONS="${SECTIONS:-versions,tests,measure,torch,train,bench}"
START=$(date +%s)
WORK="$(mktemp -d /tmp/null_moe_check.XXXXXX)"  # everything that must not land in OUT (W&B runs, bench plots)

STATUS=0
SUMMARY_ARGS=()
step() { echo; echo "=== $* (t=$(( $(date +%s) - START )) s) ==="; }
record() {  # record NAME STATUS-TEXT FAILED(0/1)
  SUMMARY_ARGS+=(--section "$1=$2")
  echo "--- $1: $2"
  [ "$3" -eq 0 ] || STATUS=1
}
wanted() { [[ ",$SECTIONS," == *",$1,"* ]]; }
# run_section NAME LIMIT_S CMD...: runs CMD under min(LIMIT_S, what is left of the budget); records the outcome.
run_section() {
  local name="$1" limit="$2"; shift 2
  if ! wanted "$name"; then return 0; fi
  local left=$(( BUDGET_S - ($(date +%s) - START) - 10 ))
  step "$name"
  if [ "$left" -lt 20 ]; then record "$name" "skipped: time budget (${BUDGET_S} s) spent" 1; return 0; fi
  [ "$limit" -gt "$left" ] && limit="$left"
  local t0=$(date +%s)
  timeout "$limit" bash -c "$*"  # the section functions are exported (export -f) to this child shell
  local rc=$?
  local took=$(( $(date +%s) - t0 ))
  if [ "$rc" -eq 0 ]; then
    record "$name" "ok (${took} s)" 0
  elif [ "$rc" -eq 124 ]; then
    record "$name" "cut at its ${limit} s limit" 1
  else
    record "$name" "FAILED (exit ${rc}, ${took} s)" 1
  fi
}

versions() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  else
    echo "nvidia-smi: not found"
  fi
  "$PY" - <<'PYEOF'
import importlib.metadata as md, sys
print("python", sys.version.split()[0], sys.executable)
import jax, jaxlib
print("jax", jax.__version__, "jaxlib", jaxlib.__version__, "backend", jax.default_backend())
print("devices", jax.devices())
for dist in ("jax-cuda13-plugin", "jax-cuda12-plugin", "triton", "torch", "haliax", "equinox", "levanter", "tokamax",
             "wandb", "numpy", "transformers"):
    try:
        print(f"{dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"{dist} -")
import null_moe
from null_moe.gmm import resolve_backend
from null_moe.pallas_triton import triton_available
print("import null_moe: ok; pallas triton:", triton_available(), "; auto backend here:", resolve_backend("auto"))
PYEOF
}

# The accelerator tests must run on the GPU: a run where they all skip (no GPU, the CUDA plugin failed to load and
# JAX fell back to CPU) is a failure, except in the tiny CPU run, where skipping is what is expected.
accelerator_tests() {
  local files=() f
  for f in $(grep -l "mark.accelerator" tests/test_*.py 2>/dev/null); do files+=("$f"); done
  echo "files: ${files[*]}"
  local out="$WORK/pytest.log"
  "$PY" -m pytest -q -p no:cacheprovider -m accelerator -rs --durations=10 "${files[@]}" 2>&1 | tee "$out"
  local rc=${PIPESTATUS[0]}
  local tail_line passed skipped
  tail_line="$(grep -E "(passed|skipped|failed|error)" "$out" | tail -1)"
  passed="$(echo "$tail_line" | grep -oE "[0-9]+ passed" | grep -oE "[0-9]+" || echo 0)"
  skipped="$(echo "$tail_line" | grep -oE "[0-9]+ skipped" | grep -oE "[0-9]+" || echo 0)"
  echo "accelerator tests: ${passed:-0} passed, ${skipped:-0} skipped (pytest exit $rc)"
  if [ "$TINY" = "1" ]; then
    [ "$rc" -eq 0 ] || [ "$rc" -eq 5 ]  # on CPU they skip (or none is collected): not a failure of the tiny run
    return
  fi
  [ "$rc" -eq 0 ] && [ "${passed:-0}" -gt 0 ] && [ "${skipped:-0}" -eq 0 ]
}

measure() {
  local args=(scripts/gpu/measure.py --out "$OUT_DIR" --budget-s "$(( BUDGET_S - 150 ))")
  [ "$TINY" = "1" ] && args+=(--tiny)
  # shellcheck disable=SC2206
  args+=(${MEASURE_ARGS:-})
  "$PY" "${args[@]}"
}

torch_peers() {
  local args=(scripts/gpu/torch_peers.py --out "$OUT_DIR")
  [ "$TINY" = "1" ] && args+=(--tiny)
  "$PY" "${args[@]}"
}

train() {
  local config=configs/speedrun/tiny_gpu.yaml extra=()
  if [ "$TINY" = "1" ]; then
    config=configs/speedrun/tiny_cpu.yaml
    # 4 steps of the CPU config; its auto backend (tiled) keeps the CPU run short (the Triton kernels' interpret
    # mode is checked by the tests and the timing section)
    extra=(--trainer.num_train_steps 4 --trainer.steps_per_eval 4 --trainer.max_eval_batches 1 --optimizer.warmup 0.25)
  fi
  (cd "$ROOT" && WANDB_DIR="$WORK" "$PY" -m experiments.speedrun.custom_mixtral --config_path "$config" \
      --trainer.id "device-check-$(date +%s)" --trainer.checkpointer.base_path "$WORK/checkpoints" \
      --trainer.tracker.mode offline "${extra[@]}") 2>&1 | tee "$OUT_DIR/train.log"
  return "${PIPESTATUS[0]}"
}

bench() {
  local args=(-m scripts.bench.bench_null_moe --config_path configs/bench/gpu_check.yaml --out_dir "$WORK/bench"
              --wandb.mode offline)
  if [ "$TINY" = "1" ]; then
    args+=(--shapes '[{tokens: 64, hidden: 32, mlp_dim: 48, experts: 4}, {tokens: 32, hidden: 16, mlp_dim: 32, experts: 4}]'
           --topk_list '[2]' --warmup 1 --iters 2 --backend triton --dtype float32)
  fi
  "$PY" "${args[@]}"
  local rc=$?
  [ -f "$WORK/bench/results.csv" ] && cp "$WORK/bench/results.csv" "$OUT_DIR/bench_results.csv"
  local png
  png="$(ls "$WORK"/bench/tokens_per_s_*.png 2>/dev/null | head -1)"
  [ -n "$png" ] && cp "$png" "$OUT_DIR/bench_tokens_per_s.png"
  return "$rc"
}

# The training corpus, tokenizer and token caches (built locally, offline), prepared on the CPU while the GPU
# sections run; the train section waits for it.
prepare_data() {
  local config=configs/speedrun/tiny_gpu.yaml
  [ "$TINY" = "1" ] && config=configs/speedrun/tiny_cpu.yaml
  JAX_PLATFORMS=cpu "$PY" -c "
import sys
from experiments.speedrun.train import parse_config
from experiments.speedrun.local_data import ensure_local_data
ensure_local_data(parse_config(['--config_path', sys.argv[1]]).data)
print('training data ready')" "$config" > "$WORK/data.log" 2>&1
}

main() {
  step "environment"
  # shellcheck source=scripts/gpu/env.sh
  source "$ROOT/scripts/gpu/env.sh"
  if null_moe_gpu_env; then record environment ok 0; else record environment "FAILED (wheel install)" 1; fi
  if [ "$TINY" = "1" ]; then export JAX_PLATFORMS=cpu; fi
  rm -f "$OUT_DIR/gpu_results.csv" "$OUT_DIR/train.log" "$OUT_DIR/bench_results.csv" "$OUT_DIR/bench_tokens_per_s.png"
  export ROOT OUT_DIR WORK TINY BUDGET_S START
  export MEASURE_ARGS="${MEASURE_ARGS:-}"
  export -f versions accelerator_tests measure torch_peers train bench

  prepare_data &
  local data_pid=$!

  run_section versions 60 versions
  run_section tests 110 accelerator_tests
  run_section measure 200 measure
  run_section torch 70 torch_peers
  wait "$data_pid" || echo "!! preparing the training data failed: $(tail -3 "$WORK/data.log")"
  run_section train 130 train
  run_section bench 110 bench

  step "summary"
  "$PY" scripts/gpu/summary.py "$OUT_DIR" "${SUMMARY_ARGS[@]}" || STATUS=1
  step "done: status $STATUS; files in $OUT_DIR"
  ls -l "$OUT_DIR"
  rm -rf "$WORK"
  return "$STATUS"
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
