# Sourced by the GPU scripts (device_check.sh, quality_check.sh): the Python environment on the GPU machine.
#
#   source scripts/gpu/env.sh && null_moe_gpu_env     # then "$PY" runs with what the check needs
#
# - Carried wheels (wheels/gpu/*.whl, from scripts/gpu/fetch_wheels.sh) whose distribution this Python lacks are
#   installed into $NULL_MOE_SITE (default /tmp/null_moe_site), never over the image's own packages (its jax).
# - The import-only stand-ins in scripts/gpu/stubs (ray, xprof) are added only where `import ray` / `import xprof`
#   fails; any real use of them raises.
# - PYTHONPATH puts that folder, then the repository's src/ and root, first; W&B offline; nothing reaches the
#   network (HF_HUB_OFFLINE); JAX allocates GPU memory as it goes (XLA_PYTHON_CLIENT_PREALLOCATE=false), so a
#   PyTorch peer in another process of the same check finds memory.
# Prints one line per decision. Sets PY (default: python3) and NULL_MOE_ROOT.

null_moe_gpu_env() {
  NULL_MOE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
  PY="${PYTHON:-python3}"
  export PY NULL_MOE_ROOT
  local status=0
  local site="${NULL_MOE_SITE:-/tmp/null_moe_site}"
  local need=() whl dist have
  shopt -s nullglob
  local wheels=("$NULL_MOE_ROOT"/wheels/gpu/*.whl)
  shopt -u nullglob
  for whl in "${wheels[@]}"; do
    dist="$(basename "$whl" | cut -d- -f1)"
    if have="$("$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$dist" 2>/dev/null)"; then
      echo "present: $dist $have (carried $(basename "$whl") not installed)"
    else
      need+=("$whl")
    fi
  done
  mkdir -p "$site"
  if [ "${#need[@]}" -gt 0 ]; then
    echo "installing ${#need[@]} carried wheels into $site"
    # --ignore-requires-python: a wheel this Python cannot use (tokamax needs 3.12) must not stop the others
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --ignore-requires-python \
        --target "$site" "${need[@]}"; then
      echo "!! wheel install failed"
      status=1
    fi
  elif [ "${#wheels[@]}" -eq 0 ]; then
    echo "no wheels/gpu/*.whl carried (run scripts/gpu/fetch_wheels.sh where PyPI is reachable, carry wheels/gpu)"
  fi
  export PYTHONPATH="$site:$NULL_MOE_ROOT/src:$NULL_MOE_ROOT${PYTHONPATH:+:$PYTHONPATH}"
  local stub
  for stub in ray xprof; do
    if "$PY" -c "import $stub" >/dev/null 2>&1; then
      echo "present: $stub (no stand-in)"
    else
      rm -rf "${site:?}/$stub"
      cp -r "$NULL_MOE_ROOT/scripts/gpu/stubs/$stub" "$site/$stub"
      echo "stand-in: $stub (import-only, scripts/gpu/stubs/$stub)"
    fi
  done
  export PYTHONUNBUFFERED=1
  export WANDB_MODE="${WANDB_MODE:-offline}" WANDB_SILENT="${WANDB_SILENT:-true}"
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
  export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
  return "$status"
}
