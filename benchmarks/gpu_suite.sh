#!/usr/bin/env bash
# The one command to run on a lent GPU machine (no internet; torch and triton preinstalled):
#   bash benchmarks/gpu_suite.sh OUTDIR [--dry]
# 1. builds and installs sgkernels (--no-build-isolation --no-deps), 2. runs the test suite with the
# CUDA tests, 3. runs compute-sanitizer memcheck on small runs of every CUDA and Triton kernel,
# 4. runs the benchmarks, 5. writes logs and RESULTS.md into OUTDIR (and benchmarks/RESULTS.md).
# --dry (automatic when no GPU is visible) skips the CUDA steps and runs a quick CPU benchmark, so
# the plumbing is tested in CI.
set -uo pipefail
OUT=${1:?usage: gpu_suite.sh OUTDIR [--dry]}
DRY=0
[ "${2:-}" = "--dry" ] && DRY=1
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
PY=${PYTHON:-python}
if [ "$DRY" = 0 ] && ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_suite: no CUDA device visible: dry run" | tee -a "$OUT/suite.log"
  DRY=1
fi
status=0
step() {  # step NAME CMD...: run, log to OUTDIR/NAME.log, remember failures
  local name=$1; shift
  echo "== $name: $*" | tee -a "$OUT/suite.log"
  local t0=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$OUT/suite.log"
  tail -n 5 "$OUT/$name.log" | sed 's/^/   /' | tee -a "$OUT/suite.log"
  [ $rc = 0 ] || status=1
}
if [ "$DRY" = 1 ]; then
  echo "== install, CUDA tests, compute-sanitizer: skipped (dry run)" | tee -a "$OUT/suite.log"
  step bench $PY -m benchmarks --device cpu --quick --only remask_lowest_confidence --out "$OUT/RESULTS.md"
else
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"}
  step install $PY -m pip install --no-build-isolation --no-deps -e .
  step info $PY -m sgkernels.info
  step tests $PY -m pytest -q -x
  if command -v compute-sanitizer > /dev/null; then
    step sanitizer compute-sanitizer --tool memcheck --error-exitcode 1 $PY benchmarks/sanitize_small.py
  else
    echo "== sanitizer: compute-sanitizer not found" | tee -a "$OUT/suite.log"; status=1
  fi
  step bench $PY -m benchmarks --device cuda
  cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
fi
echo "gpu_suite: done, status $status; logs in $OUT" | tee -a "$OUT/suite.log"
exit $status
