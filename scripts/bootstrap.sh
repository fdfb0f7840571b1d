#!/usr/bin/env bash
# Creates .venv with the pinned toolchain (if missing) and builds define_ops in place against
# that venv's torch (--no-build-isolation: never a second torch, see setup.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -r requirements-dev.txt 2>&1 | grep -v "is ignored" || true
MAX_JOBS=${MAX_JOBS:-2} .venv/bin/pip install -q --disable-pip-version-check --no-build-isolation -e . 2>&1 \
  | grep -v "is ignored" || true
.venv/bin/python -c "import define_ops; print('define_ops', define_ops.__version__, 'backends:', define_ops.available_backends())"
