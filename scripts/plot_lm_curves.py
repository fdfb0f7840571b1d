"""Validation perplexity against training steps, one line per run, from ``models.train_lm``'s logs.

    python scripts/plot_lm_curves.py RUN_DIR [RUN_DIR ...] --out curves.png [--title TEXT]

Each RUN_DIR holds a ``metrics.jsonl`` (and, for the legend's parameter count, a ``summary.json``).
Runs named ``<run>_seed<N>`` (scripts/gpu_lm_evidence.sh's extra seeds) share ``<run>``'s colour,
dashed. Needs matplotlib (``pip install matplotlib``), which the training code itself does not.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path


def load_run(run: Path) -> tuple[str, list[int], list[float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    # one point per step: where a step was logged twice (a resumed run redid it), the last record counts
    valid = sorted({r["step"]: r["ppl"] for r in records if r.get("event") == "valid"}.items())
    label = run.name
    summary = run / "summary.json"
    if summary.exists():
        params = json.loads(summary.read_text())["parameters"]["total"]
        label = f"{run.name} ({params / 1e6:.2f}M params)"
    return label, [s for s, _ in valid], [p for _, p in valid]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--title", default="LSTM LM on WikiText-2: validation perplexity")
    args = parser.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("error: this script needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return 2
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    colours: dict[str, str] = {}  # one colour per configuration, whatever its seed
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for run in args.runs:
        label, steps, ppl = load_run(run)
        config = re.sub(r"_seed\d+$", "", run.name)
        colour = colours.setdefault(config, palette[len(colours) % len(palette)])
        style = "-" if config == run.name else "--"
        ax.plot(steps, ppl, style, color=colour, marker="o", markersize=3, label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.set_title(args.title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
