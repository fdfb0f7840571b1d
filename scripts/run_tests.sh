#!/usr/bin/env bash
# The whole test suite on the CPU: C++ kernels, the Triton kernels under the interpreter, the
# models, and every benchmark body once in quick mode (timings are never asserted).
set -euo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=1 TRITON_CACHE_DIR="$PWD/.triton-cache"
.venv/bin/ruff check .
.venv/bin/python -m pytest tests/ -q -p no:cacheprovider
.venv/bin/python -m pytest benchmarks/ -q -p no:cacheprovider --benchmark-disable --quick
bash scripts/check_triton36.sh  # the eager Triton launch path under triton 3.6.0 too, the GPU machines' release
bash scripts/check_packaging.sh  # sdist -> wheel -> installed outside the tree, kernels load and match
bash scripts/check_cuda_build.sh  # CUDA kernels: compile + link for sm_80/sm_90 and import (second venv, no GPU)
