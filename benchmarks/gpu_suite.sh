#!/usr/bin/env bash
# Every GPU check and benchmark in one go, on the GPU image as it is (torch 2.11, triton 3.6, no
# DALI): installs nothing. The package is imported through PYTHONPATH from a symlink tree
# (reca/ -> reca, reca/engine -> engine, ...: the layout setup.py installs), so no pip is needed.
#   bash benchmarks/gpu_suite.sh            # JSON under $OUT when set, else benchmarks/results/
#   bash benchmarks/gpu_suite.sh --dry-run  # only check that the imports resolve (CI runs this)
#   bash benchmarks/gpu_suite.sh step_harmon batch   # only these stages (names: see `stage` below)
# Budget: under 9 minutes (each stage has its own timeout; a failed stage is reported, the rest run).
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$(command -v python3 || command -v python)}"  # the GPU image's torch is python3's
export PYTHONUNBUFFERED=1
# With $OUT (the device tool brings back at most 8 files from it): results gather in a temporary
# folder, packed into $OUT/gpu_suite.tar.gz after EVERY stage, and the whole output goes to
# $OUT/suite.log as it is printed; a call killed at its limit still returns what finished.
if [ -n "${OUT:-}" ]; then
  RES="$(mktemp -d)/suite"
  exec > >(tee -a "$OUT/suite.log") 2>&1
else
  RES="$ROOT/benchmarks/results"
fi
mkdir -p "$RES"
pack() {
  [ -n "${OUT:-}" ] || return 0
  cp "$ROOT"/benchmarks/results/*.json "$RES"/ 2>/dev/null || true  # the kernel scripts write there
  tar czf "$OUT/gpu_suite.tar.gz.part" -C "$RES" . && mv -f "$OUT/gpu_suite.tar.gz.part" "$OUT/gpu_suite.tar.gz"
}
SHIM="$(mktemp -d)/py"
mkdir -p "$SHIM/reca"
ln -s "$ROOT/reca/__init__.py" "$SHIM/reca/__init__.py"
for part in engine kernels models; do ln -s "$ROOT/$part" "$SHIM/reca/$part"; done
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
# Pure-Python wheels the GPU image lacks (Liger-Kernel for the linear cross-entropy baseline),
# unpacked here and carried to the device as an ignored path: see benchmarks/results/PENDING.md.
if [ -d "$ROOT/.gpu_deps" ]; then export PYTHONPATH="$PYTHONPATH:$ROOT/.gpu_deps"; fi
# Run from the shim: `python -m` and `python -c` put the working directory first on sys.path,
# and the checkout's own reca/ (the lazy API alone) would hide the shim's reca.engine. Tests and
# scripts are named by absolute path.
cd "$SHIM"
"$PY" -c "
import sys, torch, reca.engine
where = reca.engine.__file__  # through the shim, as on a machine where nothing is installed
print('reca from', where, '| torch', torch.__version__, '| cuda', torch.cuda.is_available())
sys.exit(0 if where.startswith('$SHIM/') else 'reca.engine is not imported through the shim')
" || exit 1
if [[ " $* " == *" --dry-run "* ]]; then echo "dry run: imports resolve; no stage run"; exit 0; fi
nvidia-smi -L || true

failed=()
# Stages named on the command line run alone (all of them by default), so that a session whose
# device call is cut short can finish the rest in a second call: e.g. `... gpu_suite.sh step_harmon batch`.
want() { [ ${#STAGES[@]} -eq 0 ] || [[ " ${STAGES[*]} " == *" $1 "* ]]; }
STAGES=()
for a in "$@"; do [ "$a" = "--dry-run" ] || STAGES+=("$a"); done
stage() {  # stage NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  want "$name" || return 0
  echo "=== $name ($(date +%T), limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$RES/log_$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $((SECONDS - t0))s"
  [ "$rc" -eq 0 ] || failed+=("$name(rc=$rc)")
  pack
}
# Triton and Inductor compile on the CPU: 4 test processes share the GPU (pytest-xdist, carried).
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 4)
CORPUS=/tmp/reca_corpus
# a named data or step stage brings the corpus stage along when the corpus is not there yet
if [ ${#STAGES[@]} -gt 0 ] && [ ! -d "$CORPUS" ] && ! want corpus && { want data || want step_tiny || want step_harmon || want step_harmon_mix; }; then
  STAGES+=(corpus)
fi

# In order of what matters most, should a call be cut at its limit: correctness, the headline step
# figure (harmon-1.5b: the largest preset that trains on one H100; flow-7b's 7.1B trainable weights
# with fp32 AdamW states need ~113 GB), the kernels, the data path, the largest batch, the rest.
stage gpu_tests 240 "$PY" -m pytest "$ROOT/tests" -m gpu -q -p no:cacheprovider -rfE "${XDIST[@]}"
stage corpus 40 "$PY" "$ROOT/benchmarks/data/make_corpus.py" "$CORPUS" --n 300 --side 1024 --captions
stage step_harmon 210 "$PY" -m reca.engine bench step --preset harmon-1.5b --batch 8 --steps 5 --warmup 5 \
  --profile 2 --data "$CORPUS" --out "$RES"
stage kernels 120 "$PY" "$ROOT/benchmarks/kernels/run_all.py"
stage data 50 "$PY" "$ROOT/benchmarks/data/bench_decode.py" "$CORPUS" --batch 64 --batches 4 --out "$RES"
stage batch 90 "$PY" -m reca.engine bench batch --preset harmon-1.5b --start 8 --max 48 --out "$RES"
stage step_tiny 60 "$PY" -m reca.engine bench step --preset tiny --steps 20 --warmup 6 --data "$CORPUS" --out "$RES"
# The published recipe itself: 2 RecA : 2 captioning micro-batches (FLOPs by FlopCounterMode).
stage step_harmon_mix 120 "$PY" -m reca.engine bench step --preset harmon-1.5b --batch 8 --steps 4 --warmup 4 \
  --modes fast --data "$CORPUS" --set mix.caption_source="$CORPUS" --out "$RES/step_harmon-1.5b_mix.json"
pack
if [ -n "${OUT:-}" ]; then where="$OUT/gpu_suite.tar.gz"; else where="$RES"; fi
echo "=== suite done in ${SECONDS}s; results in $where"
if [ ${#failed[@]} -gt 0 ]; then echo "FAILED: ${failed[*]}"; exit 1; fi
