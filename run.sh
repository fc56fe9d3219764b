#!/usr/bin/env bash
# One entry point that sets itself up (idempotently) and then runs a job.
#
#   bash run.sh train [ARGS]   the main job: python -m solar.train on ShapesWorld
#   bash run.sh test  [ARGS]   the test suite (what CI runs)
#   bash run.sh bench [ARGS]   the CPU micro-benchmarks (bench/run_all.py)
#   bash run.sh shell CMD...   run CMD inside the prepared environment
#
# Set-up: a virtual env in $SOLAR_VENV (default .venv, created with
# --system-site-packages so that a torch already installed on a GPU box is kept
# as it is); torch==2.13.0+cpu is installed only when no torch is importable
# (the +cpu local version exists only in CPU wheel sources: a local wheel folder, or
# PyTorch's CPU index via PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu;
# where neither is configured pip fails with "no matching distribution" instead of
# pulling a multi-GB CUDA build from PyPI); then the package and its native
# extension are built against that torch (--no-build-isolation, torch pinned by a
# constraint so pip can never resolve another one).  The build re-runs only when setup.py, pyproject.toml or
# csrc/ change.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV=${SOLAR_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
TORCH_CPU_PIN=${SOLAR_TORCH_PIN:-torch==2.13.0+cpu}

log() { echo "[run.sh] $*" >&2; }

setup_core() {
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtual env $VENV"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  fi
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
  if ! python -c "import torch" >/dev/null 2>&1; then
    log "no torch found: installing $TORCH_CPU_PIN (CPU build)"
    pip install -q "$TORCH_CPU_PIN"
  fi
  local tv
  tv=$(python -c "import torch; print(torch.__version__.split('+')[0])")
  local stamp_file="$VENV/.solar-setup-stamp"
  local stamp
  stamp=$( { echo "$tv"; cat pyproject.toml setup.py; find csrc -type f | LC_ALL=C sort | xargs cat; } | sha256sum | cut -d' ' -f1)
  if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] && python -c "import solar_kernels._C" >/dev/null 2>&1; then
    return 0
  fi
  log "installing dependencies and building the extension (torch $tv kept)"
  local cons="$VENV/solar-constraints.txt"
  echo "torch==$tv" > "$cons"
  pip install -q -c "$cons" setuptools wheel pybind11 ninja
  pip install -q -c "$cons" --no-build-isolation -e ".[test,bench,towers]"
  # CLIP's BPE vocabulary (solar.data.tokenizer.clip_tokenizer): only the files of open_clip_torch,
  # never its dependencies (torchvision, timm); solar never imports open_clip
  pip install -q -c "$cons" --no-deps "open_clip_torch==3.3.0"
  echo "$stamp" > "$stamp_file"
}

# The peers the integration tests compare against (solar_kernels/integrations), installed so
# that none of them can bring another torch: open_clip_torch without its dependencies (they
# include torchvision; its loss module needs torch alone), sentence-transformers (+ datasets
# and accelerate for its trainer) under the torch constraint.  Tried once per set of pins
# (stamp); a failure (e.g. no package index) only warns: those tests then skip with the reason.
PEERS="open_clip_torch==3.3.0 sentence-transformers==6.2.0 datasets accelerate"
setup_peers() {
  local stamp_file="$VENV/.solar-peers-stamp"
  if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$PEERS" ]; then
    return 0
  fi
  local cons="$VENV/solar-constraints.txt"
  log "installing the integration tests' peers ($PEERS)"
  pip install -q --no-deps "open_clip_torch==3.3.0" \
    || log "warning: open_clip_torch not installed; the open_clip integration tests will skip"
  pip install -q -c "$cons" "sentence-transformers==6.2.0" datasets accelerate \
    || log "warning: sentence-transformers not installed; its integration tests will skip"
  echo "$PEERS" > "$stamp_file"
}

setup_env() {
  setup_core
  setup_peers
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  train)
    setup_env
    exec python -m solar.train "$@" ;;
  test)
    setup_env
    # nproc-aware: the CI box has 2 cores; the suite is sized for that.
    set +e
    python -m pytest -q "$@"
    rc=$?
    set -e
    # pytest exits 5 when every test was deselected: treat as a failure, CI must run tests.
    exit $rc ;;
  bench)
    setup_env
    exec python bench/run_all.py "$@" ;;
  shell)
    setup_env
    exec "$@" ;;
  *)
    echo "usage: bash run.sh {train|test|bench|shell} [ARGS...]" >&2
    exit 2 ;;
esac
