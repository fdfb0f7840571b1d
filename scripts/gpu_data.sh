#!/usr/bin/env bash
# Only the checkout travels to the lent GPU machine, not ../shared: copy the corpora the GPU scripts
# read (WikiText-2 for the dedup benchmark and the LM evidence, Multi30k for the NMT evidence, ~17 MB)
# into .gpu-data/ (git-ignored) and name it in the device run's carry list:
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
chmod -R u+w .gpu-data
du -sh .gpu-data
