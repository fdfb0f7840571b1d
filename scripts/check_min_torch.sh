#!/usr/bin/env bash
# The test suite under the oldest torch define_ops supports (2.11, the GPU machines' release; CI
# and .venv run 2.13), on the CPU: the C++ kernels built against it, the layer, the models and
# trainers, and the Triton kernels' compiled path under the triton that torch 2.11 brings (3.6, as
# on the GPU): every kernel built for sm_80/sm_90 (tests/test_triton_aot.py) and the eager launch
# path through a stand-in driver (tests/test_triton_launch.py). The interpreter cases are left out
# (TRITON_INTERPRET=0: they skip): triton 3.6's interpreter fails on numpy 2.4 (its tensors'
# __index__ converts a one-element array to int), in triton's code, not ours.
#
# Not part of .ci/run (about 12 minutes on the 2-core VM, and the first run downloads torch 2.11
# from PyPI: a CUDA build, ~3 GB with its nvidia-* wheels). Run it before a GPU session, so that
# an API the GPU's torch lacks shows up here rather than in its minutes.
#
#   DEFINE_OPS_MIN_TORCH        the torch release to test (default 2.11.0; 2.14.1, the newest this
#                               machine may install, is the forward check: its triton is 3.8)
#   DEFINE_OPS_MIN_TORCH_VENV   where its venv lives (default ~/.cache/define_ops/venv-torch<release>)
#   DEFINE_OPS_MIN_TORCH_INTERPRET  1: the Triton interpreter cases run too (TRITON_INTERPRET=1, as
#                               in CI); for a torch whose triton interpreter works (3.8: 2.13, 2.14)
#   extra arguments go to pytest, e.g. `bash scripts/check_min_torch.sh -x tests/test_layer.py`
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${DEFINE_OPS_MIN_TORCH:-2.11.0}
VENV=${DEFINE_OPS_MIN_TORCH_VENV:-$HOME/.cache/define_ops/venv-torch$TORCH}
if [ ! -x "$VENV/bin/python" ]; then
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV"
fi
# The dev pins but torch, triton (torch's own pin decides it) and the lint/packaging tools.
mapfile -t PINS < <(sed 's/#.*//' requirements-dev.txt | grep -v -E '^(torch|triton|ruff|build)==' | grep -v '^\s*$')
"$VENV/bin/pip" install -q --disable-pip-version-check "torch==$TORCH" "${PINS[@]}" ninja setuptools 2>&1 \
  | grep -v "is ignored" || true
"$VENV/bin/python" -c "import torch; assert torch.__version__.split('+')[0] == '$TORCH', torch.__version__"

# Built in a clone of the committed tree, so that the checkout's own extension (built for .venv's
# torch) stays as it is.
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
git clone -q . "$WORK/repo"
cd "$WORK/repo"
DEFINE_OPS_SKIP_CUDA_BUILD=1 "$VENV/bin/pip" install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
"$VENV/bin/python" -c "import define_ops; assert 'cpu' in define_ops.available_backends('cpu'), 'CPU kernels not built'"
TRITON_INTERPRET=${DEFINE_OPS_MIN_TORCH_INTERPRET:-0} "$VENV/bin/python" -m pytest -q -p no:cacheprovider -rfE "${@:-tests/}"
