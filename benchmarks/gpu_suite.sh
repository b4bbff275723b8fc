#!/usr/bin/env bash
# Every GPU check and benchmark, in two device calls, on the GPU image as it is (torch 2.11,
# triton 3.6, no DALI): installs nothing. The package is imported in place through
# PYTHONPATH=src (src/reca's __init__s reach engine/, kernels/, models/).
#   bash benchmarks/gpu_suite.sh              # call 1: every GPU test and the headline figures
#   bash benchmarks/gpu_suite.sh --call 2     # call 2 (optional): the other figures
#   bash benchmarks/gpu_suite.sh --call all   # both, one after the other
#   bash benchmarks/gpu_suite.sh step_harmon data   # only these stages (any call), in suite order
#   bash benchmarks/gpu_suite.sh --call 2 --budget 240   # the stages whose limits fit in 240 s
#   bash benchmarks/gpu_suite.sh --plan       # stages, calls and limits; runs nothing, needs no python
#   bash benchmarks/gpu_suite.sh --dry-run    # only check that the imports resolve (CI runs this)
# A lent GPU gives a session 15 minutes of device time, the machine's start (1-2 min) included,
# and at most 10 minutes per call: call 1's stage limits add up to at most CALL1_LIMIT (8 min),
# so every GPU test and the headline figures (the harmon-1.5b step, fast vs reference with MFU
# and its profile; the kernels against torch eager; the decode figure) come back from one call.
# Each stage has its own timeout; a failed or cut stage is reported and the rest run.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CALL1_LIMIT=480  # seconds: call 1's stage limits add up to at most this (checked by --plan and CI)
CALL_LIMIT=600   # the device's limit on one call

die() { echo "gpu_suite: error: $*" >&2; exit 2; }
CALL=1 PLAN=0 DRY=0 BUDGET=0 NAMED=()
while [ $# -gt 0 ]; do
  case "$1" in
    --plan) PLAN=1 ;;
    --dry-run) DRY=1 ;;
    --call) [ $# -ge 2 ] || die "--call needs 1, 2 or all"; CALL=$2; shift ;;
    --budget) [ $# -ge 2 ] || die "--budget needs seconds"; BUDGET=$2; shift ;;
    -*) die "unknown option $1" ;;
    *) NAMED+=("$1") ;;
  esac
  shift
done
case "$CALL" in 1|2|all) ;; *) die "--call must be 1, 2 or all, got '$CALL'" ;; esac
[[ "$BUDGET" =~ ^[0-9]+$ ]] || die "--budget must be whole seconds, got '$BUDGET'"

CORPUS=/tmp/reca_corpus
# Call 1's tests: the kernels, the training step (CUDA graph == eager, no host sync, fast vs
# reference) and the GPU decoders; call 2 runs every other test marked gpu.
CALL1_TESTS=("$ROOT/tests/kernels" "$ROOT/tests/test_step.py" "$ROOT/tests/test_data_dali.py")
IGNORE=()
for t in "${CALL1_TESTS[@]}"; do IGNORE+=("--ignore=$t"); done
XDIST=() RES=""  # set for the run below; pass 1 only reads the table
if [ "$PLAN" -eq 1 ]; then
  PY=python3 RES='$RESULTS' XDIST=(-n 6)
else
  PY="${PYTHON:-$(command -v python3 || command -v python)}"  # the GPU image's torch is python3's
fi

# Commands of more than one step, as functions (exported: each stage runs in `bash -c`).
corpus_once() {  # 300 JPEGs ~1024 px with captions, 16 processes; a cut one is made again
  rm -rf "$CORPUS" && "$PY" "$ROOT/benchmarks/data/make_corpus.py" "$CORPUS" --n 300 --side 1024 --captions \
    --jobs 0 && touch "$CORPUS/.complete"
}
gpu_tests_rest() {  # every gpu test outside call 1's files; pytest's 5 (none collected) is fine
  # shellcheck disable=SC2086  # the exported lists split on spaces (no path here has one)
  "$PY" -m pytest "$ROOT/tests" $IGNORE_S -m gpu -q -p no:cacheprovider -rfE $XDIST_S
  local rc=$?; return $((rc == 5 ? 0 : rc))
}
kernels_with_compile() {  # run_all's JSONs again, now with torch.compile rows; the DDPM loss in fp32
  "$PY" "$ROOT/benchmarks/kernels/run_all.py" && "$PY" "$ROOT/benchmarks/kernels/bench_ddpm.py" \
    --dtype float32 --no-compile --out "$RES/kernels_ddpm_loss_float32.json"
}

# The stages, in the order they run. `stage NAME CALLS LIMIT CMD...`: NAME runs in device call(s)
# CALLS, killed after LIMIT seconds. Each call puts first what matters most should it be cut:
# correctness, the headline step figure (harmon-1.5b: the largest preset that trains on one H100;
# flow-7b's 7.1B trainable weights with fp32 AdamW states need ~113 GB), kernels, data.
stages() {
  # Triton and Inductor compile on the CPU (16 cores there): 6 test processes share the GPU.
  stage gpu_tests 1 145 "$PY" -m pytest "${CALL1_TESTS[@]}" -m gpu -q -p no:cacheprovider -rfE "${XDIST[@]}"
  stage corpus 1,2 20 corpus_once  # skipped on a machine that has it
  # compile on the first warm-up step, 3 graph warm-ups, capture on the 4th: the timed steps replay
  stage step_harmon 1 175 "$PY" -m reca.engine bench step --preset harmon-1.5b --batch 8 --steps 4 --warmup 4 \
    --profile 2 --data "$CORPUS" --out "$RES"
  # Triton vs torch eager (the reference) at the families' shapes; torch.compile's in call 2
  stage kernels 1 80 "$PY" "$ROOT/benchmarks/kernels/run_all.py" --no-compile
  stage data 1 40 "$PY" "$ROOT/benchmarks/data/bench_decode.py" "$CORPUS" --batch 64 --batches 4 --out "$RES"

  stage gpu_tests_rest 2 60 gpu_tests_rest
  stage step_tiny 2 60 "$PY" -m reca.engine bench step --preset tiny --steps 20 --warmup 6 --data "$CORPUS" --out "$RES"
  # the published recipe itself: 2 RecA : 2 captioning micro-batches (FLOPs by FlopCounterMode)
  stage step_harmon_mix 2 120 "$PY" -m reca.engine bench step --preset harmon-1.5b --batch 8 --steps 4 --warmup 4 \
    --modes fast --data "$CORPUS" --set mix.caption_source="$CORPUS" --out "$RES/step_harmon-1.5b_mix.json"
  stage batch 2 80 "$PY" -m reca.engine bench batch --preset harmon-1.5b --start 8 --max 48 --out "$RES"
  stage kernels_compile 2 180 kernels_with_compile
}

# ---- pass 1: the table (names, calls, limits), for --plan, name checks and --budget
NAMES=() CALLS=() LIMITS=() CMDS=()
stage() { NAMES+=("$1"); CALLS+=("$2"); LIMITS+=("$3"); shift 3; CMDS+=("$*"); }
stages
is_stage() { local n; for n in "${NAMES[@]}"; do [ "$n" = "$1" ] && return 0; done; return 1; }
for n in "${NAMED[@]}"; do is_stage "$n" || die "unknown stage '$n' (bash benchmarks/gpu_suite.sh --plan lists them)"; done
in_call() { [[ ",$2," == *",$1,"* ]]; }  # in_call CALL CALLS
call_sum() { local i s=0; for i in "${!NAMES[@]}"; do in_call "$1" "${CALLS[$i]}" && s=$((s + LIMITS[$i])); done; echo $s; }

if [ "$PLAN" -eq 1 ]; then
  for c in 1 2; do
    echo "call $c:"
    for i in "${!NAMES[@]}"; do
      in_call "$c" "${CALLS[$i]}" && printf '  %-16s %4ss  %s\n' "${NAMES[$i]}" "${LIMITS[$i]}" "${CMDS[$i]}"
    done
  done
  s1=$(call_sum 1) s2=$(call_sum 2)
  echo "call 1 total: ${s1}s of stage limits (at most ${CALL1_LIMIT}s)"
  echo "call 2 total: ${s2}s of stage limits (at most ${CALL_LIMIT}s; corpus is skipped on a machine that has it)"
  echo "not counted: the machine's start (1-2 min), the import check and packing (~15 s per call)"
  echo "where:"
  for f in corpus_once gpu_tests_rest kernels_with_compile; do declare -f "$f" | sed -e '2d;$d'; done
  [ "$s1" -le "$CALL1_LIMIT" ] && [ "$s2" -le "$CALL_LIMIT" ] || { echo "gpu_suite: error: a call is over its limit" >&2; exit 1; }
  exit 0
fi

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
# reca from the checkout in place (src/reca's __init__s extend their __path__ to engine/,
# kernels/, models/: see reca._folder), as on a machine where nothing can be installed.
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
# Pure-Python wheels the GPU image lacks (Liger-Kernel for the linear cross-entropy baseline),
# unpacked here and carried to the device as an ignored path: see benchmarks/results/PENDING.md.
if [ -d "$ROOT/.gpu_deps" ]; then export PYTHONPATH="$PYTHONPATH:$ROOT/.gpu_deps"; fi
# Any working directory will do (the checkout root shadows nothing); tests and scripts are named
# by absolute path.
cd "$ROOT"
"$PY" -c "
import sys, torch, reca.engine.cli
where = reca.engine.cli.__file__  # the checkout's own file, not some installed reca
print('reca from', where, '| torch', torch.__version__, '| cuda', torch.cuda.is_available())
sys.exit(0 if where == '$ROOT/engine/cli.py' else 'reca.engine is not imported from the checkout')
" || exit 1
if [ "$DRY" -eq 1 ]; then echo "dry run: imports resolve; no stage run"; exit 0; fi
nvidia-smi -L || true
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 6)
# what the stage functions read in their `bash -c` (arrays do not export: they travel as strings)
export PY ROOT RES CORPUS IGNORE_S="${IGNORE[*]}" XDIST_S="${XDIST[*]}"
export -f corpus_once gpu_tests_rest kernels_with_compile

# ---- pass 2: run the chosen stages
want() {  # want NAME CALLS: named stages alone; else those of the call
  if [ ${#NAMED[@]} -gt 0 ]; then [[ " ${NAMED[*]} " == *" $1 "* ]]; else [ "$CALL" = all ] || in_call "$CALL" "$2"; fi
}
needs_corpus() { case "$1" in step_harmon|step_harmon_mix|step_tiny|data) return 0 ;; *) return 1 ;; esac; }
failed=() skipped=() spent=0 CORPUS_STAGE=()
stage() {
  local name=$1 calls=$2 limit=$3; shift 3
  if [ "$name" = corpus ]; then
    CORPUS_STAGE=("$limit" "$@")  # brought along by a stage that needs it (named runs, --budget)
    [ -f "$CORPUS/.complete" ] && { want corpus "$calls" && echo "=== corpus: $CORPUS is there"; return 0; }
  fi
  want "$name" "$calls" || return 0
  if needs_corpus "$name" && [ ! -f "$CORPUS/.complete" ]; then
    run_stage corpus "${CORPUS_STAGE[@]}"
    [ -f "$CORPUS/.complete" ] || { failed+=("$name(no corpus)"); return 0; }
  fi
  run_stage "$name" "$limit" "$@"
}
run_stage() {  # run_stage NAME LIMIT CMD...: within --budget (limits add up), else not run
  local name=$1 limit=$2; shift 2
  if [ "$BUDGET" -gt 0 ] && [ $((spent + limit)) -gt "$BUDGET" ]; then skipped+=("$name"); return 1; fi
  spent=$((spent + limit))
  echo "=== $name ($(date +%T), limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" bash -c '"$@"' "$name" "$@" 2>&1 | tee "$RES/log_$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $((SECONDS - t0))s"
  [ "$rc" -eq 0 ] || failed+=("$name(rc=$rc)")
  pack
  return "$rc"
}
stages
pack
if [ -n "${OUT:-}" ]; then where="$OUT/gpu_suite.tar.gz"; else where="$RES"; fi
echo "=== suite done in ${SECONDS}s; results in $where"
[ ${#skipped[@]} -eq 0 ] || echo "NOT RUN (over --budget $BUDGET s): ${skipped[*]}"
if [ ${#failed[@]} -gt 0 ]; then echo "FAILED: ${failed[*]}"; exit 1; fi
