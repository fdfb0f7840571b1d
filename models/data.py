"""Word-level language-model corpora: read, build the vocabulary, cache the ids, cut into streams.

    corpus = Corpus.load("../shared/data/wikitext-2")      # train/valid/test as int64 id streams
    streams = batchify(corpus.train, 20)                    # [L, 20]: 20 parallel streams
    for inputs, targets, seq_len in BpttBatcher(streams, bptt=35): ...   # [T, B] windows

Conventions (those of the published token counts): every line is ``line.split()`` plus one
``<eos>``, empty lines included; the vocabulary is every word of the training split, ordered by
frequency (most frequent first, ties in order of first appearance) so that adaptive softmax
cutoffs mean "the c most frequent words". A valid/test word missing from the vocabulary maps to
``<unk>`` when the training split has one, and is an error otherwise.

The data directory may be read-only: ids are cached under a user cache directory (``--cache-dir``,
``$DEFINE_OPS_CACHE``, or ``~/.cache/define_ops``), keyed by the SHA-256 of the three files' bytes,
so an edited file is never served stale ids.
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

EOS = "<eos>"
UNK = "<unk>"
SPLITS = ("train", "valid", "test")
# File names per split, in the order they are looked for: plain, WikiText's release names, PTB's.
LAYOUTS = ("{split}.txt", "wiki.{split}.tokens", "ptb.{split}.txt")
CACHE_VERSION = 1


class DataError(ValueError):
    """A corpus that cannot be used as given; the message names the file and the problem."""


def default_cache_dir() -> Path:
    if os.environ.get("DEFINE_OPS_CACHE"):
        return Path(os.environ["DEFINE_OPS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "define_ops"


def find_split_files(data_dir: str | os.PathLike) -> dict[str, Path]:
    """The train/valid/test files of ``data_dir`` in any of the standard layouts."""
    root = Path(data_dir)
    if not root.exists():
        raise DataError(f"data directory {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data path {root} is not a directory")
    files = {}
    for split in SPLITS:
        names = [layout.format(split=split) for layout in LAYOUTS]
        found = [root / name for name in names if (root / name).exists()]
        if not found:
            raise DataError(f"no {split} split in {root}: expected one of {', '.join(names)}")
        files[split] = found[0]
    return files


def read_file_bytes(path: Path) -> bytes:
    """The file's bytes; a directory or an unreadable file is a DataError naming it."""
    try:
        return path.read_bytes()
    except IsADirectoryError as exc:
        raise DataError(f"{path} is a directory, not a text file") from exc
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _read_text(path: Path) -> str:
    data = read_file_bytes(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (invalid byte at offset {exc.start})") from exc
    if not text.strip():
        raise DataError(f"{path} is empty (no tokens)")
    return text


def _lines(text: str) -> list[str]:
    # One <eos> per line; a final newline does not start another line.
    lines = text.split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def build_vocab(text: str) -> list[str]:
    """Every word of ``text`` plus ``<eos>``, most frequent first (ties: first appearance)."""
    counts: Counter[str] = Counter()
    for line in _lines(text):
        counts.update(line.split())
        counts[EOS] += 1
    return [word for word, _ in counts.most_common()]  # most_common is stable for ties


def encode(text: str, stoi: dict[str, int], path: Path) -> Tensor:
    """The id stream of ``text``; unknown words map to ``<unk>`` or raise, naming line and word."""
    unk = stoi.get(UNK)
    ids: list[int] = []
    eos = stoi[EOS]
    for lineno, line in enumerate(_lines(text), start=1):
        for word in line.split():
            index = stoi.get(word, unk)
            if index is None:
                raise DataError(
                    f"{path}:{lineno}: word {word!r} is not in the training vocabulary and the vocabulary has no "
                    f"{UNK} to map it to (map rare words to {UNK} in the training split, or add them to it)"
                )
            ids.append(index)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


@dataclass
class Corpus:
    vocab: list[str]
    train: Tensor  # [N_train] int64
    valid: Tensor
    test: Tensor
    files: dict[str, Path]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def vocab_digest(self) -> str:
        """Short hash of the vocabulary: a checkpoint records it so it never meets other ids."""
        return hashlib.sha256("\n".join(self.vocab).encode("utf-8")).hexdigest()[:16]

    @classmethod
    def load(cls, data_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None, *, use_cache: bool = True):
        files = find_split_files(data_dir)
        texts = {split: _read_text(path) for split, path in files.items()}
        digest = hashlib.sha256(str(CACHE_VERSION).encode())
        for split in SPLITS:
            digest.update(hashlib.sha256(texts[split].encode("utf-8")).digest())
        cache_path = Path(cache_dir or default_cache_dir()) / f"lm-corpus-{digest.hexdigest()[:24]}.pt"
        if use_cache and cache_path.exists():
            cached = _load_cache(cache_path)
            if cached is not None:
                return cls(cached["vocab"], cached["train"], cached["valid"], cached["test"], files)
        vocab = build_vocab(texts["train"])
        stoi = {word: index for index, word in enumerate(vocab)}
        ids = {split: encode(texts[split], stoi, files[split]) for split in SPLITS}
        corpus = cls(vocab, ids["train"], ids["valid"], ids["test"], files)
        if use_cache:
            _save_cache(cache_path, {"version": CACHE_VERSION, "vocab": vocab, **ids})
        return corpus


def _load_cache(path: Path) -> dict | None:
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if cached.get("version") == CACHE_VERSION:
            return cached
    except Exception as exc:  # a corrupt or foreign cache is rebuilt, never trusted
        warnings.warn(f"ignoring unreadable corpus cache {path}: {exc}", stacklevel=3)
    return None


def _save_cache(path: Path, payload: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
        os.replace(tmp, path)  # atomic: concurrent ranks or runs never read a half-written cache
    except OSError as exc:
        warnings.warn(f"could not write the corpus cache {path} ({exc}); continuing without it", stacklevel=3)


# ---------------------------------------------------------------------------------------- batching
def batchify(ids: Tensor, num_streams: int) -> Tensor:
    """Cut a token stream into ``num_streams`` contiguous streams: [N] → [N // B, B] (the rest dropped)."""
    if num_streams < 1:
        raise DataError(f"batch size must be >= 1, got {num_streams}")
    length = ids.numel() // num_streams
    if length < 2:
        raise DataError(f"{ids.numel()} tokens are too few for {num_streams} streams of at least 2 tokens")
    return ids[: length * num_streams].view(num_streams, length).t().contiguous()  # [L, B]


def shard_streams(streams: Tensor, rank: int, world_size: int) -> Tensor:
    """This rank's block of training streams: [L, B] → [L, B / world_size]."""
    batch = streams.size(1)
    if batch % world_size:
        raise DataError(f"batch size {batch} is not divisible by the {world_size} processes")
    per_rank = batch // world_size
    return streams[:, rank * per_rank : (rank + 1) * per_rank].contiguous()


class BpttBatcher:
    """Windows over [L, B] streams: (inputs [T, B], targets [T, B], T), targets shifted by one.

    ``variable=True`` draws each window's length as AWD-LSTM does: the base length is ``bptt``
    with probability 0.95 and ``bptt / 2`` otherwise, then T ~ N(base, 5), at least 5 and at most
    ``bptt + max_extra``. The draws come from a private generator seeded with ``seed``, so every
    rank cuts the same windows, and its state is part of ``state_dict`` (exact resume).
    """

    def __init__(self, streams: Tensor, bptt: int, *, variable: bool = False, seed: int = 0, max_extra: int = 40):
        if bptt < 1:
            raise DataError(f"bptt must be >= 1, got {bptt}")
        self.streams, self.bptt, self.variable, self.max_extra = streams, bptt, variable, max_extra
        self.rng = random.Random(seed)
        self.pos = 0

    def __len__(self) -> int:
        """Windows per pass at the base length (exact when ``variable`` is off)."""
        return max(0, -(-(self.streams.size(0) - 1) // self.bptt))

    def reset(self) -> None:
        self.pos = 0

    def _next_length(self) -> int:
        if not self.variable:
            return self.bptt
        base = self.bptt if self.rng.random() < 0.95 else self.bptt / 2
        return min(max(5, int(self.rng.gauss(base, 5))), self.bptt + self.max_extra)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, int]]:
        last = self.streams.size(0) - 1
        while self.pos < last:
            seq_len = min(self._next_length(), last - self.pos)
            start = self.pos
            self.pos += seq_len  # advanced before yielding: a checkpoint taken now resumes after this window
            yield self.streams[start : start + seq_len], self.streams[start + 1 : start + 1 + seq_len], seq_len

    def state_dict(self) -> dict:
        return {"pos": self.pos, "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.pos = int(state["pos"])
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
