#!/usr/bin/env bash
# Downloads the pure-Python wheels that the GPU machine lacks into wheels/gpu/, for scripts/gpu/device_check.sh.
#
# The GPU machine (Python 3.12, jax 0.11 with CUDA 13) has no network. Its image already holds jax, equinox,
# jaxtyping, wadler-lindig, flax, absl-py, pytest and hypothesis, but not haliax (which null_moe imports) nor
# aqtp (which haliax imports). device_check.sh installs a carried wheel only when its distribution is missing
# there, so extra wheels are harmless.
#
#   bash scripts/gpu/fetch_wheels.sh          # haliax and aqtp (what the image lacks)
#   bash scripts/gpu/fetch_wheels.sh --all    # also equinox, jaxtyping, wadler-lindig, pytest, pluggy, iniconfig
#
# wheels/ is git-ignored (.gitignore): copy wheels/gpu/ to the GPU machine along with the working tree.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEST="$ROOT/wheels/gpu"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3

WHEELS=(
  "haliax==1.4.dev453"
  "aqtp==0.9.0"
)
if [ "${1:-}" = "--all" ]; then
  WHEELS+=(
    "equinox==0.13.8"
    "jaxtyping==0.3.11"
    "wadler-lindig==0.1.8"
    "pytest==8.4.2"
    "pluggy==1.6.0"
    "iniconfig==2.1.0"
  )
fi

mkdir -p "$DEST"
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" "${WHEELS[@]}"
echo "wheels in $DEST:"
ls -l "$DEST"
