#!/usr/bin/env bash
# GPU check: one script for a CUDA machine (torch with CUDA, triton, nvcc; no internet).
#
#   OUT=/path/to/results bash bench/gpu_check.sh
#
# 1. builds the extension with the CUDA sources for sm_90 (SOLAR_CUDA_ARCHS to change),
# 2. prints solar_kernels.info,
# 3. runs the GPU test profile (Triton compiled for real, CUDA search kernels, all dtypes),
# 4. runs bench_pool, bench_loss and bench_search at the issues' GPU shapes with the peers
#    in the same run, and writes CSVs plus a markdown summary table.
# Offline wheels (hypothesis, pytest, inf-cl, ...) are installed from $SOLAR_WHEELS
# (default ./wheels) when that folder exists: carry it to the machine.
# Budget: the whole script is sized for <= 8 minutes on an H100; each step has a timeout
# so that a hang in one step still leaves the others' results.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; } >> "$LOG"

python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || { echo "gpu_check: no CUDA device" | tee -a "$LOG"; exit 1; }

WHEELS=${SOLAR_WHEELS:-wheels}
if [ -d "$WHEELS" ]; then
  step "offline wheels from $WHEELS"
  python -m pip install -q --no-index --find-links "$WHEELS" --no-deps "$WHEELS"/*.whl >> "$LOG" 2>&1 || true
fi

step "build (SOLAR_CUDA_ARCHS=${SOLAR_CUDA_ARCHS:-90})"
export SOLAR_CUDA_ARCHS=${SOLAR_CUDA_ARCHS:-90}
export MAX_JOBS=${MAX_JOBS:-16}
timeout 300 python setup.py build_ext --inplace >> "$LOG" 2>&1 || echo "BUILD FAILED" >> "$LOG"

step "info"
PYTHONPATH=. timeout 60 python -m solar_kernels.info >> "$LOG" 2>&1

step "GPU tests (hypothesis profile gpu)"
PYTHONPATH=. SOLAR_HYPOTHESIS_PROFILE=gpu timeout 180 python -m pytest -q -x -p no:cacheprovider \
  tests/test_build.py tests/test_masked_pool.py tests/test_contrastive_loss.py tests/test_search.py \
  >> "$LOG" 2>&1 || echo "GPU TESTS FAILED (rc=$?)" >> "$LOG"

for b in pool loss search; do
  step "bench_$b"
  PYTHONPATH=. timeout 150 python "bench/bench_$b.py" --device cuda --out "$OUT" >> "$LOG" 2>&1 \
    || echo "bench_$b FAILED (rc=$?)" >> "$LOG"
done

step "summary"
python bench/summarize.py "$OUT" > "$OUT/summary.md" 2>> "$LOG"
cat "$OUT/summary.md"
tail -n 40 "$LOG"
