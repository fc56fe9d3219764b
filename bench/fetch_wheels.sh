#!/usr/bin/env bash
# Download the pure-Python wheels that bench/gpu_check.sh needs on the offline GPU machine
# (Python 3.12 there) into ./.whl (git-ignored); carry that folder with the call.
# What the GPU image lacks (its package list: the device tool's KINDS.md): inf-cl (the Inf-CL
# peer of the loss benchmark), webdataset and braceexpand (solar's data reader).  Everything
# else the GPU tests need (pytest, xdist, pytest-timeout, hypothesis, numpy, safetensors, tqdm,
# pillow, transformers) is in the image.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl inf-cl webdataset braceexpand
ls -la .whl
