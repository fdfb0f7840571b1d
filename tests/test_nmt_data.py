"""Parallel text: checks with clear errors, the joint BPE model, token-count batches."""

from __future__ import annotations

import pytest

from models.data import DataError
from models.nmt_data import (
    BOS,
    EOS,
    PAD,
    UNK,
    Subwords,
    TokenBatcher,
    collate_source,
    collate_target,
    eval_batches,
    find_parallel_files,
    read_lines,
    read_parallel,
    split_lines,
)
from tests.nmt_fixtures import synthetic_pairs, write_parallel


@pytest.fixture(scope="module")
def pairs():
    return synthetic_pairs(300, 1)


@pytest.fixture(scope="module")
def bpe(pairs):
    return Subwords.train([s for s, _ in pairs], [t for _, t in pairs], vocab_size=120)


# ------------------------------------------------------------------------------------ reading
def test_finds_the_splits_in_any_naming(tmp_path, pairs):
    root = write_parallel(tmp_path, {"train": pairs[:5], "valid": pairs[:2], "test": pairs[:2]})
    files = find_parallel_files(root, "en", "de")
    assert files["valid"] == (root / "valid.en", root / "valid.de")
    assert read_parallel(*files["train"]) == ([s for s, _ in pairs[:5]], [t for _, t in pairs[:5]])


def test_mismatched_line_counts_name_both_files_and_counts(tmp_path):
    (tmp_path / "a.en").write_text("one\ntwo\nthree\n", encoding="utf-8")
    (tmp_path / "a.de").write_text("eins\nzwei\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.en has 3 lines but .*a\.de has 2"):
        read_parallel(tmp_path / "a.en", tmp_path / "a.de")


def test_empty_files_are_errors(tmp_path):
    (tmp_path / "empty.en").write_text("", encoding="utf-8")
    (tmp_path / "blank.en").write_text("\n  \n", encoding="utf-8")
    for name in ("empty.en", "blank.en"):
        with pytest.raises(DataError, match=rf"{name} is empty"):
            read_lines(tmp_path / name)


def test_unreadable_encodings_name_line_and_offset(tmp_path):
    (tmp_path / "latin1.de").write_bytes("Grüße\nStraße\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.de is not UTF-8 text: invalid byte 0xfc at offset 2 \(line 1\)"):
        read_lines(tmp_path / "latin1.de")
    (tmp_path / "later.de").write_bytes(b"ok\nok\n\xff\n")
    with pytest.raises(DataError, match=r"offset 6 \(line 3\)"):
        read_lines(tmp_path / "later.de")


def test_missing_files_and_directories(tmp_path, pairs):
    with pytest.raises(DataError, match="does not exist"):
        find_parallel_files(tmp_path / "nowhere", "en", "de")
    root = write_parallel(tmp_path / "d", {"train": pairs[:3], "val": pairs[:3]})
    with pytest.raises(DataError, match=r"no test split .*test\.\{en,de\}"):
        find_parallel_files(root, "en", "de")
    (root / "test.en").write_text("x\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"test\.de is missing \(its other side, .*test\.en, exists\)"):
        find_parallel_files(root, "en", "de")
    with pytest.raises(DataError, match="a directory"):
        read_lines(root)


def test_lines_split_on_newlines_only():
    # U+2028 and form feeds are characters of a sentence, not line breaks: splitting there would misalign pairs.
    assert split_lines("a\u2028b\r\nc\x0cd\n") == ["a\u2028b", "c\x0cd"]
    assert split_lines("a\n\nb") == ["a", "", "b"]


# ---------------------------------------------------------------------------------------- BPE
def test_bpe_is_deterministic_round_trips_and_reloads(tmp_path, pairs, bpe):
    again = Subwords.train([s for s, _ in pairs], [t for _, t in pairs], vocab_size=120)
    assert again.digest() == bpe.digest() and bpe.shared
    assert [bpe.sp.pad_id(), bpe.sp.unk_id(), bpe.sp.bos_id(), bpe.sp.eos_id()] == [PAD, UNK, BOS, EOS]
    lines = [s for s, _ in pairs[:20]] + [t for _, t in pairs[:20]]
    ids = bpe.encode(lines, "src")
    assert all(min(row) > EOS for row in ids)  # no specials inside a sentence
    assert [bpe.decode(row) for row in ids] == lines  # detokenised exactly
    assert bpe.decode([*ids[0], EOS, *ids[1]]) == lines[0]  # stops at eos
    bpe.save(tmp_path)
    loaded = Subwords.load(tmp_path)
    assert loaded.digest() == bpe.digest() and loaded.encode(lines, "tgt") == ids


def test_separate_vocabularies_keep_each_sides_pieces(pairs, bpe):
    src, tgt = [s for s, _ in pairs], [t for _, t in pairs]
    sep = Subwords.train(src, tgt, vocab_size=120, shared=False)
    assert sep.proto == bpe.proto  # one joint model either way
    assert sep.vocab_size("src") < bpe.vocab_size("src") and sep.vocab_size("tgt") < bpe.vocab_size("tgt")
    src_ids, tgt_ids = sep.encode(src, "src"), sep.encode(tgt, "tgt")
    assert max(map(max, src_ids)) < sep.vocab_size("src") and max(map(max, tgt_ids)) < sep.vocab_size("tgt")
    assert [sep.decode(row, "tgt") for row in tgt_ids] == tgt and [sep.decode(row, "src") for row in src_ids] == src
    # a piece never seen on the target side is unknown there
    only_src = next(p for p in sep.pieces["src"] if p not in set(sep.pieces["tgt"]) and p > EOS)
    assert sep.encode([sep.sp.decode([only_src])], "tgt")[0].count(UNK) >= 1


def test_load_refuses_a_vocabulary_of_another_model(tmp_path, pairs, bpe):
    bpe.save(tmp_path)
    other = Subwords.train([s for s, _ in pairs], [t for _, t in pairs], vocab_size=100)
    (tmp_path / "spm.model").write_bytes(other.proto)
    with pytest.raises(DataError, match="another sentencepiece model"):
        Subwords.load(tmp_path)
    with pytest.raises(DataError, match="spm.model is missing"):
        Subwords.load(tmp_path / "elsewhere")


# ------------------------------------------------------------------------------------ batching
def test_token_batches_cover_every_pair_once_within_the_budget():
    src_len = [(i * 7) % 23 + 2 for i in range(500)]
    tgt_len = [(i * 5) % 19 + 2 for i in range(500)]
    batcher = TokenBatcher(src_len, tgt_len, max_tokens=200, seed=3)
    epoch0 = batcher.batches(0)
    assert sorted(i for b in epoch0 for i in b) == list(range(500))
    assert all(len(b) * max(max(src_len[i], tgt_len[i]) for i in b) <= 200 for b in epoch0)
    assert TokenBatcher(src_len, tgt_len, max_tokens=200, seed=3).batches(0) == epoch0  # reproducible
    assert batcher.batches(1) != epoch0  # reshuffled every epoch
    shards = [TokenBatcher(src_len, tgt_len, max_tokens=200, seed=3, rank=r, world_size=3).batches(0) for r in range(3)]
    assert len({len(s) for s in shards}) == 1  # every rank takes as many steps
    seen = [i for shard in shards for b in shard for i in b]
    assert len(seen) == len(set(seen)) and len(seen) >= 500 - 2 * max(map(len, epoch0))
    with pytest.raises(DataError, match="smaller than the longest pair"):
        TokenBatcher([300], [3], max_tokens=200)


def test_eval_batches_and_collation():
    lengths = [5, 1, 9, 3, 3, 7]
    parts = [eval_batches(lengths, 10, r, 2) for r in range(2)]
    assert sorted(i for part in parts for b in part for i in b) == list(range(6))
    src = collate_source([[7, 8], [9]])
    tgt_in, tgt_out = collate_target([[5], [6, 7, 8]])
    assert src.tolist() == [[7, 8, EOS], [9, EOS, PAD]]
    assert tgt_in.tolist() == [[BOS, 5, PAD, PAD], [BOS, 6, 7, 8]]
    assert tgt_out.tolist() == [[5, EOS, PAD, PAD], [6, 7, 8, EOS]]
