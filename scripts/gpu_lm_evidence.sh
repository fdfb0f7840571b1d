#!/usr/bin/env bash
# GPU evidence for the language models (issue 6), in one go on one card:
#  1. LSTM LM on WikiText-2, same steps and seed: DeFINE (n=256, k=1024, N=3) vs a standard
#     embedding of width 256 (projected to m) vs one of width m; validation curves, valid/test
#     perplexity and parameter counts;
#  2. the end-to-end training-step benchmark at the lstm_wt103 shapes (benchmarks/test_bench_lm.py).
#
#   bash scripts/gpu_lm_evidence.sh [RESULTS_DIR]      # default benchmarks/results
#
# On the device machine, which brings back at most 8 files from $OUT, none deeper than 2 folders:
#   bash scripts/gpu_lm_evidence.sh /tmp/lm && tar -czf "$OUT/lm_evidence.tgz" -C /tmp lm
#
# Environment: PYTHON (default .venv/bin/python where it exists, else python3), DEFINE_OPS_DATA
# (default ../shared/data), STEPS (default 2000), EVAL_EVERY (default STEPS/8; must divide STEPS), M (default 512),
# EXTRA (more train_lm flags, e.g. "--max-eval-tokens 5000" for a smoke run), BENCH_ARGS (e.g. --quick),
# RUNS_DIR (where the runs' checkpoints go; default runs/evidence, git-ignored), PARALLEL (1: the three runs
# at once on the one card, each its own process, log in RUNS_DIR/lm_wt2_<card>/<run>.run.log: a GPU session
# has minutes and each run leaves the card mostly idle; the perplexities do not change, the tokens/s do:
# the table then says they were measured sharing the card, and the step benchmark still runs alone),
# SEEDS (default "1111": each run once; more seeds add <run>_seed<N> runs and a mean row per run),
# SKIP_DONE (1: runs whose results RESULTS_DIR, or a finished run in RUNS_DIR, already holds are not
# trained again, e.g. after a cut session or to add a seed; the table then covers them all, each with
# the tokens/s of its own run).
# Writes RESULTS_DIR/lm_wt2_<card>/{define,standard_256,standard_m}/{metrics.jsonl,summary.json},
# RESULTS_DIR/lm_wt2_<card>/summary.md and RESULTS_DIR/lm_step_<card>.json. Checkpoints stay in
# runs/ (not committed). Render the plot afterwards (needs matplotlib):
#   python scripts/plot_lm_curves.py RESULTS_DIR/lm_wt2_<card>/* --out RESULTS_DIR/lm_wt2_<card>.png
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-benchmarks/results}
if [ -z "${PYTHON:-}" ]; then
  for candidate in .venv/bin/python python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PYTHON=$candidate; break; fi
  done
fi
DATA_ROOT=${DEFINE_OPS_DATA:-../shared/data}
[ -f "$DATA_ROOT/wikitext-2/train.txt" ] || DATA_ROOT=.gpu-data  # carried by scripts/gpu_data.sh
[ -f "$DATA_ROOT/wikitext-2/train.txt" ] || { echo "error: WikiText-2 not found (set DEFINE_OPS_DATA)" >&2; exit 2; }
STEPS=${STEPS:-2000}
EVAL_EVERY=${EVAL_EVERY:-$((STEPS / 8))}
# the trainer lets only scheduled validations pick best.pt: the last step must be one of them
if [ "$EVAL_EVERY" -le 0 ] || [ $((STEPS % EVAL_EVERY)) -ne 0 ]; then
  echo "error: EVAL_EVERY=$EVAL_EVERY must divide STEPS=$STEPS" >&2; exit 2
fi
M=${M:-512}
CARD=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_') if torch.cuda.is_available() else 'cpu')")
LM_DIR="$RESULTS/lm_wt2_$CARD"
mkdir -p "$LM_DIR"
"$PYTHON" -c "import torch, define_ops; print('torch', torch.__version__, 'backends', define_ops.available_backends('cuda' if torch.cuda.is_available() else 'cpu'))"

# Same LSTM (2 x 1024, input m, tied through a projection to the table width), optimiser, steps and seed.
COMMON=(--arch lstm --data "$DATA_ROOT/wikitext-2" --layers 2 --hidden 1024 --input-dim "$M" --tie proj
        --softmax adaptive --batch-size 60 --bptt 70 --optimizer sgd --lr 20 --clip 0.25 --dropout 0.25
        --dropouth 0.25 --dropouti 0.25 --epochs 1000 --max-steps "$STEPS" --eval-every "$EVAL_EVERY"
        --log-every 50 --precision auto --no-progress)  # --seed: per run, from SEEDS
declare -A VARIANT=(
  [define]="--embedding define --table-dim 256 --define-max-dim 1024 --define-depth 3 --define-max-groups 4 --define-dropout 0.1"
  [standard_256]="--embedding standard --table-dim 256"
  [standard_m]="--embedding standard --table-dim $M"
)
RUNS="${RUNS_DIR:-runs/evidence}/lm_wt2_$CARD"
mkdir -p "$RUNS"
SEEDS=${SEEDS:-1111}
FIRST_SEED=${SEEDS%% *}
NAMES=()  # every (run, seed): <run> for the first seed, <run>_seed<N> for the others
for seed in $SEEDS; do
  [[ $seed =~ ^[0-9]+$ ]] || { echo "error: SEEDS must hold integers, got '$seed'" >&2; exit 2; }
  for name in define standard_256 standard_m; do
    if [ "$seed" = "$FIRST_SEED" ]; then NAMES+=("$name"); else NAMES+=("${name}_seed$seed"); fi
  done
done
copy_out() {  # copy_out NAME: a finished run's log and summary next to the others
  mkdir -p "$LM_DIR/$1" && cp "$RUNS/$1/metrics.jsonl" "$RUNS/$1/summary.json" "$LM_DIR/$1/"
}
train() {  # train NAME: one run, its results copied out
  local variant=${1%_seed*} seed=$FIRST_SEED
  [ "$variant" != "$1" ] && seed=${1##*_seed}
  # shellcheck disable=SC2086
  "$PYTHON" -m models.train_lm "${COMMON[@]}" ${VARIANT[$variant]} ${EXTRA:-} --seed "$seed" --out "$RUNS/$1" \
    --overwrite || return 1
  copy_out "$1"
}
TODO=()  # the runs to train: all, or with SKIP_DONE=1 those without results yet
for name in "${NAMES[@]}"; do
  if [ "${SKIP_DONE:-0}" = 1 ] && [ ! -f "$LM_DIR/$name/summary.json" ] && [ -f "$RUNS/$name/summary.json" ]; then
    copy_out "$name"  # finished in RUNS_DIR (train_lm writes summary.json only at the end), not copied out yet
  fi
  if [ "${SKIP_DONE:-0}" = 1 ] && [ -f "$LM_DIR/$name/summary.json" ]; then
    echo "--- $name: done earlier ($LM_DIR/$name), not trained again"
  else
    TODO+=("$name")
  fi
done
# shellcheck source=scripts/run_each.sh
source scripts/run_each.sh
if [ ${#TODO[@]} -gt 0 ]; then run_each "${PARALLEL:-0}" "$RUNS" train "${TODO[@]}"; fi

speed_counts ${#NAMES[@]} ${#TODO[@]}
"$PYTHON" - "$LM_DIR" "$SPEED_HEADING" "${NAMES[@]}" <<'EOF'
import json, re, statistics, sys
from pathlib import Path
out, speed, names = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
rows = [f"| run | parameters (input / total) | valid ppl | test ppl | {speed} |", "|---|---|---|---|---|"]
by_variant: dict[str, list[dict]] = {}
for name in names:
    s = json.loads((out / name / "summary.json").read_text())
    by_variant.setdefault(re.sub(r"_seed\d+$", "", name), []).append(s)
    p = s["parameters"]
    rows.append(f"| {name} | {p['input'] / 1e6:.2f}M / {p['total'] / 1e6:.2f}M | {s['valid_ppl']:.2f} | "
                f"{s['test_ppl']:.2f} | {s['tokens_per_s']:,.0f} |")
for variant, runs in by_variant.items():  # with several seeds: each run's mean and range
    if len(runs) > 1:
        valid, test = [r["valid_ppl"] for r in runs], [r["test_ppl"] for r in runs]
        rows.append(f"| {variant}, mean of {len(runs)} seeds | | {statistics.mean(valid):.2f} "
                    f"({min(valid):.2f}–{max(valid):.2f}) | {statistics.mean(test):.2f} "
                    f"({min(test):.2f}–{max(test):.2f}) | |")
(out / "summary.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
EOF

# shellcheck disable=SC2086
"$PYTHON" -m pytest benchmarks/test_bench_lm.py -q -p no:cacheprovider --benchmark-only ${BENCH_ARGS:-} \
  --benchmark-json "$RESULTS/lm_step_$CARD.json"
if "$PYTHON" -c "import matplotlib" 2>/dev/null; then
  "$PYTHON" scripts/plot_lm_curves.py "${NAMES[@]/#/$LM_DIR/}" --out "$LM_DIR.png"
fi
