"""How fast may SGD move the DeFINE transform? A small LSTM LM on WikiText-2 trained by
``python -m models.train_lm`` with plain SGD (lr 20, global clip 0.25, as Merity et al.'s LSTM
recipes) at several ``--define-lr-scale`` values (the transform's rate as a multiple of lr; 1 is the
whole model at one rate), against a standard table. The measurement behind the default of
``--define-lr-scale`` (README, Models); CPU-sized.

    python scripts/lm_define_lr_sweep.py --scales 1 0.1 0.05 0.02 0.005 0 --standard

Prints a Markdown table of the validation perplexity (the first --eval-tokens tokens of the valid
split) at each validation step; each run's log and checkpoints are in --out/<name>."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from models.train_lm import main as train_lm  # noqa: E402


def valid_ppl_by_step(out: Path) -> dict[int, float]:
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["ppl"] for r in records if r["event"] == "valid"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = Path(os.environ.get("DEFINE_OPS_DATA", ROOT.parent / "shared" / "data"))
    p.add_argument("--data", default=str(data / "wikitext-2"))
    p.add_argument("--scales", type=float, nargs="*", default=[1.0, 0.05, 0.005, 0.0])
    p.add_argument("--standard", action="store_true", help="also the standard n-wide table")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--eval-every", type=int, default=300)
    p.add_argument("--eval-tokens", type=int, default=20_000)
    p.add_argument("--out", default="runs/lm_define_lr_sweep")
    args = p.parse_args()
    common = ["--arch", "lstm", "--data", args.data, "--layers", "2", "--hidden", "512", "--input-dim", "256",
              "--table-dim", "128", "--tie", "proj", "--softmax", "adaptive", "--optimizer", "sgd", "--lr", "20",
              "--clip", "0.25", "--dropout", "0.25", "--dropouth", "0.25", "--dropouti", "0.25", "--batch-size", "20",
              "--bptt", "35", "--epochs", "100", "--max-steps", str(args.steps), "--eval-every", str(args.eval_every),
              "--max-eval-tokens", str(args.eval_tokens), "--seed", "1111", "--no-progress", "--overwrite"]  # fmt: skip
    define = ["--embedding", "define", "--define-max-dim", "512", "--define-depth", "3", "--define-max-groups", "4",
              "--define-dropout", "0.1"]  # fmt: skip
    runs = {f"define, transform at {scale:g} x lr": [*define, "--define-lr-scale", str(scale)] for scale in args.scales}
    if args.standard:
        runs["standard"] = ["--embedding", "standard"]
    results = {}
    for i, (name, extra) in enumerate(runs.items()):
        out = Path(args.out) / f"run{i}"
        if train_lm([*common, *extra, "--out", str(out)]) != 0:
            raise SystemExit(f"{name}: the run failed")
        results[name] = valid_ppl_by_step(out)
    steps = sorted({step for by_step in results.values() for step in by_step})
    print("| run | " + " | ".join(f"valid ppl, step {s}" for s in steps) + " |")
    print("|---|" + "---|" * len(steps))
    for name, by_step in results.items():
        print(f"| {name} | " + " | ".join(f"{by_step[s]:,.0f}" if s in by_step else "—" for s in steps) + " |")


if __name__ == "__main__":
    main()
