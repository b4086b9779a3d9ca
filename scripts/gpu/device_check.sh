#!/usr/bin/env bash
# The GPU check in one command (scripts/gpu/README.md): versions, the accelerator tests, then the timings.
#
#   bash scripts/gpu/device_check.sh [OUT_DIR]        # default out/gpu; about 6-7 minutes on one H100/H200
#
# Writes OUT_DIR/device_check.log (everything printed), OUT_DIR/gpu_results.csv and OUT_DIR/summary.md.
# Carried wheels (wheels/gpu/*.whl, from scripts/gpu/fetch_wheels.sh) are installed into a private folder for
# the distributions this Python lacks, never over the system's jax. Each step is guarded: a failing step is
# reported and the next one still runs.
#
# Environment: PYTHON (default python3), DEVICE_CHECK_TINY=1 (tiny shapes, CPU smoke run: measure.py --tiny
# --backend tiled), MEASURE_ARGS (extra arguments for measure.py), MEASURE_TIMEOUT_S (default 420),
# PYTEST_TIMEOUT_S (default 240).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
OUT_DIR="${1:-out/gpu}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$OUT_DIR/device_check.log"

PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
START=$(date +%s)
STATUS=0
step() { echo; echo "=== $* (t=$(( $(date +%s) - START )) s) ==="; }

main() {

# --- carried wheels ----------------------------------------------------------------------------------------------
step "wheels"
SITE="${NULL_MOE_SITE:-/tmp/null_moe_site}"
shopt -s nullglob
WHEELS=(wheels/gpu/*.whl)
NEED=()
for whl in "${WHEELS[@]}"; do
  dist="$(basename "$whl" | cut -d- -f1)"
  if have="$("$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$dist" 2>/dev/null)"; then
    echo "present: $dist $have (carried $(basename "$whl") not installed)"
  else
    NEED+=("$whl")
  fi
done
if [ "${#NEED[@]}" -gt 0 ]; then
  echo "installing into $SITE: ${NEED[*]}"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${NEED[@]}"; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "!! wheel install failed"; STATUS=1
  fi
elif [ "${#WHEELS[@]}" -eq 0 ]; then
  echo "no wheels/gpu/*.whl carried (run scripts/gpu/fetch_wheels.sh here and carry wheels/gpu)"
fi
export PYTHONPATH="$ROOT/src:$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# --- versions ----------------------------------------------------------------------------------------------------
step "versions"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
else
  echo "nvidia-smi: not found"
fi
"$PY" - <<'PYEOF' || STATUS=1
import importlib, importlib.metadata as md, sys
print("python", sys.version.split()[0], sys.executable)
import jax, jaxlib
print("jax", jax.__version__, "jaxlib", jaxlib.__version__, "backend", jax.default_backend())
print("devices", jax.devices())
try:
    from jax._src.lib import cuda_versions
    print("cudnn", cuda_versions.cudnn_get_version() if cuda_versions else "n/a (no CUDA plugin)")
    if cuda_versions:
        print("cuda runtime", cuda_versions.cuda_runtime_get_version())
except Exception as err:
    print("cudnn n/a:", err)
for dist in ("jax-cuda13-plugin", "jax-cuda12-plugin", "triton", "haliax", "equinox", "jaxtyping", "aqtp", "flax",
             "pytest", "hypothesis", "tokamax", "numpy"):
    try:
        print(f"{dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"{dist} -")
try:
    import null_moe
    print("import null_moe: ok")
except Exception as err:
    print("import null_moe FAILED:", type(err).__name__, err)
PYEOF

# --- accelerator tests -------------------------------------------------------------------------------------------
step "accelerator tests"
TEST_FILES=(tests/test_triton_gmm.py)
for f in $(grep -l "mark.accelerator" tests/test_*.py 2>/dev/null); do
  [[ " ${TEST_FILES[*]} " == *" $f "* ]] || TEST_FILES+=("$f")
done
echo "files: ${TEST_FILES[*]}"
timeout "${PYTEST_TIMEOUT_S:-240}" "$PY" -m pytest -q -p no:cacheprovider -m accelerator -rs --durations=10 "${TEST_FILES[@]}"
rc=$?
echo "pytest exit code: $rc"
[ "$rc" -eq 0 ] || STATUS=1

# --- timings -----------------------------------------------------------------------------------------------------
step "measure"
MEASURE=(scripts/gpu/measure.py --out "$OUT_DIR")
if [ "${DEVICE_CHECK_TINY:-0}" = "1" ]; then
  MEASURE+=(--tiny --backend tiled)
fi
# shellcheck disable=SC2206
MEASURE+=(${MEASURE_ARGS:-})
timeout "${MEASURE_TIMEOUT_S:-420}" "$PY" "${MEASURE[@]}"
rc=$?
echo "measure exit code: $rc"
[ "$rc" -eq 0 ] || STATUS=1

step "done: status $STATUS; files in $OUT_DIR"
ls -l "$OUT_DIR"
return "$STATUS"
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
