#!/usr/bin/env bash
# Downloads the wheels that the GPU machine's image lacks into wheels/gpu/, for scripts/gpu/device_check.sh and
# scripts/gpu/quality_check.sh: the core (haliax and what it imports), and everything the training CLI and the
# bench import through Levanter (levanter, draccus, wandb, datasets, ...), pinned to the versions this project
# ran on jax 0.11.2 (Python 3.12). The image already has jax 0.11.2, torch, transformers, tokenizers, optax, flax,
# chex, equinox, jaxtyping, tensorstore, fsspec, rich, pyarrow, pandas, aiohttp, pytest and hypothesis.
#
# Not fetched: Ray (its wheel alone is about 79 MB, more than can be carried). Levanter imports it at module
# level but the project never starts a Ray cluster (token caches are built locally), so the check installs the
# import-only stand-in (scripts/gpu/stubs/ray) where `import ray` fails; any real Ray call raises there.
# Nor the Google Cloud client libraries (wandb and Levanter import them only for gs:// paths, inside try).
#
#   bash scripts/gpu/fetch_wheels.sh          # into wheels/gpu/ (git-ignored); prints the total size
#
# The whole folder must stay under 60 MiB: what travels to the GPU machine is at most 64 MiB with the repo.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEST="${WHEELS_DIR:-$ROOT/wheels/gpu}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
LIMIT_MIB=60

WHEELS=(
  # the core: haliax (aqtp is imported by it)
  "haliax==1.4.dev453" "aqtp==0.9.0"
  # training and the bench: Levanter and what it imports that the image lacks
  "levanter==1.2.dev1644" "draccus==0.11.6" "mergedeep==1.3.4" "toml==0.10.2"
  "wandb==0.31.0" "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" "typing-inspection==0.4.5"
  "platformdirs==4.14.9" "gitpython==3.2.1" "gitdb==4.0.12" "smmap==5.0.3"
  "opentelemetry-api==1.45.2" "opentelemetry-sdk==1.45.2" "opentelemetry-proto==1.45.2"
  "opentelemetry-semantic-conventions==0.66b2" "opentelemetry-exporter-otlp-proto-http==1.45.2"
  "opentelemetry-exporter-otlp-proto-common==1.45.2" "opentelemetry-exporter-http-transport==0.66b2"
  "opentelemetry-exporter-otlp-common==0.66b2" "opentelemetry-exporter-prometheus==0.66b2"
  "googleapis-common-protos==1.76.0" "prometheus-client==0.26.0"
  "datasets==4.8.5" "dill==0.4.1" "multiprocess==0.70.19"
  "dataclasses-json==0.6.7" "marshmallow==3.26.2" "deepdiff==9.1.0" "orderly-set==5.5.0"
  "jmp==0.0.4" "pytimeparse==1.1.10" "braceexpand==0.1.7" "tblib==3.2.2" "humanfriendly==10.0"
  "async-lru==2.4.0" "tqdm-loggable==0.4.1" "cachebox==5.2.3" "zstandard==0.25.0"
  # the GPU check's peer: tokamax's grouped matmul (its xprof import gets the stand-in in scripts/gpu/stubs)
  "tokamax==0.0.17" "einshape==1.0" "immutabledict==4.3.1" "qwix==0.1.8" "tensorboardx==2.6.5"
)

mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${WHEELS[@]}" 2>&1 | grep -v "is ignored" || true
missing=0
for spec in "${WHEELS[@]}"; do
  name="${spec%%==*}"; ver="${spec##*==}"
  pat="$(echo "$name" | tr '-' '_')"
  if ! ls "$DEST" | grep -iqE "^${pat}-${ver}[-.]"; then echo "MISSING: $spec"; missing=1; fi
done
total_kib=$(du -sk "$DEST" | cut -f1)
echo "wheels in $DEST: $(ls "$DEST" | wc -l) files, $((total_kib / 1024)) MiB"
if [ $((total_kib / 1024)) -ge "$LIMIT_MIB" ]; then echo "error: wheels/gpu is over ${LIMIT_MIB} MiB"; exit 1; fi
exit "$missing"
