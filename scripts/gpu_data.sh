#!/usr/bin/env bash
# Only the checkout travels to the lent GPU machine, not ../shared: copy the corpora the GPU scripts
# read (WikiText-2 for the dedup benchmark and the LM evidence, Multi30k for the NMT evidence, ~17 MB)
# and two test-tool wheels into .gpu-data/ (git-ignored), and name it in the device run's carry list:
#
#   bash scripts/gpu_data.sh                       # here, once
#   run(command="bash scripts/gpu_session.sh", carry=[".gpu-data"])
#
# The GPU scripts set DEFINE_OPS_DATA to .gpu-data when it exists and the variable is unset.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${DEFINE_OPS_DATA:-../shared/data}
mkdir -p .gpu-data/wikitext-2 .gpu-data/multi30k
cp "$SRC"/wikitext-2/train.txt "$SRC"/wikitext-2/valid.txt "$SRC"/wikitext-2/test.txt .gpu-data/wikitext-2/
for split in train val test; do
  cp "$SRC/multi30k/$split.en" "$SRC/multi30k/$split.de" .gpu-data/multi30k/
done
# pytest-xdist for the Triton GPU tests (gpu_session.sh installs it there from these wheels: the GPU
# machine has no network). They compile a kernel per shape, one after another in one process, and
# ran out of their 90 s on the H200 at 9c44359 with 7 tests done; workers compile side by side.
mkdir -p .gpu-data/wheels
PIP=${PIP:-.venv/bin/pip}
"$PIP" download -q --disable-pip-version-check --no-deps -d .gpu-data/wheels pytest-xdist==3.8.0 execnet==2.1.2 \
  2>&1 | grep -v "is ignored" || true
chmod -R u+w .gpu-data
du -sh .gpu-data
