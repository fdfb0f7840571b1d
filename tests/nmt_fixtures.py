"""Parallel corpora and tiny settings for the translation tests.

Multi30k En-De is looked up under $DEFINE_OPS_DATA (default <repo>/../shared/data); slices of it are
written to a temporary directory, never into the repo. Where it is absent, a synthetic En-De corpus
with the same layout keeps the mechanics tests running.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("DEFINE_OPS_DATA") or REPO.parent / "shared" / "data")
MULTI30K = DATA_ROOT / "multi30k"
HAS_MULTI30K = all((MULTI30K / f"{s}.{lang}").is_file() for s in ("train", "val", "test") for lang in ("en", "de"))

# Flags of models.train_nmt for a model that trains in seconds on one CPU thread.
TINY = ["--preset", "small", "--d-model", "32", "--n-heads", "4", "--ffn-dim", "64", "--table-dim", "16",
        "--define-max-dim", "64", "--bpe-vocab-size", "300", "--no-progress", "--precision", "fp32"]  # fmt: skip

_SUBJECTS = [("a man", "ein Mann"), ("a woman", "eine Frau"), ("two dogs", "zwei Hunde"), ("the child", "das Kind"),
             ("a girl", "ein Mädchen"), ("an old man", "ein alter Mann"), ("three boys", "drei Jungen")]  # fmt: skip
_VERBS = [("is running", "rennt"), ("plays", "spielt"), ("is sitting", "sitzt"), ("jumps", "springt"),
          ("is waiting", "wartet"), ("sleeps", "schläft")]  # fmt: skip
_PLACES = [("in the park", "im Park"), ("on the street", "auf der Straße"), ("near the water", "am Wasser"),
           ("in the snow", "im Schnee"), ("", "")]  # fmt: skip


def synthetic_pairs(count: int, seed: int) -> list[tuple[str, str]]:
    """En-De pairs from a small grammar (word order kept, agreement ignored): learnable in minutes."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        (se, sd), (ve, vd), (pe, pd) = rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_PLACES)
        en = " ".join(w for w in (se, ve, pe) if w)
        de = " ".join(w for w in (sd, vd, pd) if w)
        pairs.append((en[0].upper() + en[1:] + ".", de[0].upper() + de[1:] + "."))
    return pairs


def write_parallel(root: Path, splits: dict[str, list[tuple[str, str]]], src: str = "en", tgt: str = "de") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, pairs in splits.items():
        (root / f"{split}.{src}").write_text("".join(f"{s}\n" for s, _ in pairs), encoding="utf-8")
        (root / f"{split}.{tgt}").write_text("".join(f"{t}\n" for _, t in pairs), encoding="utf-8")
    return root


def _head_pairs(split: str, count: int) -> list[tuple[str, str]]:
    with open(MULTI30K / f"{split}.en", encoding="utf-8") as en, open(MULTI30K / f"{split}.de", encoding="utf-8") as de:
        return [(next(en).rstrip("\n"), next(de).rstrip("\n")) for _ in range(count)]


def multi30k_slice(root: Path, train: int = 2000, evaluation: int = 50) -> Path:
    """The first pairs of Multi30k's train/val/test (synthetic pairs where the data is absent)."""
    if HAS_MULTI30K:
        splits = {"train": _head_pairs("train", train), "val": _head_pairs("val", evaluation),
                  "test": _head_pairs("test", evaluation)}  # fmt: skip
    else:
        splits = {"train": synthetic_pairs(train, 1), "val": synthetic_pairs(evaluation, 2),
                  "test": synthetic_pairs(evaluation, 3)}  # fmt: skip
    return write_parallel(root, splits)


def tiny_slice(root: Path, count: int = 8) -> Path:
    """``count`` short pairs (Multi30k's first short ones, else synthetic) as train = val = test."""
    if HAS_MULTI30K:
        pairs = [p for p in _head_pairs("train", 200) if len(p[0]) < 50 and len(p[1]) < 55][:count]
    else:
        pairs = synthetic_pairs(count, 4)
    return write_parallel(root, {"train": pairs, "val": pairs, "test": pairs})


def one_thread():
    """Tiny models gain nothing from intra-op threads, and OpenMP's spin-waits slow them badly on a
    loaded 2-core machine: one thread per test, the setting restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
