#!/usr/bin/env bash
# The eager Triton launch path under Triton 3.6.0, the release on the GPU machines (.venv has
# 3.8.0): tests/test_triton_launch.py compiles the kernels for sm_90 and checks, through Triton's
# own launch machinery and a stand-in driver, that define_ops's direct launches pick the kernels,
# configs and arguments Triton's autotuner would. The launch path leans on Triton's runtime
# (JITFunction.run's return value, the compiled kernel's launcher, the autotuner's choice), so
# both releases are checked. A third venv (torch as in .venv, the CPU wheel; triton==3.6.0; about
# 2 GB and 30 s the first time, reused afterwards); the in-place build in define_ops/ is imported
# from it, so its torch must be .venv's.
#
#   DEFINE_OPS_TRITON36_VENV   where the venv lives (default ~/.cache/define_ops/venv-triton36)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DEFINE_OPS_TRITON36_VENV:-$HOME/.cache/define_ops/venv-triton36}
if [ ! -x "$VENV/bin/python" ]; then
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV"
fi
TORCH=$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')
PYTEST=$(.venv/bin/python -c 'import pytest; print(pytest.__version__)')
"$VENV/bin/pip" install -q --disable-pip-version-check "torch==$TORCH" triton==3.6.0 numpy "pytest==$PYTEST" 2>&1 \
  | grep -v "is ignored" || true
"$VENV/bin/python" -c 'import triton; assert triton.__version__ == "3.6.0", triton.__version__'
PYTHONPATH="$PWD" "$VENV/bin/python" -m pytest tests/test_triton_launch.py -q -p no:cacheprovider
