#!/usr/bin/env bash
# Creates .venv at the repo root on first use and installs the package with its test extras.
# Re-running is cheap: a stamp file records the pyproject.toml it was installed from.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.null_moe_installed"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
if [ ! -f "$STAMP" ] || ! cmp -s "$ROOT/pyproject.toml" "$STAMP"; then
  "$VENV/bin/pip" install -q -e "$ROOT[test]"
  cp "$ROOT/pyproject.toml" "$STAMP"
fi
