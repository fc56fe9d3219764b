#!/usr/bin/env bash
# Download the pure-Python wheels that bench/gpu_check.sh needs on an offline GPU machine
# (test runner, hypothesis, the Inf-CL peer) into ./wheels (git-ignored; carry it along).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p wheels
python -m pip download -q --no-deps -d wheels inf-cl hypothesis sortedcontainers attrs pytest pluggy iniconfig packaging
ls wheels
