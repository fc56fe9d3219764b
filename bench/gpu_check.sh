#!/usr/bin/env bash
# GPU check: one call on a CUDA machine, most information first, at most 8 files in $OUT.
#
#   OUT=/path/to/results bash bench/gpu_check.sh          # on the GPU machine (python3 holds torch)
#   bash bench/gpu_check.sh --dry-run                      # CPU, tiny sizes: the same control flow (CI)
#
# Steps, all under one deadline ($GPU_CHECK_BUDGET s, default 480, from the start; each step's
# `timeout -k` is capped by what is left), each allowed to fail without stopping the others:
#   1. pure-Python wheels the image lacks, from the carried folder $SOLAR_WHEELS (default .whl;
#      bench/fetch_wheels.sh fills it: inf-cl, webdataset, braceexpand), into /tmp/site;
#   2. the C++/CUDA extension built for sm_90 in the background (build.log) while
#   3. the Triton GPU tests run (-n 8, --timeout 120, --maxfail 30, hypothesis profile gpu that
#      does not shrink; junit-triton.xml);
#   4. after the build: the CUDA search and build tests (junit-cuda.xml);
#   5. bench/gpu_suite.py: loss fwd / bwd vs Inf-CL, eager and torch.compile; pooled loss; tile
#      sweep; pool vs copy bandwidth; search vs torch mm + topk; registers / spills (gpu_suite.csv);
#   6. if time is left, compute-sanitizer memcheck of a small search (sanitizer.log);
#   7. summary.md (printed last: the call returns the end of the output).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-480}
[ $DRY = 1 ] && BUDGET=${GPU_CHECK_BUDGET:-240}
DEADLINE=$((START + BUDGET))
OUT=${OUT:-bench/out/gpu}
[ $DRY = 1 ] && OUT=${OUT_DRY:-bench/out/gpu-dry}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_DEFAULT_FP_FUSION=1
step() { echo "=== $* (t+$(( $(date +%s) - START )) s)" | tee -a "$LOG"; }
left() { echo $(( DEADLINE - $(date +%s) )); }
# run STEP_MAX CMD...: CMD under `timeout` capped by the deadline; logs, never aborts the script
run() {
  local max=$1; shift
  local t; t=$(left)
  [ "$t" -gt "$max" ] && t=$max
  if [ "$t" -lt 5 ]; then echo "SKIPPED (deadline): $*" | tee -a "$LOG"; return 124; fi
  timeout -k 10 "$t" "$@" >> "$LOG" 2>&1
  local rc=$?
  [ $rc -ne 0 ] && echo "FAILED rc=$rc: $*" | tee -a "$LOG"
  return $rc
}

if [ $DRY = 0 ]; then
  "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null \
    || { echo "gpu_check: no CUDA device visible to $PY (use --dry-run on CPU)" | tee -a "$LOG"; exit 1; }
  step "device"
  run 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  run 60 "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"

  WHEELS=${SOLAR_WHEELS:-.whl}
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    step "wheels from $WHEELS"
    run 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
      && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  else
    echo "no wheels in $WHEELS: Inf-CL (and webdataset) missing unless the image has them" | tee -a "$LOG"
  fi

  step "build (background, sm_90)"
  ( SOLAR_CUDA_ARCHS=${SOLAR_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-8} timeout -k 10 300 \
      "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; echo "build rc=$?" >> "$OUT/build.log" ) &
  BUILD_PID=$!

  step "Triton GPU tests"
  SOLAR_HYPOTHESIS_PROFILE=gpu run 200 "$PY" -m pytest -q -p no:cacheprovider -n 8 --timeout 120 --maxfail 30 \
    --junitxml "$OUT/junit-triton.xml" tests/kernels/test_cuda_settings.py tests/kernels/test_masked_pool.py tests/kernels/test_contrastive_loss.py

  step "wait for the build"
  wait $BUILD_PID
  tail -n 5 "$OUT/build.log" | tee -a "$LOG"
  run 30 "$PY" -m solar_kernels.info

  step "CUDA search + build tests"
  SOLAR_HYPOTHESIS_PROFILE=gpu run 90 "$PY" -m pytest -q -p no:cacheprovider -n 8 --timeout 120 --maxfail 30 \
    --junitxml "$OUT/junit-cuda.xml" tests/kernels/test_search.py tests/kernels/test_build.py

  step "benchmarks"
  run 400 "$PY" bench/gpu_suite.py --out "$OUT" --deadline $((DEADLINE - 25))

  if [ "$(left)" -gt 40 ] && command -v compute-sanitizer >/dev/null; then
    step "compute-sanitizer memcheck (small search)"
    timeout -k 5 $(( $(left) - 15 )) compute-sanitizer --tool memcheck --error-exitcode 3 "$PY" -c "
import torch, solar_kernels as sk
for dt in ('fp32', 'fp16', 'int8'):
    ix = sk.Index(96, dtype=dt, device='cuda'); ix.add(torch.randn(3001, 96, device='cuda'))
    for m, k in ((1, 10), (17, 100), (130, 1024)):
        ix.search(torch.randn(m, 96, device='cuda'), k=k)
torch.cuda.synchronize(); print('memcheck done')" > "$OUT/sanitizer.log" 2>&1
    echo "compute-sanitizer rc=$? ($(grep -c 'Invalid\|ERROR' "$OUT/sanitizer.log") error lines)" | tee -a "$LOG"
  fi
else
  step "dry run: CPU, tiny sizes (no wheels, no CUDA build, no CUDA tests)"
  TRITON_INTERPRET=1 run 120 "$PY" -m pytest -q -p no:cacheprovider --junitxml "$OUT/junit-triton.xml" \
    tests/kernels/test_cuda_settings.py -k "settings_follow or cuda_blocks_vs_reference"
  step "benchmarks (dry run)"
  run 150 "$PY" bench/gpu_suite.py --dry-run --out "$OUT" --deadline $((DEADLINE - 10))
fi

step "summary"
"$PY" bench/summarize.py "$OUT" > "$OUT/summary.md" 2>> "$LOG"
tail -n 30 "$LOG"
echo
cat "$OUT/summary.md"
echo "gpu_check: done in $(( $(date +%s) - START )) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
