#!/usr/bin/env bash
# What a user's install goes through, apart from the checkout: the source distribution
# (`python -m build --sdist`), a wheel built from that sdist alone (as `pip install
# define_ops-*.tar.gz` and `python -m build` do: an sdist that misses a header fails here), and
# that wheel installed into an empty directory and imported from outside the repository, where
# the compiled kernels must load and agree with the reference. CPU kernels only (the CUDA build
# is scripts/check_cuda_build.sh's). About 45 s on the 2-core VM, most of it compiling.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# From a copy of the tree as git sees it (tracked and new, unignored files): setuptools also packs
# whatever an earlier build's define_ops.egg-info/SOURCES.txt lists, which would hide a gap here.
FILES=$(git ls-files --cached --others --exclude-standard | while IFS= read -r f; do [ -e "$f" ] && echo "$f"; done)
mkdir "$WORK/tree"
printf '%s\n' "$FILES" | tr '\n' '\0' | xargs -0 cp --parents -t "$WORK/tree"
(cd "$WORK/tree" && "$PY" -m build --sdist --no-isolation -o "$WORK/dist" . > "$WORK/sdist.log" 2>&1) \
  || { cat "$WORK/sdist.log"; exit 1; }
SDIST=$(ls "$WORK"/dist/define_ops-*.tar.gz)
# Every file of the package, its sources and the project's code must be in it.
missing=$(comm -23 <(printf '%s\n' "$FILES" | grep -E '^(csrc|define_ops|models|tests|benchmarks|scripts|examples)/|^(LICENSE|README\.md|setup\.py|pyproject\.toml|requirements-dev\.txt|MANIFEST\.in)$' \
                       | grep -v '^benchmarks/results/' | sort) \
                   <(tar tzf "$SDIST" | sed 's|^[^/]*/||' | sort))
if [ -n "$missing" ]; then
  echo "check_packaging: the sdist lacks tracked files (add them to MANIFEST.in):"; echo "$missing"; exit 1
fi
if tar tzf "$SDIST" | grep -E '\.so$|__pycache__|/benchmarks/results/'; then
  echo "check_packaging: the sdist carries build outputs or results (above)"; exit 1
fi

mkdir "$WORK/unpacked"
tar xzf "$SDIST" -C "$WORK/unpacked"
(cd "$WORK"/unpacked/define_ops-* && DEFINE_OPS_SKIP_CUDA_BUILD=1 MAX_JOBS=${MAX_JOBS:-2} \
  "$PY" -m pip wheel -q --disable-pip-version-check --no-build-isolation --no-deps . -w "$WORK/wheel" \
  > "$WORK/wheel.log" 2>&1) || { tail -40 "$WORK/wheel.log"; exit 1; }
"$PY" -m pip install -q --disable-pip-version-check --no-deps --target "$WORK/site" "$WORK"/wheel/define_ops-*.whl

cd "$WORK"  # away from the checkout: only the installed copy can be imported
PYTHONPATH="$WORK/site" TRITON_INTERPRET=1 "$PY" - "$WORK/site" <<'EOF'
import sys
from pathlib import Path

import torch

import define_ops
from define_ops import DeFINE

site = Path(sys.argv[1]).resolve()
assert Path(define_ops.__file__).resolve().is_relative_to(site), f"imported {define_ops.__file__}, not the wheel"
backends = define_ops.available_backends("cpu")
assert "cpu" in backends, f"the wheel's compiled kernels did not load: backends {backends}"
torch.manual_seed(0)
ids = torch.randint(0, 50, (3, 7))
outputs = {}
for backend in ("reference", "cpu", "triton"):
    torch.manual_seed(1)
    layer = DeFINE(50, 24, input_dim=16, max_dim=64, depth=3, padding_idx=0, backend=backend, dtype=torch.float64)
    out = layer(ids)
    out.square().sum().backward()
    outputs[backend] = (out.detach(), layer.weight.grad, layer.eval()(ids))
for backend in ("cpu", "triton"):
    for ours, ref in zip(outputs[backend], outputs["reference"], strict=True):
        assert (ours - ref).abs().max().item() <= 1e-10, backend
print(f"check_packaging: define_ops {define_ops.__version__} from the wheel, backends {backends}: "
      "cpu and triton match the reference (forward, table gradient, cached table)")
EOF
