#!/usr/bin/env bash
# The one command to run on a lent GPU machine (no internet, no pip index; torch and triton there):
#   bash benchmarks/gpu_suite.sh OUTDIR [ARTIFACT|--dry]
# ARTIFACT: the wheel `make gpu-artifact` built here (default: the one in dist/gpu/); it is installed
# with `pip install --no-deps --no-index` and its compiled extension is put into this tree, so nothing
# compiles there. Without one (or if it does not install) the extension is compiled there for sm_90,
# which costs minutes. Steps, each under its own time limit (`timeout`) and the whole under
# SUITE_BUDGET seconds (default 470, so it ends within 8 minutes):
#   artifact  install the artifact (or build)           info      python -m sgkernels.info
#   tests     pytest -m cuda -n 4 (the CUDA tests only)  bench_*   python -m benchmarks --device cuda --quick,
#   sanitizer compute-sanitizer memcheck on benchmarks/sanitize_small.py      one op per step, anchors side by side
# Every step's output goes at once (tee) to OUTDIR/suite.log, so whatever a timeout cuts off, all
# before it is there; the benchmark tables are gathered in OUTDIR/RESULTS.md. OUTDIR holds only these
# two files (the device tool returns at most 8). The last line printed is the one-line summary.
# --dry (automatic when no GPU is visible) runs the plumbing on the CPU for CI (tests/test_gpu_suite.py).
set -uo pipefail
OUT=${1:?usage: gpu_suite.sh OUTDIR [ARTIFACT|--dry]}
ARG=${2:-}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/suite.log"
: > "$LOG"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
BUDGET=${SUITE_BUDGET:-470}
T0=$SECONDS
SUMMARY=()
FAILED=0
TMP=$(mktemp -d)

log() { echo "$*" | tee -a "$LOG"; }

# step NAME LIMIT_S CMD...: run CMD under `timeout`, the smaller of LIMIT_S and what is left of the budget.
step() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - (SECONDS - T0)))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$left" -lt 5 ]; then
    log "== $name: skipped, no time left (budget ${BUDGET} s)"; SUMMARY+=("$name=no-time"); FAILED=1; return 0
  fi
  log "== $name (limit ${limit} s, at $((SECONDS - T0)) s): $*"
  local t=$SECONDS
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]} verdict
  case $name:$rc in
    *:0) verdict=ok ;;
    artifact:3) verdict=WARN-stale-or-other-torch; rc=0 ;;  # installed; the log says what differs
    *:124|*:137) verdict=TIMEOUT ;;
    *) verdict="FAIL($rc)" ;;
  esac
  [ $rc = 0 ] || FAILED=1
  log "== $name: $verdict in $((SECONDS - t)) s"
  SUMMARY+=("$name=$verdict")
  return $rc
}

DRY=0
[ "$ARG" = "--dry" ] && DRY=1
# GPU_SUITE_ASSUME_GPU=1: take the GPU path even where no GPU is visible (to check its plumbing).
if [ "$DRY" = 0 ] && [ -z "${GPU_SUITE_ASSUME_GPU:-}" ] && ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  log "gpu_suite: no CUDA device visible: dry run"
  DRY=1
fi
log "gpu_suite: $(date -u +%FT%TZ) ${HOSTNAME:-host} python $($PY -c 'import platform; print(platform.python_version())') budget ${BUDGET} s"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | tee -a "$LOG"

# The benchmark ops, most wanted first: eager step and torch.compile; LLaDA's current step;
# matmul+argmin; F.cross_entropy; the fused linear cross-entropy; then the rest (every other op of
# sgkernels.bench.ops.OPS, diffusers' last).
FIRST="self_guided_step llada_step vq_lookup cross_entropy linear_cross_entropy guided_sample remask_lowest_confidence sampler"
REST=$($PY -c "from sgkernels.bench.ops import OPS; print(*OPS, sep=chr(10))" | grep -v -x -F "$(echo $FIRST amused_step paper_realsize | tr ' ' '\n')")
section() {  # section FILE TITLE: the body of the "## TITLE" section that python -m benchmarks wrote
  $PY -c 'import re, sys; t = open(sys.argv[1]).read(); m = re.search(r"^## " + sys.argv[2] + r"\n(.*?)(?=^## |\Z)", t, re.S | re.M); print(m.group(1).strip() if m else "(no section)")' "$1" "$2"
}
bench() {  # bench OP LIMIT_S [DEVICE]: one op's rows into the log, and its table into OUTDIR/RESULTS.md
  local op=$1 limit=$2 dev=${3:-cuda} title=GPU
  [ "$dev" = cpu ] && title=CPU
  step "bench_$op" "$limit" $PY -m benchmarks --device "$dev" --quick --only "$op" --out "$TMP/$op.md" \
    && printf '## %s (%s)\n\n%s\n\n' "$op" "$title" "$(section "$TMP/$op.md" "$title")" >> "$OUT/RESULTS.md"
}

if [ "$DRY" = 1 ]; then
  log "== artifact, CUDA tests, compute-sanitizer: skipped (dry run)"
  step sources_hash 60 $PY tools/gpu_artifact.py sources-hash
  step coverage 120 $PY benchmarks/sanitize_small.py --coverage
  [ -n "${GPU_SUITE_PROBE_TIMEOUT:-}" ] && step timeout_probe 2 sleep 30
  bench remask_lowest_confidence 300 cpu
else
  ART=$ARG
  [ -z "$ART" ] && ART=$(ls -t dist/gpu/sgkernels-*.whl 2>/dev/null | head -n 1)
  built=0
  if [ -n "$ART" ] && [ -f "$ART" ]; then
    step artifact 60 $PY tools/gpu_artifact.py install "$ART"
    $PY -c "import sgkernels, sys; sys.exit(0 if sgkernels._C.WITH_CUDA else 1)" 2>&1 | tee -a "$LOG" && built=1  # pipefail
  else
    log "== artifact: none given and none in dist/gpu/ (run \`make gpu-artifact\` before the lease)"
  fi
  if [ $built = 0 ]; then
    log "== build: compiling the extension here for sm_90 (minutes)"
    TORCH_CUDA_ARCH_LIST=9.0 SGKERNELS_CUDA=1 MAX_JOBS=16 step build 300 $PY setup.py -q build_ext --inplace
  fi
  step info 60 $PY -m sgkernels.info
  xdist=""; $PY -c "import xdist" 2>/dev/null && xdist="-n 4"
  ptime=""; $PY -c "import pytest_timeout" 2>/dev/null && ptime="--timeout 120"
  step tests 150 $PY -m pytest -m cuda $xdist $ptime -q -p no:cacheprovider -rfE --durations=10 \
    --continue-on-collection-errors tests
  bench self_guided_step 90
  bench llada_step 45
  bench vq_lookup 30
  bench cross_entropy 40
  bench linear_cross_entropy 60
  if command -v compute-sanitizer > /dev/null; then
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 step sanitizer 100 compute-sanitizer --tool memcheck --error-exitcode 1 \
      $PY benchmarks/sanitize_small.py
  else
    log "== sanitizer: compute-sanitizer not found"; SUMMARY+=("sanitizer=missing"); FAILED=1
  fi
  for op in guided_sample remask_lowest_confidence sampler $REST amused_step; do bench "$op" 30; done
  # the paper's model at its real size, end to end, batch 64: float32, bfloat16, bfloat16 + CUDA graphs
  # against the official loop in float32 (issue 25; writes ~1.3 GB of random weights to a temporary folder)
  bench paper_realsize 150
  # end to end: the fused LLaDA2 pipeline (head on the active block; prefix cache) vs diffusers' (issue 20)
  step llada2_e2e 90 $PY -m benchmarks.e2e_llada2_pipeline --device cuda --quick --e2e --no-step --gen 64
fi
rm -rf "$TMP"
log "gpu_suite: $([ $FAILED = 0 ] && echo PASS || echo FAIL) in $((SECONDS - T0)) s: ${SUMMARY[*]}"
exit $FAILED
