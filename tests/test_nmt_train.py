"""``python -m models.train_nmt`` and ``python -m models.translate``: smoke runs of every input
layout, training on a Multi30k slice, overfitting a tiny slice until greedy and beam decoding
reproduce it, exact resume, BLEU against sacrebleu's own command line, clear errors, torchrun."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import train_nmt, translate
from models.nmt_data import Subwords
from models.translate import corpus_bleu
from tests.nmt_fixtures import HAS_MULTI30K, REPO, TINY, multi30k_slice, one_thread, tiny_slice, write_parallel

_one_thread = pytest.fixture(autouse=True)(one_thread)


@pytest.fixture(scope="module")
def slice_dir(tmp_path_factory):
    return multi30k_slice(tmp_path_factory.mktemp("multi30k"), train=2000, evaluation=40)


def argv(data, out, *extra):
    return ["--data", str(data), "--src", "en", "--tgt", "de", "--out", str(out), *TINY, *extra]


def records(out: Path, event: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


@pytest.fixture(scope="module")
def trained(slice_dir, tmp_path_factory):
    """A run of 30 steps (tiny model): its directory, for the decoding tests."""
    out = tmp_path_factory.mktemp("run")
    settings = ["--max-steps", "30", "--max-tokens", "1024", "--eval-every", "30", "--max-eval-lines", "20"]
    for _ in one_thread():  # module fixtures are set up before the autouse one runs
        assert train_nmt.main(argv(slice_dir, out, *settings)) == 0
    return out


# ------------------------------------------------------------------------------------ training
@pytest.mark.parametrize(
    "layout",
    [
        ["--embedding", "define"],
        ["--embedding", "standard"],
        ["--shared-vocab", "0", "--share-embeddings", "0"],
        ["--src-embedding", "define", "--tgt-embedding", "standard", "--share-embeddings", "0"],
        ["--embedding", "define", "--output-layer", "untied"],
    ],
    ids=["define-shared", "standard-shared", "define-separate-vocab", "define-to-standard", "define-untied"],
)
def test_dry_run_every_input_layout(layout, slice_dir, tmp_path, capsys):
    assert train_nmt.main(argv(slice_dir, tmp_path, "--dry-run", *layout)) == 0
    printed = capsys.readouterr().out
    assert "test BLEU" in printed and "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:" in printed
    assert [r["step"] for r in records(tmp_path, "train")] == [1, 2]
    for name in ("last.pt", "best.pt", "spm.model", "vocab.json", "test.hyp.de", "test.bleu.json"):
        assert (tmp_path / name).is_file(), name
    assert len((tmp_path / "test.hyp.de").read_text(encoding="utf-8").splitlines()) == 20


def test_a_checkpoint_from_before_the_output_layer_option_loads_as_tied(trained):
    state = torch.load(trained / "last.pt", weights_only=True)
    assert state["config"]["output_layer"] == "tied"
    legacy = {k: v for k, v in state["config"].items() if k != "output_layer"}
    model = train_nmt.build_model(legacy)
    assert model.output is None and model.out_proj is not None
    model.load_state_dict(state["model"])  # the same parameters, strictly


def test_small_preset_learns_on_a_multi30k_slice(slice_dir, tmp_path):
    """The small preset as it is, 200 steps of 768-token batches on 2000 pairs."""
    settings = ["--preset", "small", "--max-tokens", "768", "--max-steps", "200", "--eval-every", "100",
                "--log-every", "25", "--max-eval-lines", "40", "--no-progress", "--precision", "fp32"]  # fmt: skip
    code = train_nmt.main(["--data", str(slice_dir), "--src", "en", "--tgt", "de", "--out", str(tmp_path), *settings])
    assert code == 0
    config = records(tmp_path, "config")[0]["config"]
    vocab = config["tgt_vocab_size"]
    train = [r["loss"] for r in records(tmp_path, "train")]
    valid = [r["loss"] for r in records(tmp_path, "valid")]
    assert train[0] > math.log(vocab) - 1.5  # starts near uniform
    assert train[-1] < train[0] - 2.0 and valid[-1] < valid[0] < math.log(vocab)
    report = json.loads((tmp_path / "test.bleu.json").read_text())
    assert report["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp") and report["lines"] == 40
    assert records(tmp_path, "end")[0]["tokens_per_s"] > 0


def test_overfits_a_tiny_slice_until_greedy_and_beam_reproduce_it(tmp_path):
    data = tiny_slice(tmp_path / "tiny", count=8)
    out = tmp_path / "run"
    settings = ["--preset", "small", "--bpe-vocab-size", "200", "--dropout", "0", "--attention-dropout", "0",
                "--activation-dropout", "0", "--define-dropout", "0", "--warmup-steps", "20", "--max-steps", "120",
                "--eval-every", "60", "--no-progress", "--precision", "fp32"]  # fmt: skip
    assert train_nmt.main(["--data", str(data), "--src", "en", "--tgt", "de", "--out", str(out), *settings]) == 0
    references = (data / "train.de").read_text(encoding="utf-8").splitlines()
    bpe = Subwords.load(out)
    assert [bpe.decode(ids) for ids in bpe.encode(references, "tgt")] == references  # BPE loses nothing here
    for beam in ("1", "4"):
        hyp = tmp_path / f"hyp{beam}.de"
        code = translate.main([str(out / "last.pt"), "--input", str(data / "train.en"), "--output", str(hyp),
                               "--beam", beam, "--device", "cpu"])  # fmt: skip
        assert code == 0
        assert hyp.read_text(encoding="utf-8").splitlines() == references, f"beam {beam}"


def test_resume_equals_uninterrupted(slice_dir, tmp_path):
    """Dropout on, an epoch boundary crossed, interrupted mid-epoch after a validation: the resumed
    run logs the same losses and ends with bit-identical weights."""
    settings = ["--max-train-pairs", "150", "--max-tokens", "512", "--eval-every", "7", "--log-every", "1",
                "--max-eval-lines", "10", "--eval-bleu-lines", "5"]  # fmt: skip
    assert train_nmt.main(argv(slice_dir, tmp_path / "a", *settings, "--max-steps", "20")) == 0
    assert train_nmt.main(argv(slice_dir, tmp_path / "b", *settings, "--max-steps", "7")) == 0
    assert train_nmt.main(["--resume", str(tmp_path / "b" / "last.pt"), "--max-steps", "20", "--no-progress"]) == 0
    a, b = (torch.load(tmp_path / run / "last.pt", weights_only=True) for run in ("a", "b"))
    assert a["trainer"]["epoch"] >= 1  # the run crossed an epoch boundary
    assert a["model"].keys() == b["model"].keys()
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for event in ("train", "valid"):
        strip = lambda rs: [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s")} for r in rs]
        assert strip(records(tmp_path / "a", event)) == strip(records(tmp_path / "b", event)), event


def test_extended_run_picks_the_best_an_uninterrupted_run_picks(slice_dir, tmp_path):
    """The final step's validation off the schedule (10 and 20 here, every 7) is logged and saved
    but does not compete for best.pt once a scheduled one exists; so 10 steps extended to 20 on
    resume test the same best weights as 20 steps in one go."""
    settings = ["--max-train-pairs", "150", "--max-tokens", "512", "--eval-every", "7", "--max-eval-lines", "10",
                "--eval-bleu-lines", "5", "--metric", "loss"]  # fmt: skip
    assert train_nmt.main(argv(slice_dir, tmp_path / "a", *settings, "--max-steps", "20")) == 0
    assert train_nmt.main(argv(slice_dir, tmp_path / "b", *settings, "--max-steps", "10")) == 0
    assert train_nmt.main(["--resume", str(tmp_path / "b" / "last.pt"), "--max-steps", "20", "--no-progress"]) == 0
    valid = {r["step"]: r for r in records(tmp_path / "a", "valid")}
    assert sorted(valid) == [7, 14, 20] and not valid[20]["scheduled"]
    strip = lambda r: {k: v for k, v in r.items() if k != "time"}
    (a,), (b,) = records(tmp_path / "a", "test"), records(tmp_path / "b", "test")  # one test record each
    assert a["best_step"] in (7, 14) and strip(a) == strip(b)
    bleu = [json.loads((tmp_path / run / "test.bleu.json").read_text())["score"] for run in ("a", "b")]
    assert bleu[0] == bleu[1]


LONG = ("A man in a blue shirt is playing with two dogs in the park near the water . " * 30).strip()  # > 256 pieces


def test_an_over_long_eval_pair_is_left_out_of_the_loss_and_cut_for_bleu(slice_dir, tmp_path, capsys):
    def pairs(split, count):
        src, tgt = ((slice_dir / f"{split}.{lang}").read_text(encoding="utf-8").splitlines() for lang in ("en", "de"))
        return list(zip(src, tgt, strict=True))[:count]

    evaluation = pairs("val", 2) + [(LONG, LONG)] + pairs("val", 6)[2:]
    data = write_parallel(tmp_path / "data", {"train": pairs("train", 200), "val": evaluation, "test": evaluation})
    assert train_nmt.main(argv(data, tmp_path / "run", "--dry-run")) == 0
    err = capsys.readouterr().err
    assert f"{data / 'val.en'} / {data / 'val.de'}: line(s) 3 hold more pieces than --max-positions 256" in err
    assert f"{data / 'test.en'} / {data / 'test.de'}: line(s) 3" in err
    assert len((tmp_path / "run" / "test.hyp.de").read_text(encoding="utf-8").splitlines()) == 7  # every line
    assert json.loads((tmp_path / "run" / "test.bleu.json").read_text())["lines"] == 7


def test_translate_cuts_an_over_long_line_and_keeps_blank_lines(trained, tmp_path, capsys):
    source, hyp = tmp_path / "in.en", tmp_path / "out.de"
    source.write_text(f"A dog runs.\n{LONG}\n\nA man sleeps.\n", encoding="utf-8")
    code = translate.main([str(trained / "best.pt"), "--input", str(source), "--output", str(hyp), "--beam", "2",
                           "--device", "cpu"])  # fmt: skip
    assert code == 0
    assert f"{source} line 2: over the model's 256 source positions" in capsys.readouterr().err
    lines = hyp.read_text(encoding="utf-8").split("\n")
    assert len(lines) == 5 and lines[-1] == ""  # four lines, aligned with the input
    assert lines[2] == "" and lines[0] and lines[1] and lines[3]


# ------------------------------------------------------------------------------------- decoding
def test_bleu_of_a_known_hypothesis_file_matches_sacrebleus_cli(slice_dir, tmp_path):
    references = (slice_dir / "test.de").read_text(encoding="utf-8").splitlines()
    hypotheses = []
    for i, line in enumerate(references):  # damaged copies: dropped, swapped and changed words
        words = line.split()
        if i % 3 == 0 and len(words) > 3:
            words = words[:2] + words[3:]
        if i % 4 == 1 and len(words) > 4:
            words[1], words[2] = words[2], words[1]
        if i % 5 == 2:
            words = [w.lower() for w in words]
        hypotheses.append(" ".join(words))
    hyp_file = tmp_path / "hyp.de"
    hyp_file.write_text("".join(f"{h}\n" for h in hypotheses), encoding="utf-8")
    ours = corpus_bleu(hypotheses, references)
    cli = sacrebleu_cli(slice_dir / "test.de", hyp_file)
    assert 20 < ours["score"] < 95
    assert ours["score"] == pytest.approx(cli["score"], abs=5e-7) and ours["signature"] == cli["signature"]


def run(command: list[str], timeout: float, stdin: bytes | None = None) -> tuple[int, bytes, bytes]:
    """A subprocess in its own session, killed as a group on a timeout (no orphaned torchrun workers)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return proc.returncode, stdout, stderr


def sacrebleu_cli(reference: Path, hypotheses: Path) -> dict:
    code, stdout, stderr = run([sys.executable, "-m", "sacrebleu", str(reference), "-i", str(hypotheses), "-m",
                                "bleu", "-w", "6"], timeout=120)  # fmt: skip
    assert code == 0, stderr.decode()
    return json.loads(stdout)


def test_translate_reports_the_bleu_sacrebleus_cli_gives_its_output(trained, slice_dir, tmp_path, capsys):
    hyp, report = tmp_path / "hyp.de", tmp_path / "bleu.json"
    code = translate.main([str(trained / "best.pt"), "--input", str(slice_dir / "test.en"), "--output", str(hyp),
                           "--reference", str(slice_dir / "test.de"), "--bleu-json", str(report), "--beam", "3",
                           "--device", "cpu"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().err
    ours = json.loads(report.read_text())
    assert ours["signature"] in printed and f"BLEU = {ours['score']:.2f}" in printed
    assert len(hyp.read_text(encoding="utf-8").splitlines()) == 40
    cli = sacrebleu_cli(slice_dir / "test.de", hyp)
    assert ours["score"] == pytest.approx(cli["score"], abs=5e-7) and ours["signature"] == cli["signature"]


def test_translate_reads_stdin_and_writes_stdout(trained, slice_dir):
    source = (slice_dir / "test.en").read_bytes()[:2000]
    source = source[: source.rindex(b"\n") + 1] + "Ein Satz ohne Zeilenende – ünïcödé".encode()
    code, stdout, stderr = run([sys.executable, "-m", "models.translate", str(trained / "best.pt"), "--beam", "2",
                                "--device", "cpu"], timeout=300, stdin=source)  # fmt: skip
    assert code == 0, stderr.decode()[-2000:]
    assert len(stdout.decode("utf-8").splitlines()) == source.count(b"\n") + 1


# --------------------------------------------------------------------------------------- errors
def test_command_line_errors_are_clear(slice_dir, trained, tmp_path, capsys):
    def train_error(*args):
        assert train_nmt.main(list(args)) == 2
        return capsys.readouterr().err

    def translate_error(*args):
        assert translate.main([*map(str, args), "--device", "cpu"]) == 2
        return capsys.readouterr().err

    pairs = [("A dog runs.", "Ein Hund rennt."), ("A cat sleeps.", "Eine Katze schläft.")]
    bad = write_parallel(tmp_path / "bad", {"train": pairs, "val": pairs, "test": pairs})
    (bad / "val.de").write_text("Ein Hund rennt.\n", encoding="utf-8")
    assert "val.en has 2 lines but" in train_error(*argv(bad, tmp_path / "o1"))
    (bad / "val.de").write_bytes("Ein Hund rennt.\nEine Katze schläft.\n".encode("latin-1"))
    assert "val.de is not UTF-8 text: invalid byte 0xe4" in train_error(*argv(bad, tmp_path / "o2"))
    (bad / "val.de").write_text("", encoding="utf-8")
    assert "val.de is empty" in train_error(*argv(bad, tmp_path / "o3"))
    assert "--data, --src, --tgt required" in train_error("--preset", "small")
    assert "needs --shared-vocab 1" in train_error(*argv(slice_dir, tmp_path / "o4", "--shared-vocab", "0"))
    assert "already holds a checkpoint" in train_error(*argv(slice_dir, trained))
    assert "--src cannot change on --resume" in train_error("--resume", str(trained / "last.pt"), "--src", "de")

    source = tmp_path / "in.en"
    source.write_text("A dog.\n", encoding="utf-8")
    assert "does not exist" in translate_error(tmp_path / "none.pt", "--input", source)
    assert "refusing to load" in translate_error(source, "--input", source)
    latin = tmp_path / "latin.en"
    latin.write_bytes("Ein Mädchen.\n".encode("latin-1"))
    assert "is not UTF-8 text" in translate_error(trained / "best.pt", "--input", latin)
    assert "has 40 lines but the input has 1" in translate_error(trained / "best.pt", "--input", source,
                                                                 "--reference", slice_dir / "test.de")  # fmt: skip
    other = tmp_path / "other_bpe"
    Subwords.train(["a b c d"] * 20, ["e f g h"] * 20, vocab_size=20).save(other)
    assert "is not the one" in translate_error(trained / "best.pt", "--input", source, "--bpe-dir", other)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages of a machine without CUDA")
def test_device_and_backend_errors_are_clear(slice_dir, trained, tmp_path, capsys):
    for flags, message in ((["--define-backend", "cuda"], "--define-backend cuda cannot run here"),
                           (["--device", "gpu"], "--device 'gpu' is not a device"),
                           (["--device", "cuda"], "--device cuda: no CUDA device is available")):  # fmt: skip
        assert train_nmt.main(argv(slice_dir, tmp_path / "o", "--dry-run", *flags)) == 2
        assert message in capsys.readouterr().err
        assert translate.main([str(trained / "best.pt"), "--input", str(slice_dir / "test.en"), *flags]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before the BPE model was trained


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_torchrun_two_processes(slice_dir, tmp_path):
    """Two processes (gloo): each decodes its share of the test lines; the gathered translations
    equal what one process decodes from the same checkpoint."""
    out = tmp_path / "ddp"
    args = argv(slice_dir, out, "--dry-run", "--device", "cpu", "--max-tokens", "512")  # >= 2 batches: one a rank
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "models.train_nmt", *args]  # fmt: skip
    code, stdout, stderr = run(command, timeout=300)
    assert code == 0, stderr.decode()[-3000:]
    assert "2 process(es)" in stdout.decode() and stdout.decode().count("test BLEU") == 1  # rank 0 reports alone
    assert [r["step"] for r in records(out, "train")] == [1, 2]
    gathered = (out / "test.hyp.de").read_text(encoding="utf-8").splitlines()
    source = tmp_path / "test20.en"
    source.write_text("".join(f"{line}\n" for line in (slice_dir / "test.en").read_text().splitlines()[:20]))
    alone = tmp_path / "alone.de"
    code = translate.main([str(out / "best.pt"), "--input", str(source), "--output", str(alone), "--beam", "1",
                           "--device", "cpu"])  # fmt: skip
    assert code == 0 and alone.read_text(encoding="utf-8").splitlines() == gathered


def test_real_data_is_used_where_present():
    """Documents which corpus these tests ran on (skipped, not failed, without the shared data)."""
    if not HAS_MULTI30K:
        pytest.skip("Multi30k not found under $DEFINE_OPS_DATA: the tests above ran on synthetic pairs")


def test_define_group_width_multiple_reaches_both_inputs():
    from models.train_nmt import BASE, PRESETS, build_model

    cfg = dict(BASE, **PRESETS["small"], src_embedding="define", tgt_embedding="define", src_vocab_size=60,
               tgt_vocab_size=60, define_group_width_multiple=8)  # fmt: skip
    model = build_model(cfg)
    assert model.src_embed.define.config.group_width_multiple == 8
    del cfg["define_group_width_multiple"]  # a checkpoint from before the option: the paper's widths
    assert build_model(cfg).src_embed.define.config.group_width_multiple == 1
