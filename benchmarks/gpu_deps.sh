#!/usr/bin/env bash
# Builds .gpu_deps/: the pure-Python wheels the GPU image lacks and cannot download (it has no
# package index), unpacked so that benchmarks/gpu_suite.sh can put the folder on PYTHONPATH.
# Run it here (on a machine with the index); the device run then passes carry=[".gpu_deps"].
#   liger-kernel   the linear cross-entropy baseline (benchmarks/kernels/bench_linear_ce.py)
#   pytest, pytest-xdist and their pure-Python dependencies: the gpu tests, 4 processes at once
# gpu_suite.sh appends the folder to PYTHONPATH, so what the image has itself comes first.
set -eu
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
TMP="$(mktemp -d)"
"$PY" -m pip download -q --disable-pip-version-check --only-binary :all: --no-deps -d "$TMP" \
  liger-kernel==0.8.5 pytest==9.0.2 pluggy==1.6.0 iniconfig==2.3.0 packaging==25.0 pygments==2.19.2 \
  pytest-xdist==3.8.0 execnet==2.1.2
rm -rf "$ROOT/.gpu_deps" && mkdir -p "$ROOT/.gpu_deps"
for whl in "$TMP"/*.whl; do "$PY" -m zipfile -e "$whl" "$ROOT/.gpu_deps"; done
rm -rf "$TMP"
du -sh "$ROOT/.gpu_deps"
