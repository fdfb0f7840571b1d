"""Corpora and tiny configurations for the language-model tests.

Real data (PTB, WikiText-2) is looked up under $DEFINE_OPS_DATA, default <repo>/../shared/data;
small slices of it are written to a temporary directory (never into the repo). Where it is
absent, a synthetic corpus with the same layout keeps the mechanics tests running.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("DEFINE_OPS_DATA") or REPO.parent / "shared" / "data")
PTB = DATA_ROOT / "ptb"
WIKITEXT2 = DATA_ROOT / "wikitext-2"
HAS_PTB = (PTB / "ptb.train.txt").is_file()
HAS_WIKITEXT2 = (WIKITEXT2 / "train.txt").is_file()


def _head(path: Path, lines: int) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        return [next(handle) for _ in range(lines)]


def synthetic_lines(count: int, seed: int) -> list[str]:
    """Sentences from a small stochastic grammar: learnable structure, ~60 word types, some <unk>."""
    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "the bank", "the company", "mr. smith", "the market", "a trader"]
    verbs = ["said", "bought", "sold", "saw", "reported", "expects", "rose"]
    objects = ["the shares", "N shares", "a profit", "the bonds", "its stake", "the index", "<unk>"]
    tails = ["yesterday", "in N", "last week", "for $ N million", "on monday", "", ""]
    out = []
    for _ in range(count):
        words = [rng.choice(subjects), rng.choice(verbs), rng.choice(objects), rng.choice(tails)]
        out.append(" " + " ".join(w for w in words if w) + " \n")
    return out


def write_corpus(root: Path, train: list[str], valid: list[str], test: list[str], layout: str = "ptb") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    names = {"ptb": "ptb.{}.txt", "plain": "{}.txt", "wiki": "wiki.{}.tokens"}[layout]
    for split, lines in (("train", train), ("valid", valid), ("test", test)):
        (root / names.format(split)).write_text("".join(lines), encoding="utf-8")
    return root


def ptb_slice(root: Path, train_lines: int = 2000, eval_lines: int = 200) -> Path:
    """The first lines of PTB (real data when present, else synthetic), as a corpus directory."""
    if HAS_PTB:
        return write_corpus(
            root,
            _head(PTB / "ptb.train.txt", train_lines),
            _head(PTB / "ptb.valid.txt", eval_lines),
            _head(PTB / "ptb.test.txt", eval_lines),
        )
    return write_corpus(
        root, synthetic_lines(train_lines, 1), synthetic_lines(eval_lines, 2), synthetic_lines(eval_lines, 3)
    )


# Tiny models for fast CPU runs (flags of models.train_lm).
TINY = {
    "lstm": ["--table-dim", "16", "--input-dim", "16", "--hidden", "32", "--layers", "2"],
    "awd-lstm": ["--table-dim", "16", "--input-dim", "24", "--hidden", "32", "--layers", "2"],
    "transformer-xl": ["--table-dim", "16", "--d-model", "32", "--n-layer", "2", "--n-head", "2", "--d-head", "8",
                       "--d-inner", "64", "--mem-len", "8", "--eval-mem-len", "16"],
}  # fmt: skip
TINY_DEFINE = ["--define-max-dim", "32", "--define-depth", "2", "--define-max-groups", "2"]


def one_thread():
    """Tiny models gain nothing from intra-op threads, and OpenMP's spin-waits slow them badly on a
    loaded 2-core machine: run each test on one thread, then restore the setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
