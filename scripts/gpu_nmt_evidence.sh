#!/usr/bin/env bash
# GPU evidence for issue 7: Transformer base on Multi30k En→De with DeFINE inputs (n=128, k=1024,
# N=3, m=512; define_paper.md §5.4) against standard nn.Embedding(V, 512) inputs, the same fixed
# budget of optimizer steps for both, the same joint BPE model (trained deterministically on the
# training split), then beam search (beam 4, length penalty 0.6) on test_2016_flickr with sacrebleu.
# Writes benchmarks/results/nmt_multi30k_<gpu>.json (parameter counts, BLEU with its signature,
# tokens/s, wall time per run) and prints a Markdown table for the README.
#
#   bash scripts/gpu_nmt_evidence.sh                      # both runs, ~6-8 min on one H100 (estimate)
#   STEPS=1000 bash scripts/gpu_nmt_evidence.sh           # a smaller budget
#
# Settings (environment):
#   NMT_DATA   Multi30k directory (default ${DEFINE_OPS_DATA:-../shared/data}/multi30k, else
#              .gpu-data/multi30k). The device machine does not receive ../shared: run
#              scripts/gpu_data.sh here and carry .gpu-data.
#   PYTHON     interpreter with torch (CUDA), sentencepiece and sacrebleu (default: python3)
#   STEPS      optimizer steps per run (default 1800: ~25 epochs of 8192-token batches)
#   WARMUP     warm-up steps (default 1000; the base preset's 8000 suits WMT-sized runs, not this budget)
#   EVAL_EVERY validation (greedy BLEU on val, picks best.pt) every N steps (default STEPS/2;
#              must divide STEPS, so the final weights compete for best.pt)
#   RUNS_DIR   where the runs go (default runs/nmt/evidence; runs/ is git-ignored)
#   OUT        if set, each run's log, metrics and BLEU JSON are copied there as it ends, and the
#              results JSON at the end
#   NMT_RUNS   which runs, in order (default "define standard"): define (DeFINE inputs, output tied to
#              the n-dim table through m -> n), standard (nn.Embedding inputs, Vaswani's tied softmax),
#              and define_untied / standard_untied (the same inputs with an untied m-wide softmax:
#              --output-layer untied)
#   NMT_SEEDS  seeds of each run (default "1"): a run with seed N > 1 is named <run>_seed<N>, and the
#              results JSON adds each run's mean over its seeds (single runs at this budget differ by
#              up to ~2 BLEU between seeds, as the CPU runs showed)
#   PARALLEL=1 all runs at once on the one card, each its own process (one CPU thread each), logs in
#              RUNS_DIR/<run>.run.log: a GPU session has minutes and one run leaves the card mostly
#              idle. BLEU and losses do not change; tokens/s and wall times do, so the results JSON
#              records "runs_sharing_the_card" and the table says so (compare speeds from sequential runs)
#   SKIP_DONE=1 runs whose beam-search BLEU RUNS_DIR already holds are not trained again (a cut
#              session's rerun, or another seed); the results JSON covers them all
#   SMOKE=1    check the plumbing on a CPU in a minute: small preset, 2000 pairs, 20 steps; the results
#              go to RUNS_DIR only, never to benchmarks/results
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DATA=${NMT_DATA:-${DEFINE_OPS_DATA:-../shared/data}/multi30k}
[ -f "$DATA/train.en" ] || [ -n "${NMT_DATA:-}" ] || DATA=.gpu-data/multi30k  # carried by scripts/gpu_data.sh
STEPS=${STEPS:-1800}
WARMUP=${WARMUP:-1000}
EVAL_EVERY=${EVAL_EVERY:-$((STEPS / 2))}
# the trainer lets only scheduled validations pick best.pt: the last step must be one of them
if [ "$EVAL_EVERY" -le 0 ] || [ $((STEPS % EVAL_EVERY)) -ne 0 ]; then
  echo "error: EVAL_EVERY=$EVAL_EVERY must divide STEPS=$STEPS" >&2; exit 2
fi
RUNS=${RUNS_DIR:-runs/nmt/evidence}
PRECISION=bf16
EXTRA=()
RESULTS=benchmarks/results
if [ "${SMOKE:-0}" = 1 ]; then
  STEPS=20 WARMUP=10 EVAL_EVERY=10 PRECISION=fp32 RESULTS=$RUNS
  EXTRA=(--preset small --max-train-pairs 2000 --max-eval-lines 50 --device cpu)
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
for f in train.en train.de val.en val.de test.en test.de; do
  [ -f "$DATA/$f" ] || { echo "gpu_nmt_evidence: $DATA/$f is missing (set NMT_DATA)" >&2; exit 2; }
done
SMOKE=${SMOKE:-0} "$PYTHON" - <<'PY'
import os, torch, sentencepiece, sacrebleu, define_ops
device = "cpu" if os.environ["SMOKE"] == "1" else "cuda"
assert device == "cpu" or torch.cuda.is_available(), "needs a CUDA device (or SMOKE=1)"
name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
print("torch", torch.__version__, "|", name, "| sentencepiece", sentencepiece.__version__, "| sacrebleu",
      sacrebleu.__version__, f"| DeFINE backends on {device}:", define_ops.available_backends(device))
PY
NMT_RUNS=${NMT_RUNS:-define standard}
for emb in $NMT_RUNS; do
  case $emb in define | define_untied | standard | standard_untied) ;;
    *) echo "error: unknown run $emb in NMT_RUNS" >&2; exit 2 ;;
  esac
done
NAMES=()  # every (run, seed): <run> for seed 1, <run>_seed<N> for the others
for seed in ${NMT_SEEDS:-1}; do
  [[ $seed =~ ^[1-9][0-9]*$ ]] || { echo "error: NMT_SEEDS must hold positive integers, got '$seed'" >&2; exit 2; }
  for emb in $NMT_RUNS; do
    if [ "$seed" = 1 ]; then NAMES+=("$emb"); else NAMES+=("${emb}_seed$seed"); fi
  done
done
mkdir -p "$RUNS" "$RESULTS"
one_run() {  # one_run NAME: train, beam-search the test set, copy the results out
  local emb=$1 start config=${1%_seed*} seed=1
  [ "$config" != "$emb" ] && seed=${emb##*_seed}
  start=$(date +%s)
  run_args=(--embedding "${config%_untied}" --seed "$seed")
  [ "$config" != "${config%_untied}" ] && run_args+=(--output-layer untied)
  "$PYTHON" -m models.train_nmt --data "$DATA" --src en --tgt de "${run_args[@]}" --out "$RUNS/$emb" --overwrite \
    --max-steps "$STEPS" --warmup-steps "$WARMUP" --eval-every "$EVAL_EVERY" --eval-beam 1 --log-every 100 \
    --no-progress --precision "$PRECISION" "${EXTRA[@]}" 2>&1 | tee "$RUNS/$emb.train.log" || return 1
  "$PYTHON" -m models.translate "$RUNS/$emb/best.pt" --beam 4 --lenpen 0.6 --precision "$PRECISION" \
    --reference "$DATA/test.de" --bleu-json "$RUNS/$emb/test.beam4.bleu.json" \
    < "$DATA/test.en" > "$RUNS/$emb/test.beam4.de" 2> >(tee "$RUNS/$emb.translate.log" >&2) || return 1
  echo "$(( $(date +%s) - start ))" > "$RUNS/$emb.seconds"
  if [ -n "${OUT:-}" ]; then  # each run as it ends, so a session cut during the next one keeps it
    cp "$RUNS/$emb.train.log" "$OUT/nmt_$emb.train.log"
    cp "$RUNS/$emb/metrics.jsonl" "$OUT/nmt_$emb.metrics.jsonl"
    cp "$RUNS/$emb/test.beam4.bleu.json" "$OUT/nmt_$emb.test.beam4.bleu.json"
  fi
}
TODO=()  # the runs to train: all, or with SKIP_DONE=1 those without results yet
for emb in "${NAMES[@]}"; do
  if [ "${SKIP_DONE:-0}" = 1 ] && [ -f "$RUNS/$emb/test.beam4.bleu.json" ] && [ -f "$RUNS/$emb.seconds" ]; then
    echo "--- $emb: done earlier ($RUNS/$emb), not trained again"
  else
    TODO+=("$emb")
  fi
done
# shellcheck source=scripts/run_each.sh
source scripts/run_each.sh
if [ ${#TODO[@]} -gt 0 ]; then run_each "${PARALLEL:-0}" "$RUNS" one_run "${TODO[@]}" || exit 1; fi
speed_counts ${#NAMES[@]} ${#TODO[@]}
"$PYTHON" - "$RUNS" "$STEPS" "$WARMUP" "$RESULTS" "$SHARING" "$SKIPPED" "$SPEED_HEADING" "${NAMES[@]}" <<'PY'
import json, re, statistics, sys
from pathlib import Path
import torch
from models.nmt import count_parameters
from models.train_nmt import build_model
from models.trainer import load_checkpoint

runs, steps, warmup, where = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
sharing, skipped, speed, names = int(sys.argv[5]), int(sys.argv[6]), sys.argv[7], sys.argv[8:]
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
results = {"what": "Transformer base, Multi30k En-De, DeFINE vs standard input, same step budget and BPE",
           "device": device, "torch": torch.__version__, "steps": steps, "warmup": warmup,
           "runs_sharing_the_card": sharing, "runs_done_earlier": skipped, "runs": {}}
digests = set()
for emb in names:
    state = load_checkpoint(runs / emb / "best.pt")
    cfg = state["config"]
    digests.add(cfg["bpe_digest"])
    with torch.device("meta"):
        params = count_parameters(build_model(cfg))
    metrics = [json.loads(line) for line in (runs / emb / "metrics.jsonl").read_text().splitlines()]
    end = [m for m in metrics if m["event"] == "end"][-1]  # the last record of a kind is the one that counts
    # tokens/s of each logged window after the first (start-up: new batch shapes, allocator growth)
    windows = [m["tokens_per_s"] for m in metrics if m["event"] == "train"][1:]
    greedy = [m for m in metrics if m["event"] == "test"][-1]
    beam = json.loads((runs / emb / "test.beam4.bleu.json").read_text())
    results["runs"][emb] = {
        "parameters": params, "vocab": cfg["tgt_vocab_size"], "best_step": state["trainer"]["best"]["step"],
        "best_valid_bleu_greedy": state["trainer"]["best"]["value"], "test_bleu_greedy": greedy["bleu"],
        "test_loss": greedy["loss"], "test_bleu_beam4": beam["score"], "bleu_signature": beam["signature"],
        "bleu_verbose": beam["verbose"], "train_tokens_per_s": end["tokens_per_s"],
        "train_tokens_per_s_median_window": statistics.median(windows) if windows else None,
        "wall_s": int((runs / f"{emb}.seconds").read_text()),
        "output_layer": cfg.get("output_layer", "tied"), "seed": cfg["seed"],
    }
assert len(digests) == 1, "the runs must share one BPE model"
# each configuration's mean over its seeds (where it has more than one)
by_config: dict[str, list[dict]] = {}
for emb, r in results["runs"].items():
    by_config.setdefault(re.sub(r"_seed\d+$", "", emb), []).append(r)
means = {}
for config, rs in by_config.items():
    if len(rs) > 1:
        means[config] = {"seeds": [r["seed"] for r in rs], **{key: statistics.mean(r[key] for r in rs) for key in
                         ("test_bleu_beam4", "test_bleu_greedy", "test_loss", "best_valid_bleu_greedy")}}  # fmt: skip
        means[config]["test_bleu_beam4_spread"] = max(r["test_bleu_beam4"] for r in rs) - min(
            r["test_bleu_beam4"] for r in rs)
if means:
    results["means_over_seeds"] = means
out = where / f"nmt_multi30k_{device.replace(' ', '_')}.json"
out.write_text(json.dumps(results, indent=1) + "\n")
print(f"\nwrote {out}\n")
print("| input | parameters (total / input layer) | test_2016_flickr BLEU, beam 4 | greedy | best valid (greedy) | "
      f"{speed} |")
print("|---|---|---|---|---|---|")
for emb, r in results["runs"].items():
    p = r["parameters"]
    print(f"| {emb} | {p['total'] / 1e6:.2f}M / {p['src_embed'] / 1e6:.2f}M | {r['test_bleu_beam4']:.2f} | "
          f"{r['test_bleu_greedy']:.2f} | {r['best_valid_bleu_greedy']:.2f} (step {r['best_step']}) | "
          f"{r['train_tokens_per_s']:,.0f} |")
if means:
    print("\n| input (mean over seeds) | seeds | test BLEU, beam 4 (spread) | greedy | test loss |")
    print("|---|---|---|---|---|")
    for config, m in means.items():
        print(f"| {config} | {', '.join(map(str, m['seeds']))} | {m['test_bleu_beam4']:.2f} "
              f"({m['test_bleu_beam4_spread']:.2f}) | {m['test_bleu_greedy']:.2f} | {m['test_loss']:.3f} |")
cfg = load_checkpoint(runs / names[0] / "best.pt")["config"]
print(f"\nsacrebleu: {results['runs'][names[0]]['bleu_signature']}; {steps} steps of {cfg['max_tokens']}-token "
      f"batches, warm-up {warmup}, {cfg['precision']} autocast, {results['device']}")
PY
if [ -n "${OUT:-}" ]; then
  cp "$RESULTS"/nmt_multi30k_*.json "$OUT"/ 2>/dev/null || true
fi
