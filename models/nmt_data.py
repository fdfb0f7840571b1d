"""Parallel corpora for translation: read and check, joint BPE (sentencepiece), token-count batches.

    files = find_parallel_files("../shared/data/multi30k", "en", "de")   # {"train": (src, tgt), ...}
    src, tgt = read_parallel(*files["train"])                           # checked, aligned lines
    bpe = Subwords.train(src, tgt, vocab_size=8000, shared=True); bpe.save(out_dir)
    src_ids, tgt_ids = bpe.encode(src, "src"), bpe.encode(tgt, "tgt")    # pieces as ids, per line
    batcher = TokenBatcher(src_lengths, tgt_lengths, max_tokens=4096, seed=1)
    for indices in batcher.batches(epoch): ...                          # pair indices of one batch
    src_batch = collate_source(rows); tgt_in, tgt_out = collate_target(rows)   # [B, S], [B, T], [B, T]

Layout: ``DIR/{split}.{lang}`` with split ``train``, ``val``/``valid``/``dev`` and ``test``; line i of
the source file and line i of the target file are one pair. Files must be UTF-8, non-empty and of
equal line counts: anything else is a ``DataError`` that names the file (and line or byte).

The BPE model is one sentencepiece model trained on both sides of the training split (special ids
pad 0, unk 1, bos 2, eos 3), written as ``spm.model`` next to the checkpoints together with
``vocab.json``: with a shared vocabulary both sides use the sentencepiece ids directly; otherwise
each side keeps the pieces seen on its side of the training data (in sentencepiece id order) and
maps the rest to unk, so the target softmax covers only target pieces.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .data import DataError, read_file_bytes

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPLIT_NAMES = {"train": ("train",), "valid": ("val", "valid", "dev"), "test": ("test",)}
BPE_FILE, VOCAB_FILE = "spm.model", "vocab.json"


# --------------------------------------------------------------------------------------- reading
def decode_utf8(data: bytes, where: str) -> str:
    """``data`` as UTF-8 text; invalid bytes are an error naming the line and byte offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{where} is not UTF-8 text: invalid byte 0x{data[exc.start]:02x} at offset {exc.start} (line {line}); "
            f"convert it first, e.g. iconv -f latin1 -t utf-8"
        ) from exc


def split_lines(text: str) -> list[str]:
    """Lines split on "\\n" only (never on other Unicode breaks, which would misalign pairs), a
    trailing "\\r" dropped; a final newline does not start another line."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_lines(path: str | os.PathLike) -> list[str]:
    path = Path(path)
    lines = split_lines(decode_utf8(read_file_bytes(path), str(path)))
    if not any(line.strip() for line in lines):
        raise DataError(f"{path} is empty (no text)")
    return lines


def read_parallel(src_path: str | os.PathLike, tgt_path: str | os.PathLike) -> tuple[list[str], list[str]]:
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise DataError(
            f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}: line i of each must be one sentence "
            f"pair, so the counts must match"
        )
    return src, tgt


def find_parallel_files(data_dir: str | os.PathLike, src: str, tgt: str) -> dict[str, tuple[Path, Path]]:
    """{split: (source file, target file)} for train/valid/test of ``data_dir``."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist" if not root.exists() else f"{root} is not a directory")
    if src == tgt:
        raise DataError(f"source and target language are both {src!r}")
    files = {}
    for split, names in SPLIT_NAMES.items():
        found = [name for name in names if (root / f"{name}.{src}").exists() or (root / f"{name}.{tgt}").exists()]
        if not found:
            expected = " or ".join(f"{name}.{{{src},{tgt}}}" for name in names)
            raise DataError(f"no {split} split in {root}: expected {expected}")
        pair = root / f"{found[0]}.{src}", root / f"{found[0]}.{tgt}"
        for path, other in (pair, pair[::-1]):
            if not path.exists():
                raise DataError(f"{path} is missing (its other side, {other}, exists)")
        files[split] = pair
    return files


# ------------------------------------------------------------------------------------------ BPE
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Subwords:
    """The joint sentencepiece BPE model and each side's vocabulary over it."""

    def __init__(self, model_proto: bytes, src_pieces: list[int] | None, tgt_pieces: list[int] | None) -> None:
        import sentencepiece as spm

        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        if [self.sp.pad_id(), self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()] != [PAD, UNK, BOS, EOS]:
            raise DataError("the sentencepiece model must use ids pad 0, unk 1, bos 2, eos 3")
        self.pieces = {"src": src_pieces, "tgt": tgt_pieces}  # side id -> sentencepiece id; None: identity
        self._to_side: dict[str, list[int]] = {}
        for side, pieces in self.pieces.items():
            if pieces is not None:
                table = [UNK] * self.sp.get_piece_size()
                for side_id, spm_id in enumerate(pieces):
                    table[spm_id] = side_id
                self._to_side[side] = table

    @property
    def shared(self) -> bool:
        return self.pieces["src"] is None

    def vocab_size(self, side: str) -> int:
        pieces = self.pieces[side]
        return self.sp.get_piece_size() if pieces is None else len(pieces)

    def digest(self) -> str:
        """Hash of the model and the side vocabularies: a checkpoint records it, so its ids never
        meet another segmentation."""
        return _sha256(self.proto + json.dumps(self.pieces).encode())[:16]

    # ---------------------------------------------------------------- construction
    @classmethod
    def train(
        cls, src_lines: Sequence[str], tgt_lines: Sequence[str], *, vocab_size: int, shared: bool = True,
        num_threads: int = 4,
    ) -> Subwords:  # fmt: skip
        """A BPE model of ``vocab_size`` pieces (a soft limit: fewer on small corpora) learnt from
        both sides at once. Deterministic for the same text and settings."""
        import sentencepiece as spm

        text = [line for line in (*src_lines, *tgt_lines) if line.strip()]
        writer = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(text), model_writer=writer, vocab_size=vocab_size, model_type="bpe",
                character_coverage=1.0, pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS, hard_vocab_limit=False,
                input_sentence_size=0, num_threads=num_threads, minloglevel=2,
            )  # fmt: skip
        except RuntimeError as exc:
            raise DataError(f"sentencepiece could not train a BPE model of {vocab_size} pieces: {exc}") from exc
        model = cls(writer.getvalue(), None, None)
        if shared:
            return model
        sides = [sorted({PAD, UNK, BOS, EOS}.union(*map(set, model.sp.encode(list(lines))))) for lines in
                 (src_lines, tgt_lines)]  # fmt: skip
        return cls(model.proto, *sides)

    def save(self, directory: str | os.PathLike) -> None:
        """``spm.model`` (the sentencepiece model, usable with its own tools) and ``vocab.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        vocab = {"format": "define_ops.models.nmt_data/1", "spm_sha256": _sha256(self.proto), **self.pieces}
        for name, data in ((BPE_FILE, self.proto), (VOCAB_FILE, json.dumps(vocab).encode())):
            tmp = directory / f".{name}.tmp-{os.getpid()}"
            tmp.write_bytes(data)
            os.replace(tmp, directory / name)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Subwords:
        directory = Path(directory)
        paths = directory / BPE_FILE, directory / VOCAB_FILE
        for path in paths:
            if not path.is_file():
                raise DataError(f"{path} is missing: the BPE model is saved next to the checkpoints of its run")
        proto = paths[0].read_bytes()
        try:
            vocab = json.loads(paths[1].read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise DataError(f"{paths[1]} is not a vocabulary written by models.nmt_data: {exc}") from exc
        if vocab.get("spm_sha256") != _sha256(proto):
            raise DataError(f"{paths[1]} belongs to another sentencepiece model than {paths[0]}")
        return cls(proto, vocab["src"], vocab["tgt"])

    # ---------------------------------------------------------------- use
    def encode(self, lines: Sequence[str], side: str) -> list[list[int]]:
        """Side ids of each line's pieces (no bos/eos)."""
        ids = self.sp.encode(list(lines))
        table = self._to_side.get(side)
        if table is None:
            return ids
        return [[table[i] for i in row] for row in ids]

    def decode(self, ids: Sequence[int], side: str = "tgt") -> str:
        """Detokenised text of side ids (stops at the first eos; pad/bos dropped)."""
        ids = list(ids)
        if EOS in ids:
            ids = ids[: ids.index(EOS)]
        pieces = self.pieces[side]
        spm_ids = [i if pieces is None else pieces[i] for i in ids if i not in (PAD, BOS)]
        return self.sp.decode(spm_ids)


# ------------------------------------------------------------------------------------- batching
class TokenBatcher:
    """Batches of sentence indices whose padded size, sentences × max(source, target length), stays
    within ``max_tokens``. Each epoch sorts the pairs by length (random tie-break) and shuffles the
    batch order, both from ``random.Random(seed, epoch)``: every rank and every resumed run cuts the
    same batches. With ``world_size`` > 1 each rank takes every world_size-th batch (the count is
    cut to a multiple of world_size so that all ranks take the same number of steps)."""

    def __init__(
        self, src_lengths: Sequence[int], tgt_lengths: Sequence[int], *, max_tokens: int, seed: int = 0,
        rank: int = 0, world_size: int = 1,
    ) -> None:  # fmt: skip
        self.sizes = [max(s, t) for s, t in zip(src_lengths, tgt_lengths, strict=True)]
        if not self.sizes:
            raise DataError("no training pairs left to batch")
        if max(self.sizes) > max_tokens:
            raise DataError(f"max_tokens {max_tokens} is smaller than the longest pair ({max(self.sizes)} tokens)")
        self.tgt_lengths = list(tgt_lengths)
        self.max_tokens, self.seed, self.rank, self.world_size = max_tokens, seed, rank, world_size
        self._cache: tuple[int, list[list[int]]] | None = None

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch`` (lists of pair indices)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = random.Random(self.seed * 1_000_003 + epoch)
        noise = [rng.random() for _ in self.sizes]
        order = sorted(range(len(self.sizes)), key=lambda i: (self.sizes[i], self.tgt_lengths[i], noise[i]))
        batches = pack(order, self.sizes, self.max_tokens)
        rng.shuffle(batches)
        usable = len(batches) - len(batches) % self.world_size
        if usable == 0:
            raise DataError(f"{len(batches)} batches are too few for {self.world_size} processes")
        mine = batches[self.rank : usable : self.world_size]
        self._cache = (epoch, mine)
        return mine


def eval_batches(src_lengths: Sequence[int], max_tokens: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """Batches for scoring or decoding: sorted by source length, every pair once; rank r takes
    batches r, r + W, ... (uneven counts are fine: results are gathered)."""
    order = sorted(range(len(src_lengths)), key=lambda i: src_lengths[i])
    return pack(order, src_lengths, max_tokens)[rank::world_size]


def pack(order: Sequence[int], sizes: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Cut ``order`` into consecutive batches with len(batch) × max size ≤ max_tokens (a longer
    single item gets a batch of its own)."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        if current and max(longest, sizes[i]) * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, sizes[i])
    if current:
        batches.append(current)
    return batches


def pad_batch(rows: Sequence[Sequence[int]]) -> Tensor:
    """Rows of ids → [B, max length] int64, padded with PAD."""
    out = torch.full((len(rows), max(1, max(map(len, rows)))), PAD, dtype=torch.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
    return out


def collate_source(rows: Sequence[Sequence[int]]) -> Tensor:
    """Source ids + eos, padded: [B, S]."""
    return pad_batch([[*row, EOS] for row in rows])


def collate_target(rows: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Decoder input (bos + ids) and output (ids + eos), padded: [B, T] each."""
    return pad_batch([[BOS, *row] for row in rows]), pad_batch([[*row, EOS] for row in rows])
