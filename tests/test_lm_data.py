"""The word-level corpus reader, its id cache and the stream/BPTT batching."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from models import data as lm_data
from models.data import EOS, UNK, BpttBatcher, Corpus, DataError, batchify, find_split_files, shard_streams
from tests.lm_fixtures import HAS_PTB, HAS_WIKITEXT2, PTB, WIKITEXT2, one_thread, write_corpus

_one_thread = pytest.fixture(autouse=True)(one_thread)


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def small(tmp_path, layout="plain", **splits):
    lines = {"train": [" a b a\n", "\n", " c a <unk>\n"], "valid": [" a c\n"], "test": [" b <unk> x\n"]}
    lines.update(splits)
    return write_corpus(tmp_path / "corpus", lines["train"], lines["valid"], lines["test"], layout)


# ------------------------------------------------------------------------------------ real data
@pytest.mark.skipif(not HAS_WIKITEXT2, reason="WikiText-2 not found (set DEFINE_OPS_DATA)")
def test_wikitext2_matches_published_counts(cache):
    corpus = Corpus.load(WIKITEXT2, cache)
    assert corpus.vocab_size == 33_278
    assert (corpus.train.numel(), corpus.valid.numel(), corpus.test.numel()) == (2_088_628, 217_646, 245_569)
    assert corpus.vocab[0] == "the" and UNK in corpus.vocab


@pytest.mark.skipif(not HAS_PTB, reason="PTB not found (set DEFINE_OPS_DATA)")
def test_ptb_matches_published_counts_and_data_dir_is_untouched(cache):
    before = sorted(os.listdir(PTB))
    corpus = Corpus.load(PTB, cache)
    assert corpus.vocab_size == 10_000
    assert (corpus.train.numel(), corpus.valid.numel(), corpus.test.numel()) == (929_589, 73_760, 82_430)
    assert sorted(os.listdir(PTB)) == before  # ids are cached elsewhere, never next to read-only data
    assert list(cache.glob("lm-corpus-*.pt"))


# ---------------------------------------------------------------------------------- conventions
def test_vocab_by_frequency_and_eos_per_line_including_empty_ones(tmp_path, cache):
    corpus = Corpus.load(small(tmp_path), cache)
    # counts: a 3, <eos> 3, b 1, c 1, <unk> 1; ties in order of first appearance
    assert corpus.vocab == ["a", EOS, "b", "c", UNK]
    assert corpus.train.tolist() == [0, 2, 0, 1, 1, 3, 0, 4, 1]
    assert corpus.valid.tolist() == [0, 3, 1]
    assert corpus.test.tolist() == [2, 4, 4, 1]  # x is unknown → <unk>


def test_last_line_without_newline_still_ends_with_eos(tmp_path, cache):
    corpus = Corpus.load(small(tmp_path, valid=[" a c\n", " b"]), cache)
    assert corpus.valid.tolist() == [0, 3, 1, 2, 1]


@pytest.mark.parametrize("layout", ["plain", "wiki", "ptb"])
def test_each_standard_layout_is_found(tmp_path, layout):
    files = find_split_files(small(tmp_path, layout))
    assert set(files) == {"train", "valid", "test"}


# --------------------------------------------------------------------------------------- errors
def test_missing_directory(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        Corpus.load(tmp_path / "nope")


def test_missing_split_names_the_expected_files(tmp_path):
    root = small(tmp_path)
    (root / "test.txt").unlink()
    with pytest.raises(DataError, match=r"no test split .*test\.txt, wiki\.test\.tokens, ptb\.test\.txt"):
        Corpus.load(root)


def test_empty_file(tmp_path, cache):
    root = small(tmp_path, valid=["\n", "  \n"])
    with pytest.raises(DataError, match=r"valid\.txt is empty"):
        Corpus.load(root, cache)


def test_unreadable_file(tmp_path, cache):
    root = small(tmp_path)
    (root / "train.txt").unlink()
    (root / "train.txt").mkdir()  # permission bits do not stop root; a directory cannot be read either way
    with pytest.raises(DataError, match="is a directory"):
        Corpus.load(root, cache)


def test_not_utf8(tmp_path, cache):
    root = small(tmp_path)
    (root / "test.txt").write_bytes(b" caf\xe9 \n")
    with pytest.raises(DataError, match=r"test\.txt is not UTF-8 text \(invalid byte at offset 4\)"):
        Corpus.load(root, cache)


def test_unknown_word_without_unk_names_file_line_and_word(tmp_path, cache):
    root = small(tmp_path, train=[" a b\n"], valid=[" a\n", " b zebra\n"], test=[" a\n"])
    with pytest.raises(DataError, match=r"valid\.txt:2: word 'zebra' is not in the training vocabulary"):
        Corpus.load(root, cache)


# ---------------------------------------------------------------------------------------- cache
def test_second_load_reads_the_cache(tmp_path, cache, monkeypatch):
    root = small(tmp_path)
    first = Corpus.load(root, cache)
    monkeypatch.setattr(lm_data, "build_vocab", lambda text: pytest.fail("tokenized again despite the cache"))
    second = Corpus.load(root, cache)
    assert second.vocab == first.vocab and torch.equal(second.train, first.train)


def test_edited_file_is_not_served_stale_ids(tmp_path, cache):
    root = small(tmp_path)
    Corpus.load(root, cache)
    (root / "valid.txt").write_text(" c c c\n", encoding="utf-8")
    assert Corpus.load(root, cache).valid.tolist() == [3, 3, 3, 1]
    assert len(list(cache.glob("lm-corpus-*.pt"))) == 2


def test_corrupt_or_malicious_cache_is_rebuilt_not_executed(tmp_path, cache):
    root = small(tmp_path)
    Corpus.load(root, cache)
    (path,) = cache.glob("lm-corpus-*.pt")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path.write_bytes(pickle.dumps(Payload(), protocol=2))
    with pytest.warns(UserWarning, match="ignoring unreadable corpus cache"):
        corpus = Corpus.load(root, cache)
    assert not marker.exists()
    assert corpus.train.tolist() == [0, 2, 0, 1, 1, 3, 0, 4, 1]


def test_unwritable_cache_location_warns_and_continues(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.warns(UserWarning, match="could not write the corpus cache"):
        corpus = Corpus.load(small(tmp_path), blocker / "cache")
    assert corpus.vocab_size == 5


# ------------------------------------------------------------------------------------- batching
def test_batchify_makes_contiguous_streams():
    streams = batchify(torch.arange(23), 4)  # [5, 4]; 3 tokens dropped
    assert streams.shape == (5, 4)
    assert streams[:, 1].tolist() == [5, 6, 7, 8, 9]
    with pytest.raises(DataError, match="too few"):
        batchify(torch.arange(5), 4)


def test_shards_partition_the_streams():
    streams = batchify(torch.arange(48), 6)
    shards = [shard_streams(streams, r, 3) for r in range(3)]
    assert torch.equal(torch.cat(shards, dim=1), streams)
    with pytest.raises(DataError, match="not divisible"):
        shard_streams(streams, 0, 4)


def test_fixed_windows_cover_each_stream_once_with_shifted_targets():
    streams = batchify(torch.arange(60), 3)  # [20, 3]
    windows = list(BpttBatcher(streams, 6))
    assert [n for _, _, n in windows] == [6, 6, 6, 1]
    inputs = torch.cat([x for x, _, _ in windows])
    targets = torch.cat([y for _, y, _ in windows])
    assert torch.equal(inputs, streams[:-1]) and torch.equal(targets, streams[1:])


def test_variable_windows_follow_awd_lstm_and_resume_mid_pass():
    streams = batchify(torch.arange(200_000), 2)
    lengths = [n for _, _, n in BpttBatcher(streams, 70, variable=True, seed=3)]
    assert sum(lengths) == streams.size(0) - 1
    assert min(lengths[:-1]) >= 5 and max(lengths) <= 110
    halves = sum(1 for n in lengths if n < 50)  # base bptt/2 with probability 0.05, then N(base, 5)
    assert 0.02 * len(lengths) < halves < 0.1 * len(lengths)
    assert lengths == [n for _, _, n in BpttBatcher(streams, 70, variable=True, seed=3)]  # seeded

    batcher = BpttBatcher(streams, 70, variable=True, seed=3)
    it = iter(batcher)
    for _ in range(10):
        next(it)
    state = batcher.state_dict()
    rest = [n for _, _, n in it]
    resumed = BpttBatcher(streams, 70, variable=True, seed=99)
    resumed.load_state_dict(pickle.loads(pickle.dumps(state)))
    assert [n for _, _, n in resumed] == rest == lengths[10:]
