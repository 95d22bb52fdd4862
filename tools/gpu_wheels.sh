#!/usr/bin/env bash
# Download the wheels a GPU machine without network needs for tools/gpu_check.sh into .whl/ (git-ignored):
# torchao (train.fp8). Its float8 training is pure Python over torch._scaled_mm; 0.18 loads its own C++ kernels
# only on torch >= 2.11 and works without them.
#   tools/gpu_wheels.sh [PYTHON_VERSION]     # default 3.12 (the H200 image's)
# gpu_check.sh installs whatever .whl/ holds into a scratch prefix before it starts.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-3.12}
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "torchao==0.18.0"
ls -la .whl
