#!/usr/bin/env bash
# CI without a GPU: compile and link the CUDA kernels for sm_80 and sm_90 and import them, so a
# kernel that does not build never lands. Needs a CUDA build of torch, so it uses a second venv
# (torch==2.14.1 cu130: ~45 s and 5.5 GB the first time, reused afterwards) and the system nvcc
# (shared docs build_env.md §4). The build happens in a scratch copy of the sources and installs
# into that venv only: the CPU build in .venv is never touched. Measured on the 2-core CI-kind
# machine (shared with other sessions, load average 3-6): 4 min 39 s wall, 2 min 51 s of CPU, with
# the venv already there; creating it adds about 90 s once per machine.
#
#   DEFINE_OPS_CUDA_VENV   where the venv lives (default ~/.cache/define_ops/venv-cuda)
#   DEFINE_OPS_CUDA_TORCH  the torch release it builds against (default 2.14.1, on this machine's disk;
#                          2.11.0, the GPU machines' release, comes from PyPI: build against it before
#                          a GPU session, with a venv of its own)
#   TORCH_CUDA_ARCH_LIST   default "8.0;9.0"
#   MAX_JOBS               default 2
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
START=$(date +%s)
ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
VENV=${DEFINE_OPS_CUDA_VENV:-$HOME/.cache/define_ops/venv-cuda}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "check_cuda_build: no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME)" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --disable-pip-version-check "torch==${DEFINE_OPS_CUDA_TORCH:-2.14.1}" setuptools wheel 2>&1 | grep -v "is ignored" || true
NV_INCLUDE=$("$VENV/bin/python" -c 'import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13", "include"))')

SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
# Only what the build reads; never the in-place CPU build products.
tar -C "$ROOT" --exclude='__pycache__' --exclude='*.so' -cf - setup.py pyproject.toml README.md csrc define_ops \
  | tar -C "$SCRATCH" -xf -
(
  cd "$SCRATCH"
  CUDA_HOME=$CUDA_HOME CUDA_INC_PATH=$NV_INCLUDE TORCH_CUDA_ARCH_LIST=$ARCH_LIST \
    MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/pip" install -q --disable-pip-version-check --no-build-isolation --no-deps \
    --no-cache-dir . 2>&1 | grep -v "is ignored" || true
)
# From here on, run Python outside the source tree, so the installed package is what loads.
cd "$SCRATCH"
rm -rf define_ops
SO=$("$VENV/bin/python" -c 'import importlib.util as u; print(u.find_spec("define_ops._C").origin)' 2>/dev/null || true)
if [ -z "$SO" ] || [ ! -f "$SO" ]; then
  echo "check_cuda_build: the CUDA build produced no define_ops._C" >&2
  exit 1
fi
# cuobjdump: the toolkit's, else the copy triton ships inside the venv.
CUOBJDUMP=$CUDA_HOME/bin/cuobjdump
[ -x "$CUOBJDUMP" ] || CUOBJDUMP=$(ls "$VENV"/lib/python3*/site-packages/triton/backends/nvidia/bin/cuobjdump 2>/dev/null | head -1)
ARCHS=$("$CUOBJDUMP" --list-elf "$SO" | grep -o 'sm_[0-9]*a*' | sort -u | tr '\n' ' ' || true)
echo "check_cuda_build: $SO holds $ARCHS"
for arch in ${ARCH_LIST//;/ }; do
  arch=${arch%%+PTX}
  want="sm_${arch//./}"
  case " $ARCHS " in *" $want "*) ;; *) echo "check_cuda_build: no $want code in $SO" >&2; exit 1 ;; esac
done
"$VENV/bin/python" - <<'PY'
import torch
import define_ops
from define_ops import _build

assert define_ops.HAS_EXTENSION, _build.EXTENSION_ERROR
for op in ("hgt_step", "hgt_step_backward", "embedding_lookup", "embedding_lookup_backward"):
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"define_ops::{op}", key), (op, key)
print(f"check_cuda_build: define_ops imports under torch {torch.__version__} with CPU and CUDA kernels registered")
PY
echo "check_cuda_build: ok in $(( $(date +%s) - START )) s"
